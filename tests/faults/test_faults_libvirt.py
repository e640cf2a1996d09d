"""The fault matrix on libvirt hosts with real qemu VMs; same invariant as on the ESXi lab."""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import Ledger
from tests.faults.test_faults import fence
from tests.waiting import wait_until
from vmflab import Lab
from vmflab.daemon import LabDaemon
from vmflab.procs import stopped

pytestmark = pytest.mark.faults

FAST_KEEPALIVE = {"keepalive_interval": 0.5, "keepalive_count_max": 2}


def test_libvirt_vm_migrated_between_inventory_and_fence(kvm_lab: Lab, ledger: Ledger) -> None:
    """real qemu VM shut off on kvm1 and started on kvm2 after the inventory"""
    kvm1, kvm2 = kvm_lab.libvirt["kvm1"], kvm_lab.libvirt["kvm2"]
    uuid = kvm1.define_vm("vm1")
    ledger.start(kvm1, "vm1")
    ledger.start(kvm2, "vm2")
    with LabDaemon(kvm_lab, hosts=["kvm1", "kvm2"]) as daemon:
        kvm1.stop_vm("vm1")
        ledger.target("kvm1", "vm1")
        kvm2.define_vm("vm1", uuid=uuid)
        ledger.start(kvm2, "vm1")
        start = time.monotonic()
        reply = fence(daemon, "vm1")
        ledger.seconds = time.monotonic() - start
        assert reply["ok"] and reply["result"]["host"] == "kvm2", reply
        ledger.succeeded("kvm2", "vm1")
    ledger.outcome = "found and killed on kvm2; vm2 alive"
    ledger.check()


def test_libvirt_hung_host(kvm_lab: Lab, ledger: Ledger) -> None:
    """every process of kvm2 (sshd, libvirtd, qemu) SIGSTOPped, then thawed"""
    kvm1, kvm2 = kvm_lab.libvirt["kvm1"], kvm_lab.libvirt["kvm2"]
    ledger.start(kvm1, "vm1")
    ledger.start(kvm2, "vm2")
    with LabDaemon(
        kvm_lab, hosts=["kvm1", "kvm2"], ssh=FAST_KEEPALIVE, daemon={"fence_timeout": 2}
    ) as daemon:
        with stopped(kvm2):
            ledger.seconds = wait_until(lambda: daemon.host_state("kvm2") == "down")
            ledger.target("kvm2", "vm2")
            reply = fence(daemon, "vm2")
            assert not reply["ok"] and reply["error"]["code"] == "fence_failed", reply
        wait_until(lambda: daemon.host_state("kvm2") == "up")
        reply = fence(daemon, "vm1")
        assert reply["ok"], reply
        ledger.succeeded("kvm1", "vm1")
    ledger.outcome = "down detected; fence on it failed; link back after thaw"
    ledger.check()
