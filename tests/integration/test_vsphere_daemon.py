"""kind = "vsphere" in the real daemon: fence_vmfenced fences vcsim VMs through vmfenced, the
verdict rules deciding, next to the lab's SSH hosts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import ctl, fence, run_client
from tests.integration.vcsim_fixtures import Actor, actor, password_file, vcsim, vcsim_build
from tests.waiting import wait_until
from vmflab import Lab
from vmflab.daemon import LabDaemon
from vmflab.procs import stopped as frozen
from vmflab.vcsim import USERNAME, Vcsim

pytestmark = pytest.mark.integration
__all__ = ["actor", "vcsim", "vcsim_build"]

API_HOSTS = {"vc1/DC0_H0", "vc1/DC0_C0_H0", "vc1/DC0_C0_H1", "vc1/DC0_C0_H2"}


def vsphere_entry(sim: Vcsim, directory: Path) -> str:
    return "\n".join(
        [
            "[[hosts]]",
            'name = "vc1"',
            'kind = "vsphere"',
            'address = "127.0.0.1"',
            f"port = {sim.port}",
            f'username = "{USERNAME}"',
            f'password_file = "{password_file(directory)}"',
            "tls_verify = false",
        ]
    )


@pytest.fixture
def daemon(esx_lab: Lab, vcsim: Vcsim, tmp_path: Path) -> Iterator[LabDaemon]:
    aliases = {"node1": "DC0_C0_RP0_VM0", "node9": "gfs-node9"}
    esx_lab.hosts["esx1"].start_vm("gfs-node9")
    with LabDaemon(esx_lab, aliases=aliases, extra=vsphere_entry(vcsim, tmp_path)) as running:
        wait_until(lambda: {h["name"] for h in running.status()["hosts"]} >= API_HOSTS)
        yield running


@dataclass
class Run:
    code: int
    out: str
    err: str


def agent(daemon: LabDaemon, lines: str) -> Run:
    done = run_client("agent", stdin=f"{lines}\nsocket={daemon.socket}\n")
    return Run(done.returncode, done.stdout, done.stderr)


def test_every_agent_action_through_the_daemon(daemon: LabDaemon, actor: Actor) -> None:
    assert agent(daemon, "action=status\nplug=node1").code == 0
    off = agent(daemon, "action=off\nplug=node1\nnodename=node1")
    assert (off.code, off.out) == (0, "Success: Powered OFF\n"), off
    assert actor.vm("DC0_C0_RP0_VM0").runtime.powerState == "poweredOff"
    status = agent(daemon, "action=status\nport=node1")
    assert (status.code, status.out) == (2, "Status: OFF\n"), status
    again = agent(daemon, "action=off\nplug=node1")
    assert (again.code, again.out) == (0, "Success: Already OFF\n"), again
    on = agent(daemon, "action=on\nplug=node1")
    assert (on.code, on.out) == (0, "Success: Powered ON\n"), on
    reboot = agent(daemon, "action=reboot\nplug=DC0_C0_RP0_VM0")
    assert (reboot.code, reboot.out) == (0, "Success: Rebooted\n"), reboot
    assert actor.vm("DC0_C0_RP0_VM0").runtime.powerState == "poweredOn"
    listed = agent(daemon, "action=list")
    assert listed.code == 0 and "DC0_H0_VM0" in listed.out, listed


def test_ssh_and_api_hosts_side_by_side(daemon: LabDaemon, esx_lab: Lab) -> None:
    esx1 = esx_lab.hosts["esx1"]
    cartel = esx1.vm_pids()["gfs-node9"]
    reply = fence(daemon, "node9")
    assert reply["ok"] and reply["result"]["host"] == "esx1", reply
    assert not esx1.pid_alive(cartel)
    reply = fence(daemon, "DC0_H0_VM1")
    assert reply["ok"] and reply["result"]["host"] == "vc1/DC0_H0", reply


def test_unknown_and_twins_through_the_daemon(daemon: LabDaemon, actor: Actor) -> None:
    reply = fence(daemon, "no-such-vm")
    assert not reply["ok"] and reply["error"]["code"] == "unknown_vm", reply
    actor.twin("DC0_C0_RP0_VM1")
    wait_until(lambda: sum(v["name"] == "DC0_C0_RP0_VM1" for v in daemon.status()["vms"]) == 2)
    reply = fence(daemon, "DC0_C0_RP0_VM1")
    assert not reply["ok"] and "ambiguous" in reply["error"]["message"], reply


def test_status_shows_the_api_hosts(daemon: LabDaemon) -> None:
    hosts = {h["name"]: h for h in daemon.status()["hosts"]}
    assert hosts["vc1/DC0_C0_H0"]["state"] == "up"
    assert hosts["vc1/DC0_C0_H0"]["warnings"] == [
        "tls_verify = false: any certificate is accepted (labs only)"
    ]
    metrics = daemon.request({"op": "metrics"})
    assert metrics["ok"], metrics
    assert 'vmfenced_host_up{host="vc1/DC0_C0_H0"} 1.0' in metrics["result"]["text"]
    code, out, err = ctl(daemon, "status")
    assert code == 0 and "vc1/DC0_C0_H0" in out, (out, err)


def esx1_mapped(lab: Lab) -> str:
    host = lab.hosts["esx1"]
    return "\n".join(
        [
            "[[hosts]]",
            'name = "esx1"',
            f'address = "{host.address}"',
            f"port = {host.port}",
            'kind = "esxi"',
            'vsphere_name = "DC0_C0_H0"',
        ]
    )


def hosts_by_name(daemon: LabDaemon) -> dict[str, dict[str, object]]:
    return {h["name"]: h for h in daemon.status()["hosts"]}


def test_hybrid_path_in_the_daemon(
    esx_lab: Lab, vcsim: Vcsim, actor: Actor, tmp_path: Path
) -> None:
    """vCenter's DC0_C0_H0 is the lab's esx1: the kill goes over esx1's SSH lane, and through
    vCenter while that lane is down."""
    vm = "DC0_C0_RP0_VM3"
    actor.relocate(vm, "DC0_C0_H0")
    esx1 = esx_lab.hosts["esx1"]
    cartel = esx1.start_vm(vm)
    extra = esx1_mapped(esx_lab) + "\n\n" + vsphere_entry(vcsim, tmp_path)
    with LabDaemon(
        esx_lab, hosts=[], extra=extra, ssh={"keepalive_interval": 0.5, "keepalive_count_max": 2}
    ) as daemon:
        wait_until(lambda: hosts_by_name(daemon).get("esx1", {}).get("path") == "ssh:esx1")
        hosts = hosts_by_name(daemon)
        assert hosts["esx1"]["vsphere"] == "vc1/DC0_C0_H0"
        assert "vc1/DC0_C0_H0" not in hosts and "vc1/DC0_C0_H1" in hosts
        reply = fence(daemon, vm)
        assert reply["ok"], reply
        assert (reply["result"]["host"], reply["result"]["cartel"]) == ("esx1", cartel)
        assert not esx1.pid_alive(cartel)
        # vcsim has no process to lose: its VM still shows on, so the kill was not the API's.
        assert actor.vm(vm).runtime.powerState == "poweredOn"
        esx1.start_vm(vm)
        with frozen(esx1):
            wait_until(lambda: hosts_by_name(daemon)["esx1"]["path"] == "api:vc1")
            reply = fence(daemon, vm)
            assert reply["ok"] and reply["result"]["host"] == "esx1", reply
            assert actor.vm(vm).runtime.powerState == "poweredOff"
    actor.power(vm, on=True)


def test_reload_adds_replaces_and_removes_a_vsphere_entry(
    esx_lab: Lab, vcsim: Vcsim, actor: Actor, tmp_path: Path
) -> None:
    with LabDaemon(esx_lab) as daemon:
        ssh_only = daemon.config_path.read_text()
        # Not known to the SSH hosts (unknown_vm, or fence_failed while their first
        # registration listing is still under way): never a success.
        reply = fence(daemon, "DC0_H0_VM3")
        assert not reply["ok"], reply
        daemon.config_path.write_text(ssh_only + "\n" + vsphere_entry(vcsim, tmp_path) + "\n")
        code, out, err = ctl(daemon, "reload", "--json")
        assert code == 0 and '"vc1"' in out, (out, err)
        wait_until(lambda: set(hosts_by_name(daemon)) >= API_HOSTS)
        reply = fence(daemon, "DC0_H0_VM3")
        assert reply["ok"] and reply["result"]["host"] == "vc1/DC0_H0", reply
        # Replaced (a changed key): a new session, the same hosts again.
        daemon.config_path.write_text(
            ssh_only + "\n" + vsphere_entry(vcsim, tmp_path) + '\ndatacenter = "DC0"\n'
        )
        code, out, err = ctl(daemon, "reload", "--json")
        assert code == 0, (out, err)
        wait_until(lambda: set(hosts_by_name(daemon)) >= API_HOSTS)
        actor.power("DC0_H0_VM3", on=True)
        reply = fence(daemon, "DC0_H0_VM3")
        assert reply["ok"] and reply["result"]["outcome"] == "killed", reply
        daemon.config_path.write_text(ssh_only)
        code, out, err = ctl(daemon, "reload", "--json")
        assert code == 0, (out, err)
        assert not API_HOSTS & set(hosts_by_name(daemon))
        reply = fence(daemon, "DC0_H0_VM3")
        assert not reply["ok"], reply
