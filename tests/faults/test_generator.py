"""The fault generator (`vmflab.chaos`), a short seeded run: every reply of the daemon checked
against the hosts' real process tables. The long run is `bench/faults.py` (docs/faults.md)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.conftest import report_row
from tests.integration.conftest import MODES, lab_unavailable, libvirt_unavailable
from vmflab import Lab
from vmflab.chaos import Chaos, Settings
from vmflab.chaos_report import render
from vmflab.oracle import Tally

# Every scenario in both modes: through a shell and through vmfenced-host.
pytestmark = [pytest.mark.faults, pytest.mark.parametrize("lab_mode", MODES)]

SEED = 20261127
OPS = 100
MAX_SECONDS = 90.0  # bounded in time as well as in count, whatever the machine's load


def verdict(tally: Tally, chaos: Chaos, scenario: str, command: str) -> None:
    """The run's summary in the scenario table and in the test's output; 0 of each, or fail."""
    outside = sorted(set(chaos.world.hosts) - set(chaos.configured))
    hosts = f"{', '.join(chaos.configured)} in the daemon's config; {', '.join(outside)} outside"
    summary = render(tally, seed=SEED, seconds=chaos.seconds, hosts=hosts, command=command)
    print(summary)
    report_row(
        scenario=scenario,
        injected=f"seeded random schedule (seed {SEED}): {sum(tally.ops.values())} operations, "
        f"{sum(tally.replies.values())} requests",
        outcome=f"{tally.false_successes} false successes, {tally.false_off} false OFF, "
        f"{sum(tally.failures.values())} failures (doubt)",
        seconds=chaos.seconds,
        false_successes=tally.false_successes + tally.false_off,
        collateral=tally.collateral,
        checked=tally.instances,
    )
    findings = "\n".join(tally.examples)
    assert tally.false_successes == 0, f"false successes:\n{findings}"
    assert tally.false_off == 0, f"false OFF answers from vm_status:\n{findings}"
    assert tally.collateral == 0, f"collateral kills:\n{findings}"
    assert sum(tally.replies.values()) > OPS // 4, "the schedule asked the daemon too little"


def test_generated_schedule_esxi(lab: Lab) -> None:
    """esx1-esx3 in the daemon's config, esx4 outside it"""
    lab.add_host("esx4")
    chaos = Chaos(lab, ["esx1", "esx2", "esx3"], Settings(SEED, OPS, MAX_SECONDS))
    tally = chaos.run()
    scenario = f"generated_schedule_esxi[{lab.mode}]"
    verdict(tally, chaos, scenario, f"pytest {__file__} (ESXi, {lab.mode} mode)")


@pytest.fixture
def kvm3_lab(tmp_path: Path, lab_mode: str) -> Iterator[Lab]:
    """Three libvirt hosts with real qemu VMs and one ESXi host, killed afterwards by PID."""
    reason = lab_unavailable() or libvirt_unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with Lab(tmp_path / "lab", ("esx1",), libvirt_hosts=("kvm1", "kvm2", "kvm3")) as started:
        started.mode = lab_mode
        yield started


def test_generated_schedule_libvirt(kvm3_lab: Lab) -> None:
    """kvm1, kvm2 and esx1 in the daemon's config, kvm3 outside it"""
    configured = ["esx1", "kvm1", "kvm2"]
    chaos = Chaos(kvm3_lab, configured, Settings(SEED, OPS // 2, MAX_SECONDS))
    tally = chaos.run()
    scenario = f"generated_schedule_libvirt[{kvm3_lab.mode}]"
    verdict(tally, chaos, scenario, f"pytest {__file__} (libvirt, {kvm3_lab.mode} mode)")
