"""The benchmarks still run (their --quick mode); their figures are read by people, not asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).parents[2] / "bench"


def test_fence_bench_quick() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "fence.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| fence_vmfenced -o off (new process, as Pacemaker runs it) |" in done.stdout
