"""Shared by the unit tests: a stand-in daemon on a unix socket per test (for the clients), and
stand-in host commands for the backends' scripts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakedaemon import FakeDaemon


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    with FakeDaemon(tmp_path / "d.sock") as fake:
        yield fake


def stand_in(tmp_path: Path, command: str, script: str, **files: str) -> Path:
    """A stand-in for a host's `command` (a shell script) in tmp_path/bin, and the files it
    reads and writes in bin/run; returns the bin directory, to put first on PATH."""
    bin_dir = tmp_path / "bin"
    run = bin_dir / "run"
    run.mkdir(parents=True, exist_ok=True)
    (bin_dir / command).write_text(script)
    (bin_dir / command).chmod(0o755)
    for name, text in files.items():
        (run / name).write_text(text)
    return bin_dir
