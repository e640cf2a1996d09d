"""bench/all.py names scripts that exist (its full run is for people, on an idle machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench"


def test_dry_run_lists_existing_scripts() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "all.py"), "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
    )
    commands = done.stdout.splitlines()
    assert len(commands) == 8
    for command in commands:
        script = command.split()[1]
        assert (BENCH.parent / script).is_file(), command


def test_unknown_skip_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "all.py"), "--dry-run", "--skip", "nope.py"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "unknown scripts in --skip: ['nope.py']" in done.stderr
