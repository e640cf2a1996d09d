"""Fence verdicts on ESXi and esx-classic lab hosts when a host's answer holds two VMs of the
fenced name, or a hostile display name tries to forge a record, through the real daemon.

NEEDS THE LEAD'S FENCE VERDICT (vmfenced/fence.py, verdict module): written on the backends
branch, where the daemon still kills the first of two same-named VMs and reports success.
The backends' part (both VMs listed, forged records refused) is checked in
test_hostile_names.py; these tests check the daemon's word against the hosts' process tables.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import fence, fence_failure
from vmflab import EsxClassicHost, Lab, LabHost
from vmflab.daemon import LabDaemon

pytestmark = pytest.mark.integration


def alive(host: LabHost) -> set[int]:
    return {vm.cartel for vm in host.vm_processes()}


def check_fails_naming_all_and_kills_nothing(lab: Lab, host: LabHost, paths: list[str]) -> None:
    """Starts a VM of each of `paths`, all named "victim": fencing it fails, naming every one,
    and kills none of them."""
    cartels = {host.start_vm(path) for path in paths}
    with LabDaemon(lab) as daemon:
        message = fence_failure(daemon, "victim")
        for path in paths:
            assert path in message, message
        assert alive(host) == cartels


def forged_name(sep: str, cfg: str) -> str:
    return f'evil" vmxCartelID=5{sep}vmid=7 pid=-1 cfgFile="{cfg}" uuid="" displayName="victim'


def test_one_name_twice_on_one_esxi_host_fails_naming_both_and_kills_nothing(
    esx_lab: Lab,
) -> None:
    esx1 = esx_lab.hosts["esx1"]
    paths = [esx1.create_vm("victim", datastore=ds) for ds in ("ds1", "ds2")]
    check_fails_naming_all_and_kills_nothing(esx_lab, esx1, paths)


def test_one_display_name_in_two_folders_fails_and_kills_nothing(esx_lab: Lab) -> None:
    esx1 = esx_lab.hosts["esx1"]
    paths = [esx1.create_vm(folder, display_name="victim") for folder in ("a", "b")]
    check_fails_naming_all_and_kills_nothing(esx_lab, esx1, paths)


def test_same_base_name_twice_on_a_classic_host_fails_and_kills_nothing(
    classic_lab: Lab,
) -> None:
    host = classic_lab.hosts["esx3a"]
    assert isinstance(host, EsxClassicHost)
    paths = [host.create_vm("victim", directory=d) for d in ("a", "b")]
    check_fails_naming_all_and_kills_nothing(classic_lab, host, paths)


@pytest.mark.parametrize("sep", ["\r", "\x85", "\u2028", "\x1e"], ids=repr)
@pytest.mark.parametrize("where", ["same-host", "other-host"])
def test_forged_record_never_reports_the_running_victim_fenced(
    esx_lab: Lab, sep: str, where: str
) -> None:
    esx1, esx2 = esx_lab.hosts["esx1"], esx_lab.hosts["esx2"]
    victim_host = esx1 if where == "same-host" else esx2
    victim = victim_host.start_vm("victim")
    evil_path = "/vmfs/volumes/ds1/evil/evil.vmx"
    attacker = esx1.start_vm(esx1.create_vm("evil", display_name=forged_name(sep, evil_path)))
    with LabDaemon(esx_lab) as daemon:
        reply = fence(daemon, "victim")
        victim_alive = victim in alive(victim_host)
        # Success only with the victim dead; the attacker's VM is never killed in its name.
        assert not (reply["ok"] and victim_alive), reply
        assert attacker in alive(esx1), reply
        if where == "same-host":
            # The only host running the victim cannot be read: the fence cannot be sure.
            assert not reply["ok"], reply


@pytest.mark.parametrize("where", ["same-host", "other-host"])
def test_forged_record_after_a_raw_newline_is_a_second_victim(esx_lab: Lab, where: str) -> None:
    """A raw newline cuts vmdumper's line: the forged half reads as a second "victim" (at the
    attacker's cartel, naming a .vmx string with the attacker's .vmx tail). The verdict sees
    the victim twice and must fail, killing nothing."""
    esx1, esx2 = esx_lab.hosts["esx1"], esx_lab.hosts["esx2"]
    victim_host = esx1 if where == "same-host" else esx2
    victim = victim_host.start_vm("victim")
    name = forged_name("\n", "/vmfs/volumes/ds9/evil/evil.vmx")
    attacker = esx1.start_vm(esx1.create_vm("evil", display_name=name))
    with LabDaemon(esx_lab) as daemon:
        reply = fence(daemon, "victim")
        assert not reply["ok"] and reply["error"]["code"] == "fence_failed", reply
        assert victim in alive(victim_host)
        assert attacker in alive(esx1)
