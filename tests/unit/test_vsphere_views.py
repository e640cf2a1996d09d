"""What a vSphere inventory read means to the verdict (vsphere_views) and what it decides."""

from __future__ import annotations

import pytest

from vmfenced.daemon.verdict import KillReport, Step, decide_off, decide_on, decide_status
from vmfenced.daemon.vsphere_views import (
    HostRecord,
    Inventory,
    VMRecord,
    find,
    kill_outcome,
    running,
    views,
)
from vmfenced.model import KillOutcome, Located

H1 = HostRecord("host-1", "esx-01", "connected")
H2 = HostRecord("host-2", "esx-02", "connected")


def vm(moref: str, state: str = "poweredOn", host: str | None = "host-1", **kw: str) -> VMRecord:
    name = kw.get("name", "node1")
    return VMRecord(moref, name, kw.get("uuid", f"uuid-{moref}"), state, host, f"[ds] {name}.vmx")


def inv(*vms: VMRecord, hosts: tuple[HostRecord, ...] = (H1, H2)) -> Inventory:
    return Inventory({v.moref: v for v in vms}, {h.moref: h for h in hosts})


def test_one_running_instance_is_killed() -> None:
    decision = decide_off("node1", views("vc1", inv(vm("vm-1")), "node1"))
    assert decision.step is Step.KILL and decision.target is not None
    assert decision.target.host == "vc1/esx-01"


def test_suspended_counts_as_running() -> None:
    decision = decide_off("node1", views("vc1", inv(vm("vm-1", "suspended")), "node1"))
    assert decision.step is Step.KILL


def test_powered_off_and_known_is_already_off() -> None:
    the_views = views("vc1", inv(vm("vm-1", "poweredOff")), "node1")
    assert decide_off("node1", the_views).step is Step.ALREADY_OFF
    assert decide_status("node1", the_views).step is Step.OFF
    on = decide_on("node1", the_views)
    assert on.step is Step.POWER_ON and on.registration is not None
    assert on.registration.vmid == "vm-1"


def test_unknown_to_vcenter_fails_as_unknown() -> None:
    decision = decide_off(
        "node1", views("vc1", inv(vm("vm-1", name="other")), "node1"), known=False
    )
    assert (decision.step, decision.unknown) == (Step.FAIL, True)


def test_twins_fail_naming_both() -> None:
    the_views = views("vc1", inv(vm("vm-1"), vm("vm-2", host="host-2")), "node1")
    decision = decide_off("node1", the_views)
    assert decision.step is Step.FAIL and "ambiguous: 2 instances" in decision.reason
    # API instances have no process: the message names them by instance UUID.
    assert "instance UUID uuid-vm-1" in decision.reason and "cartel" not in decision.reason


def test_a_registered_off_twin_does_not_stop_the_fence() -> None:
    the_views = views("vc1", inv(vm("vm-1"), vm("vm-2", "poweredOff", host="host-2")), "node1")
    assert decide_off("node1", the_views).step is Step.KILL


@pytest.mark.parametrize("state", ["disconnected", "notResponding"])
def test_vm_on_a_disconnected_host_fails_with_the_reason(state: str) -> None:
    lost = HostRecord("host-2", "esx-02", state)
    the_views = views("vc1", inv(vm("vm-1", host="host-2"), hosts=(H1, lost)), "node1")
    decision = decide_off("node1", the_views)
    assert decision.step is Step.FAIL
    assert f"vCenter shows the host {state}" in decision.reason
    assert decision.host == "vc1/esx-02"


def test_a_disconnected_host_without_the_vm_does_not_block() -> None:
    lost = HostRecord("host-2", "esx-02", "disconnected")
    # Its listing from when it was last connected did not show the VM.
    the_views = views("vc1", inv(vm("vm-1"), hosts=(H1, lost)), "node1", {"host-2": ()})
    assert decide_off("node1", the_views).step is Step.KILL


def test_a_disconnected_host_never_seen_connected_blocks() -> None:
    lost = HostRecord("host-2", "esx-02", "disconnected")
    the_views = views("vc1", inv(vm("vm-1"), hosts=(H1, lost)), "node1")
    decision = decide_off("node1", the_views)
    assert decision.step is Step.FAIL and decision.host == "vc1/esx-02"


def test_vcenter_moving_a_lost_hosts_vm_does_not_clear_that_host() -> None:
    """vSphere HA re-registers an isolated host's VM elsewhere: vCenter no longer places it
    on the lost host, where it may still run. Its listing from when it was connected says
    it ran there: the fence fails instead of answering already off."""
    lost = HostRecord("host-2", "esx-02", "notResponding")
    before = {"host-2": (running(vm("vm-1", host="host-2")),)}
    moved = inv(vm("vm-1", "poweredOff", host="host-1"), hosts=(H1, lost))
    decision = decide_off("node1", views("vc1", moved, "node1", before))
    assert decision.step is Step.FAIL and decision.host == "vc1/esx-02"
    assert "latest listing placed" in decision.reason


def test_a_running_vm_of_another_name_without_a_host_is_a_doubt() -> None:
    # It may be this VM under another name (renamed): no host's listing is complete.
    read = inv(vm("vm-1", "poweredOff"), vm("vm-2", host=None, name="other"))
    decision = decide_off("node1", views("vc1", read, "node1"))
    assert decision.step is Step.FAIL and "no host" in decision.reason


def test_off_everywhere_with_a_disconnected_host_cannot_say_off() -> None:
    lost = HostRecord("host-2", "esx-02", "disconnected")
    the_views = views("vc1", inv(vm("vm-1", "poweredOff"), hosts=(H1, lost)), "node1")
    assert decide_status("node1", the_views).step is Step.FAIL


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (vm("vm-1", "unknown"), "neither on nor off"),
        (vm("vm-1", host=None), "has no host"),
        (vm("vm-1", host="host-9"), "outside the inventory read"),
        (vm("vm-1", uuid=""), "no instance UUID"),
    ],
)
def test_doubtful_reads_fail(record: VMRecord, why: str) -> None:
    decision = decide_off("node1", views("vc1", inv(record), "node1"))
    assert decision.step is Step.FAIL and why in decision.reason


def test_shared_instance_uuid_fails() -> None:
    twins = inv(vm("vm-1", uuid="same"), vm("vm-2", "poweredOff", uuid="same", name="other"))
    decision = decide_off("node1", views("vc1", twins, "node1"))
    assert decision.step is Step.FAIL and "shared by more than one VM" in decision.reason


def test_kill_confirmed_only_by_a_fresh_powered_off() -> None:
    assert kill_outcome("poweredOff") is KillOutcome.KILLED
    assert kill_outcome("poweredOn") is KillOutcome.ALIVE
    assert kill_outcome("suspended") is KillOutcome.ALIVE
    assert kill_outcome(None) is None
    assert kill_outcome("weird") is None


def test_after_the_power_off_the_read_decides() -> None:
    target = Located("vc1/esx-01", running(vm("vm-1")))
    after = views("vc1", inv(vm("vm-1", "poweredOff")), "node1")
    killed = decide_off("node1", after, KillReport(target, KillOutcome.KILLED))
    assert killed.step is Step.KILLED
    unread = decide_off("node1", after, KillReport(target, None, "no answer"))
    assert unread.step is Step.FAIL
    still = views("vc1", inv(vm("vm-1")), "node1")
    assert decide_off("node1", still, KillReport(target, KillOutcome.ALIVE)).step is Step.FAIL


def test_find_by_instance_uuid_and_name() -> None:
    read = inv(vm("vm-1"), vm("vm-2", name="other"))
    assert find(read, running(vm("vm-1"))) == read.vms["vm-1"]
    renamed = running(vm("vm-1", name="renamed"))
    assert find(read, renamed) is None
