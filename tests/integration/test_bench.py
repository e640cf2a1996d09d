"""The benchmarks still run (their --quick mode); their figures are read by people, not asserted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import lab_unavailable, libvirt_unavailable

pytestmark = pytest.mark.integration

BENCH = Path(__file__).parents[2] / "bench"
FENCE_VIRSH = "/usr/sbin/fence_virsh"


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


def test_virsh_bench_quick() -> None:
    """The agent and daemon part against fence_virsh on real qemu VMs. The Pacemaker part
    (``stonith_admin --reboot`` through each device, about 35 s more) is left to people."""
    reason = (
        lab_unavailable()
        or libvirt_unavailable()
        or (None if Path(FENCE_VIRSH).exists() else "no fence_virsh")
    )
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    done = subprocess.run(
        [sys.executable, str(BENCH / "virsh.py"), "--quick", "--no-pacemaker"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("fence_virsh -o off", "fence_vmfenced -o off", "fence_virsh -o status"):
        assert f"| {row} | 3 |" in done.stdout, done.stdout
    assert "| fence_virsh -o off / fence_vmfenced -o off |" in done.stdout


def test_profile_bench_quick() -> None:
    reason = lab_unavailable() or (None if shutil.which("py-spy") else "no py-spy (.[bench])")
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    done = subprocess.run(
        [sys.executable, str(BENCH / "profile.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "### Fence path: 6 fences" in done.stdout
    assert "### Inventory path:" in done.stdout
