"""Fencing on lab ESX 3.x "classic" hosts (service console, `vmware-vmx` processes, native ps,
a slow vmware-cmd) through the real daemon; verdicts are checked against the host's own
process table (by comm, not by the backend's argv parsing)."""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import MODES, fenced, lab_unavailable
from vmfenced.backends import esx_classic as ec
from vmfenced.config import HostConfig
from vmfenced.model import RunningVM
from vmflab import EsxClassicHost, Lab
from vmflab.daemon import LabDaemon

# Every test in both modes: through a shell and through vmfenced-host.
pytestmark = pytest.mark.integration
# Every fence runs in both modes; the tests that drive the backend's commands over the lab's
# shell key (no daemon) run once.
BOTH_MODES = pytest.mark.parametrize("lab_mode", MODES)

ALIASES = {"gfs1": "node1", "gfs2": "node2"}


@pytest.fixture
def classic_lab(tmp_path: Path, lab_mode: str) -> Iterator[Lab]:
    """Two started esx-classic hosts (esx3a, esx3b); every process is killed afterwards."""
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    with Lab(tmp_path / "lab", host_names=(), classic_hosts=("esx3a", "esx3b")) as started:
        started.mode = lab_mode
        yield started


def classic(lab: Lab, name: str) -> EsxClassicHost:
    host = lab.hosts[name]
    assert isinstance(host, EsxClassicHost)
    return host


def test_backend_commands_on_real_vmware_vmx_processes(classic_lab: Lab) -> None:
    host = classic(classic_lab, "esx3a")
    pids = {name: host.start_vm(name) for name in ("node1", "node10", "node 1")}
    setup = ec.session_setup(HostConfig(name="esx3a", address=host.address, kind="esx-classic"))

    def sh(script: str) -> str:
        return host.ssh("sh -c " + shlex.quote(setup + "; " + script)).stdout

    for listing in ec.BACKEND.listings:
        found = listing.parse(sh(listing.command))
        assert {vm.name: vm.cartel for vm in found} == pids
    registered = ec.parse_registered(sh(ec.REGISTERED_COMMAND))
    assert sorted(vm.name for vm in registered) == ["node 1", "node1", "node10"]
    # node1's map entry pointing at the vmware-vmx of node10, then of "node 1": never killed.
    path = "/vmfs/volumes/ds1/node1/node1.vmx"
    for other in ("node10", "node 1"):
        stale = RunningVM(name="node1", config_file=path, cartel=pids[other])
        assert "vmf:not-that-vm" in sh(ec.kill_command(stale, 1.0))
    target = RunningVM(name="node1", config_file=path, cartel=pids["node1"])
    assert sh(ec.kill_command(target, 2.0)).splitlines()[-1] == "vmf:killed"
    assert host.vm_pids() == {"node10": pids["node10"], "node 1": pids["node 1"]}
    assert sh(ec.kill_command(target, 1.0)).splitlines()[-1] == "vmf:not-running"


@BOTH_MODES
def test_off_kills_exactly_the_target(classic_lab: Lab) -> None:
    a, b = classic(classic_lab, "esx3a"), classic(classic_lab, "esx3b")
    target = a.start_vm("node1")
    others = {name: a.start_vm(name) for name in ("node10", "node 1")}
    elsewhere = b.start_vm("node2")
    with LabDaemon(classic_lab, aliases=ALIASES) as daemon:
        kinds = {h["name"]: h["kind"] for h in daemon.status()["hosts"]}
        assert kinds == {"esx3a": "esx-classic", "esx3b": "esx-classic"}
        result = fenced(daemon, "gfs1", "killed")
        assert (result["host"], result["cartel"]) == ("esx3a", target)
        assert not a.pid_alive(target)
        assert a.vm_pids() == others
        assert b.vm_pids() == {"node2": elsewhere}
        fenced(daemon, "node1", "already_off")


@BOTH_MODES
def test_reused_pid_is_never_killed(classic_lab: Lab) -> None:
    a = classic(classic_lab, "esx3a")
    old = a.start_vm("node1")
    with LabDaemon(classic_lab, aliases=ALIASES) as daemon:
        a.stop_vm("node1")
        a.set_next_pid(old)
        intruder = a.start_vm("node2")
        assert intruder == old  # the map's PID now runs another VM's vmware-vmx
        fenced(daemon, "gfs1", "already_off")
        assert a.pid_alive(intruder)
        assert a.vm_pids() == {"node2": intruder}
        assert '"outcome": "not-that-vm"' in daemon.log()


@BOTH_MODES
def test_on_uses_vmware_cmd(classic_lab: Lab) -> None:
    b = classic(classic_lab, "esx3b")
    b.create_vm("node2")
    # Three vmware-cmd calls (registrations, the re-check, start) of ~3.5 s each.
    with LabDaemon(classic_lab, aliases=ALIASES, daemon={"on_timeout": 30}) as daemon:
        on = fenced(daemon, "gfs2", "powered_on", action="on")
        first = b.vm_pids()["node2"]
        assert on["cartel"] == first
        fenced(daemon, "gfs2", "killed", action="off")
        assert not b.pid_alive(first) and b.vm_pids() == {}
