"""The scale benchmark still runs (its --quick mode); its figures are read by people, not asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import lab_unavailable

pytestmark = pytest.mark.integration

BENCH = Path(__file__).parents[2] / "bench"


def test_scale_bench_quick() -> None:
    reason = lab_unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    done = subprocess.run(
        [sys.executable, str(BENCH / "scale.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for size in (5, 10):
        assert any(line.startswith(f"| {size} | ") for line in out.splitlines()), out
    assert "| 10 fences at once on 10 hosts: wall" in out, out
    assert "fences at once on one host" in out, out
    assert "daemon settings used: inventory_interval=" in out, out
