"""Fencing real qemu VMs on lab libvirt hosts through the real daemon; every verdict is checked
against the host's process table and libvirtd's own view (`virsh domstate`)."""

from __future__ import annotations

import shlex
import sys

import pytest

from tests.integration.conftest import (
    MODES,
    check_dead_host_fails,
    check_host_back,
    check_on_then_reboot,
    fence,
    fenced,
)
from tests.waiting import wait_for
from vmfenced.backends import libvirt as lv
from vmfenced.backends import parse_kill_marker
from vmfenced.model import KillOutcome, RunningVM
from vmflab import Lab, LibvirtHost
from vmflab.daemon import LabDaemon

# Every test in both modes: through a shell and through vmfenced-host.
pytestmark = pytest.mark.integration
# Every fence runs in both modes; the tests that drive the backend's commands over the lab's
# shell key (no daemon) run once.
BOTH_MODES = pytest.mark.parametrize("lab_mode", MODES)

ALIASES = {"node1": "vm1", "node2": "vm2"}


def shut_off(host: LibvirtHost, name: str) -> bool:
    """libvirtd notices a kill -9 a little after the process is gone."""
    return wait_for(lambda: host.domstate(name).startswith("shut off"))


@BOTH_MODES
def test_off_kills_the_real_qemu_and_only_it(kvm_lab: Lab) -> None:
    kvm1, kvm2 = kvm_lab.libvirt["kvm1"], kvm_lab.libvirt["kvm2"]
    target = kvm1.start_vm("vm1")
    # Names the guard must tell apart from vm1: a prefix, and an escaped comma (guest=vm1,,x).
    others = {name: kvm1.start_vm(name) for name in ("vm10", "vm1,x")}
    elsewhere = kvm2.start_vm("vm2")
    with LabDaemon(kvm_lab, aliases=ALIASES) as daemon:
        result = fenced(daemon, "node1", "killed")
        assert (result["host"], result["cartel"]) == ("kvm1", target)
        assert not kvm1.pid_alive(target)
        assert shut_off(kvm1, "vm1")
        assert all(kvm1.pid_alive(pid) for pid in others.values())
        assert kvm2.pid_alive(elsewhere)
        assert kvm1.vm_pids() == others
        fenced(daemon, "vm1", "already_off")


def test_listings_and_guard_on_real_qemu(kvm_lab: Lab) -> None:
    """The backend's own commands over SSH, on real qemu command lines."""
    kvm1 = kvm_lab.libvirt["kvm1"]
    pids = {name: kvm1.start_vm(name) for name in ("vm1", "vm10", "vm1,x")}
    kvm1.define_vm("defined only")

    def sh(script: str) -> str:
        setup = "LIBVIRT_DEFAULT_URI=qemu:///system; export LIBVIRT_DEFAULT_URI; LC_ALL=C; "
        return kvm1.ssh(f"sh -c {shlex.quote(setup + 'export LC_ALL; ' + script)}").stdout

    for listing in lv.BACKEND.listings:
        found = lv.parse_vm_lines(sh(listing.command))
        assert {vm.name: vm.cartel for vm in found} == pids
        assert all(vm.uuid for vm in found)
    registered = lv.parse_registered(sh(lv.BACKEND.registered_command))
    assert sorted(vm.name for vm in registered) == ["defined only", "vm1", "vm1,x", "vm10"]
    # vm1's map entry pointing at the qemu of vm10, then of vm1,x (a reused PID): never killed.
    for other in ("vm10", "vm1,x"):
        answer = sh(lv.kill_command(RunningVM("vm1", "", pids[other]), 5))
        assert parse_kill_marker(answer) is KillOutcome.NOT_THAT_VM
        assert kvm1.pid_alive(pids[other])
    assert kvm1.domstate("vm10") == "running"


@BOTH_MODES
def test_vm_moved_to_another_host_is_fenced_where_it_runs(kvm_lab: Lab) -> None:
    kvm1, kvm2 = kvm_lab.libvirt["kvm1"], kvm_lab.libvirt["kvm2"]
    uuid = kvm1.define_vm("vm1")
    old = kvm1.start_vm("vm1")
    with LabDaemon(kvm_lab, aliases=ALIASES) as daemon:
        # Migrated after the daemon's inventory: shut off on kvm1, started on kvm2.
        kvm1.stop_vm("vm1")
        kvm2.define_vm("vm1", uuid=uuid)
        moved = kvm2.start_vm("vm1")
        reply = fence(daemon, "node1")
        assert reply["ok"], reply
        assert (reply["result"]["host"], reply["result"]["cartel"]) == ("kvm2", moved)
        assert not kvm2.pid_alive(moved)
        assert shut_off(kvm2, "vm1")
        assert kvm1.domstate("vm1") == "shut off"
        assert old not in kvm1.vm_pids().values()


@pytest.mark.parametrize(
    "intruder",
    [
        # Another domain's qemu command line (guest=vm10: vm1 is a prefix of it).
        [
            sys.executable,
            "-c",
            "import time; time.sleep(600)",
            "-name",
            "guest=vm10,debug-threads=on",
        ],
        ["sleep", "600"],
    ],
    ids=["other-domain", "other-program"],
)
@BOTH_MODES
def test_reused_pid_is_never_killed(kvm_lab: Lab, intruder: list[str]) -> None:
    kvm1 = kvm_lab.libvirt["kvm1"]
    old = kvm1.start_vm("vm1")
    with LabDaemon(kvm_lab, aliases=ALIASES) as daemon:
        kvm1.stop_vm("vm1")  # behind the daemon's back: its map still says vm1 is PID `old`
        pid = kvm1.spawn(intruder, pid=old)
        assert pid == old
        fenced(daemon, "node1", "already_off")
        assert kvm1.pid_alive(pid)


@BOTH_MODES
def test_on_and_reboot_give_a_new_qemu(kvm_lab: Lab) -> None:
    kvm2 = kvm_lab.libvirt["kvm2"]
    kvm2.define_vm("vm2")
    with LabDaemon(kvm_lab, aliases=ALIASES) as daemon:
        # The reboot's power-on comes right after the kill, when libvirtd may not have seen the
        # old qemu die yet.
        on = check_on_then_reboot(daemon, "node2", kvm2, "vm2")
        assert on["host"] == "kvm2"
        assert kvm2.domstate("vm2") == "running"


@BOTH_MODES
def test_vm_status_is_live(kvm_lab: Lab) -> None:
    kvm1 = kvm_lab.libvirt["kvm1"]
    pid = kvm1.start_vm("vm1")
    with LabDaemon(kvm_lab, aliases=ALIASES) as daemon:
        on = daemon.request({"op": "vm_status", "vm": "node1"})
        assert on["result"] == {"vm": "vm1", "state": "on", "host": "kvm1", "cartel": pid}, on
        kvm1.stop_vm("vm1")  # behind the daemon's back: the cache still says on
        off = daemon.request({"op": "vm_status", "vm": "node1"})
        assert off["result"]["state"] == "off", off


@BOTH_MODES
def test_dead_libvirt_host_fails_the_fence(kvm_lab: Lab) -> None:
    kvm2 = kvm_lab.libvirt["kvm2"]
    vm = kvm2.start_vm("vm2")
    with LabDaemon(kvm_lab, aliases=ALIASES) as daemon:
        check_dead_host_fails(daemon, kvm2, "node2", "never-started")
        check_host_back(daemon, kvm2, "node2", vm)


@BOTH_MODES
def test_mixed_esxi_and_libvirt_hosts(kvm_lab: Lab) -> None:
    esx1, kvm1 = kvm_lab.hosts["esx1"], kvm_lab.libvirt["kvm1"]
    cartel = esx1.start_vm("esx-vm")
    qemu = kvm1.start_vm("kvm-vm")
    with LabDaemon(kvm_lab) as daemon:
        status = daemon.status()
        kinds = {h["name"]: (h["kind"], h["state"]) for h in status["hosts"]}
        assert kinds == {
            "esx1": ("esxi", "up"),
            "kvm1": ("libvirt", "up"),
            "kvm2": ("libvirt", "up"),
        }
        vms = {vm["name"]: (vm["host"], vm["state"]) for vm in status["vms"]}
        assert vms == {"esx-vm": ("esx1", "on"), "kvm-vm": ("kvm1", "on")}
        for vm, host, pid in (("esx-vm", "esx1", cartel), ("kvm-vm", "kvm1", qemu)):
            result = fenced(daemon, vm, "killed")
            assert (result["host"], result["cartel"]) == (host, pid)
        assert not esx1.pid_alive(cartel)
        assert not kvm1.pid_alive(qemu)
