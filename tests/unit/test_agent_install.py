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
