"""A client whose stdout is closed (`fence_vmfenced -o metadata | head`) exits 1, quietly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fakedaemon import FakeDaemon, Ok, status_result


def run_into_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    # The read end is closed before the process starts: its first write fails, every time.
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        os.close(write)


@pytest.mark.parametrize("module", ["vmfenced.clients.agent", "vmfenced.agent"])
def test_agent_stops_quietly_when_stdout_is_closed(module: str) -> None:
    done = run_into_closed_pipe("-m", module, "-o", "metadata")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr


def test_vmfencectl_stops_quietly_when_stdout_is_closed(daemon: FakeDaemon) -> None:
    daemon.set("status", Ok(status_result()))
    done = run_into_closed_pipe(
        "-m", "vmfenced.clients.ctl", "--socket", str(daemon.path), "status"
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
