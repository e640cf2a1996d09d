"""fence_vmfenced as Pacemaker runs it (a new process, key=value on stdin) against the real daemon."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.integration.conftest import run_client
from vmflab import Lab
from vmflab.daemon import LabDaemon

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


@pytest.fixture
def daemon(lab: Lab) -> Iterator[LabDaemon]:
    lab.hosts["esx1"].start_vm("gfs-node1")
    lab.hosts["esx2"].start_vm("gfs-node2")
    lab.hosts["esx3"].create_vm("gfs-node3")
    aliases = {"node1": "gfs-node1", "node2": "gfs-node2", "node3": "gfs-node3"}
    with LabDaemon(lab, aliases=aliases) as running:
        yield running


def agent(
    daemon: LabDaemon | None, lines: str, socket: str | None = None, module: str = "agent"
) -> Run:
    path = socket or (str(daemon.socket) if daemon else "/nonexistent/vmfenced.sock")
    done = run_client(module, stdin=f"{lines}\nsocket={path}\n")
    return Run(done.returncode, done.stdout, done.stderr)


def test_status_off_on_reboot_exit_codes(lab: Lab, daemon: LabDaemon) -> None:
    esx1 = lab.hosts["esx1"]
    first = esx1.vm_pids()["gfs-node1"]
    assert agent(daemon, "action=status\nplug=node1").code == 0
    off = agent(daemon, "action=off\nplug=node1\nnodename=node1")
    assert (off.code, off.out) == (0, "Success: Powered OFF\n"), off
    assert not esx1.pid_alive(first)
    status = agent(daemon, "action=status\nport=node1")
    assert (status.code, status.out) == (2, "Status: OFF\n"), status
    again = agent(daemon, "action=off\nplug=node1")
    assert (again.code, again.out) == (0, "Success: Already OFF\n"), again
    on = agent(daemon, "action=on\nplug=node1")
    assert (on.code, on.out) == (0, "Success: Powered ON\n"), on
    second = esx1.vm_pids()["gfs-node1"]
    reboot = agent(daemon, "action=reboot\nplug=gfs-node1")
    assert (reboot.code, reboot.out) == (0, "Success: Rebooted\n"), reboot
    assert not esx1.pid_alive(second)
    assert esx1.vm_pids()["gfs-node1"] != second


def test_failures_exit_1_and_never_succeed(lab: Lab, daemon: LabDaemon) -> None:
    unknown = agent(daemon, "action=off\nplug=nobody")
    assert unknown.code == 1 and "Failed:" in unknown.err and "unknown VM" in unknown.err
    assert agent(daemon, "action=status\nplug=nobody").code == 1
    lab.hosts["esx2"].stop_sshd()
    vm = lab.hosts["esx2"]
    dead = agent(daemon, "action=off\nplug=node2")
    assert dead.code == 1 and "esx2" in dead.err, dead
    vm.start_sshd()
    assert vm.vm_pids()["gfs-node2"]
    no_daemon = agent(None, "action=off\nplug=node2")
    assert no_daemon.code == 1 and "Failed:" in no_daemon.err
    assert agent(None, "action=monitor").code == 1
    assert agent(None, "action=status\nplug=node2").code == 1


def test_list_monitor_and_metadata(daemon: LabDaemon) -> None:
    listed = agent(daemon, "action=list")
    assert listed.code == 0
    assert set(listed.out.splitlines()) == {"gfs-node1,node1", "gfs-node2,node2", "gfs-node3,node3"}
    status = agent(daemon, "action=list-status")
    assert "gfs-node3,node3,OFF" in status.out.splitlines()
    assert "gfs-node1,node1,ON" in status.out.splitlines()
    assert agent(daemon, "action=monitor").code == 0
    assert agent(daemon, "action=validate-all\nplug=node1").code == 0
    meta = agent(daemon, "action=metadata")
    assert meta.code == 0 and meta.out.startswith("<?xml")


def test_malformed_input_never_fences(lab: Lab, daemon: LabDaemon) -> None:
    before = lab.hosts["esx1"].vm_pids()
    for lines in (
        "action=explode\nplug=node1",
        "action=off\nplug=",
        "\x00\x01garbage",
        "plug=node1\naction",
    ):
        bad = agent(daemon, lines)
        assert bad.code == 1 and "Failed:" in bad.err, (lines, bad)
    assert lab.hosts["esx1"].vm_pids() == before


def ctl(daemon: LabDaemon, *args: str) -> Run:
    done = run_client("ctl", "--socket", str(daemon.socket), *args)
    return Run(done.returncode, done.stdout, done.stderr)


def test_vmfencectl_against_the_daemon(lab: Lab, daemon: LabDaemon) -> None:
    import json

    status = ctl(daemon, "status", "--json")
    assert status.code == 0, status
    data = json.loads(status.out)
    assert [h["state"] for h in data["hosts"]] == ["up", "up", "up"]
    table = ctl(daemon, "status")
    assert table.code == 0 and "gfs-node2" in table.out and "esx2" in table.out
    victim = lab.hosts["esx2"].vm_pids()["gfs-node2"]
    fenced = ctl(daemon, "fence", "node2", "--action", "off")
    assert fenced.code == 0, fenced
    assert not lab.hosts["esx2"].pid_alive(victim)
    unknown = ctl(daemon, "fence", "nobody")
    assert unknown.code == 1 and "unknown_vm" in unknown.err


def test_the_old_module_name_fences(lab: Lab, daemon: LabDaemon) -> None:
    # Runbooks and hand-made wrappers that run `python3 -m vmfenced.agent` must still fence:
    # a module that imported and exited 0 would tell Pacemaker the node is off.
    victim = lab.hosts["esx2"].vm_pids()["gfs-node2"]
    off = agent(daemon, "action=off\nplug=node2", module="vmfenced.agent")
    assert (off.code, off.out) == (0, "Success: Powered OFF\n"), off
    assert not lab.hosts["esx2"].pid_alive(victim)
    status = agent(daemon, "action=status\nplug=node2", module="vmfenced.agent")
    assert status.code == 2, status
