"""The daemon process: clean SIGTERM, one clear line for every startup error, --check-config."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vmflab import Lab
from vmflab.daemon import LabDaemon, render_config

pytestmark = pytest.mark.integration


def vmfenced(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmfenced.daemon", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_sigterm_exits_cleanly_and_removes_the_socket(lab: Lab) -> None:
    daemon = LabDaemon(lab).start()
    try:
        assert daemon.status()["hosts"]
        assert daemon.stop() == 0
        assert not daemon.socket.exists()
        assert '"stopped"' in daemon.log()
    finally:
        daemon.close()


def test_socket_in_use_by_a_live_daemon(lab: Lab) -> None:
    with LabDaemon(lab) as first:
        second = vmfenced("--config", str(first.config_path))
        assert second.returncode == 1
        assert "in use by a live daemon" in second.stderr
        assert first.status()["hosts"]  # the first one still serves


def test_stale_socket_file_is_replaced(lab: Lab) -> None:
    daemon = LabDaemon(lab)
    try:
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(str(daemon.socket))  # bound, never listening: what a crash leaves
        daemon.start()
        assert daemon.status()["hosts"]
    finally:
        daemon.close()


def test_startup_errors_are_one_clear_line(lab: Lab, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        render_config(lab, tmp_path / "s.sock").replace("fence_timeout = 5", "fence_timeout = -1")
    )
    result = vmfenced("--config", str(bad))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"vmfenced: {bad}: daemon.fence_timeout: Input should be greater than 0"
    ]
    key = tmp_path / "key"
    key.write_text("garbage")
    unreadable = tmp_path / "key.toml"
    unreadable.write_text(render_config(lab, tmp_path / "s.sock", ssh={"client_keys": [str(key)]}))
    result = vmfenced("--config", str(unreadable))
    assert result.returncode == 1
    assert result.stderr.startswith(f"vmfenced: cannot read client key {key}:")
    missing = vmfenced("--config", str(tmp_path / "missing.toml"))
    assert missing.returncode == 1 and "cannot read: No such file or directory" in missing.stderr


def test_check_config(lab: Lab, tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(render_config(lab, tmp_path / "s.sock"))
    result = vmfenced("--check-config", str(good))
    assert (result.returncode, result.stdout) == (0, f"{good}: OK\n")
    bad = tmp_path / "bad.toml"
    bad.write_text(
        render_config(lab, tmp_path / "s.sock").replace("port = ", "colour = 1\nport = ")
    )
    result = vmfenced("--check-config", str(bad))
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == f"{bad}: hosts[0] (esx1).colour: unknown key"
    example = Path(__file__).parents[2] / "config" / "vmfenced.toml"
    result = vmfenced("--check-config", str(example))
    assert result.returncode == 1  # the example's key files do not exist on a test machine
    assert "client key of esx1: /etc/vmfenced/id_ed25519 does not exist" in result.stdout
