"""The installed agent wrapper: runs without site, finds its package, answers like the agent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vmfenced.clients.agent_install import install


def test_wrapper_runs_the_agent_without_site(tmp_path: Path) -> None:
    target = install(tmp_path / "fence_vmfenced")
    assert target.read_text().splitlines()[0] == f"#!{sys.executable} -IS"
    assert target.stat().st_mode & 0o777 == 0o755
    done = subprocess.run(
        [str(target), "-o", "metadata"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("<?xml")
    probe = subprocess.run(
        [str(target), "-o", "status", "-n", "x", "--socket", str(tmp_path / "none.sock")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert probe.returncode == 1 and "Failed:" in probe.stderr


def test_install_replaces_atomically(tmp_path: Path) -> None:
    target = tmp_path / "fence_vmfenced"
    target.write_text("old")
    install(target)
    assert "from vmfenced.clients.agent import main" in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["fence_vmfenced"]


def test_old_names_keep_working(tmp_path: Path) -> None:
    repo = str(Path(__file__).resolve().parents[2])
    # A wrapper written before the clients moved to vmfenced.clients, as it sits on a node.
    old = tmp_path / "fence_vmfenced_old"
    old.write_text(
        f"#!{sys.executable} -IS\nimport sys\nsys.path.insert(0, {repo!r})\n"
        "from vmfenced.agent import main\nmain()\n"
    )
    old.chmod(0o755)
    done = subprocess.run(
        [str(old), "-o", "metadata"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0 and done.stdout.startswith("<?xml"), done.stderr
    # Runbooks that say `python3 -m vmfenced.agent_install PATH`.
    target = tmp_path / "fence_vmfenced"
    done = subprocess.run(
        [sys.executable, "-m", "vmfenced.agent_install", str(target)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "from vmfenced.clients.agent import main" in target.read_text()
