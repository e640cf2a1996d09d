"""The recovery and load benchmarks still run (their --quick mode); their figures are read by
people, not asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import lab_unavailable

pytestmark = pytest.mark.integration

BENCH = Path(__file__).parents[2] / "bench"


def run_quick(script: str) -> str:
    reason = lab_unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_recovery_bench_quick() -> None:
    out = run_quick("recovery.py")
    assert "Link settings (shipped defaults): keepalive_interval = " in out, out
    for fault in ("hung", "dead"):
        assert f"| {fault} host | " in out, out
    assert "SIGCONT until a fence of its VM confirmed | " in out, out


def test_load_bench_quick() -> None:
    out = run_quick("load.py")
    assert "| daemon: fence off, daemon-side elapsed_ms | loaded | 3 | " in out, out
    assert "| fence_vmfenced -o off (new process) | loaded | 3 | " in out, out
