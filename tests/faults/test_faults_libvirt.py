"""The fault matrix on libvirt hosts with real qemu VMs; same invariant as on the ESXi lab."""

from __future__ import annotations

import pytest

from tests.faults.conftest import Ledger, check_hung_host, fence_where_it_moved
from tests.integration.conftest import MODES
from vmflab import Lab
from vmflab.daemon import LabDaemon

# Every scenario in both modes: through a shell and through vmfenced-host.
pytestmark = [pytest.mark.faults, pytest.mark.parametrize("lab_mode", MODES)]


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
        fence_where_it_moved(daemon, ledger, kvm2, "vm1")
    ledger.outcome = "found and killed on kvm2; vm2 alive"
    ledger.check()


def test_libvirt_hung_host(kvm_lab: Lab, ledger: Ledger) -> None:
    """every process of kvm2 (sshd, libvirtd, qemu) SIGSTOPped, then thawed"""
    kvm1, kvm2 = kvm_lab.libvirt["kvm1"], kvm_lab.libvirt["kvm2"]
    check_hung_host(kvm_lab, ledger, hung=(kvm2, "vm2"), well=(kvm1, "vm1"), hosts=["kvm1", "kvm2"])
