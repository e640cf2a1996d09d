"""The lab's Proxmox VE nodes themselves (vmflab.proxmox): what a node looks like from outside,
the shared /etc/pve tree, the VM processes, qm and ha-manager, the HA stand-in, and fence_pve
against the API stand-in (vmflab.pve_api)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.integration.conftest import fence_pve_unavailable, skip_without
from tests.integration.test_bench import quick
from tests.waiting import wait_for
from vmflab import Lab
from vmflab.proxmox import ProxmoxCluster
from vmflab.proxmox_node import kvm_argv
from vmflab.pve_api import NO_COSTS, PveApi

pytestmark = pytest.mark.integration


def cluster(lab: Lab) -> ProxmoxCluster:
    assert lab.pve is not None
    return lab.pve


def vmlist_text(pve: ProxmoxCluster) -> str:
    return (pve.dirs.tree / ".vmlist").read_text()


def test_tree_vmlist_follows_configs_as_pmxcfs_renders_it(pve_lab: Lab) -> None:
    pve = cluster(pve_lab)
    assert vmlist_text(pve) == '{\n"version": 1\n\n}\n'
    pve.create_vm("pve1", 100, "web")
    pve.create_vm("pve2", 101, None)
    assert vmlist_text(pve) == (
        '{\n"version": 3,\n"ids": {\n'
        '"100": { "node": "pve1", "type": "qemu", "version": 1 },\n'
        '"101": { "node": "pve2", "type": "qemu", "version": 2 }}\n\n}\n'
    )
    conf = pve.dirs.tree / "nodes" / "pve1" / "qemu-server" / "100.conf"
    assert "name: web\n" in conf.read_text()
    pve.start_vm(100)
    pve.migrate(100, "pve3")
    # The moved entry is re-inserted: a new entry version, and the global one bumped.
    assert json.loads(vmlist_text(pve))["ids"]["100"] == {
        "node": "pve3",
        "type": "qemu",
        "version": 3,
    }
    assert json.loads(vmlist_text(pve))["version"] == 4
    pve.destroy_vm(101)
    assert "101" not in json.loads(vmlist_text(pve))["ids"]
    pve.create_ct("pve2", 103, "box")
    assert '"103": { "node": "pve2", "type": "lxc", "version": 4 }' in vmlist_text(pve)
    assert pve.tree.vmlist() == {100: "pve3"} and pve.tree.vmlist("lxc") == {103: "pve2"}


def test_each_node_sees_the_shared_tree_and_its_own_name(pve_lab: Lab) -> None:
    pve = cluster(pve_lab)
    pve.create_vm("pve2", 100, "web")
    for name, host in pve.nodes.items():
        out = host.ssh("hostname; cat /etc/pve/.members; cat /etc/pve/.vmlist").stdout
        hostname, rest = out.split("\n", 1)
        assert hostname == name
        members = json.loads(rest[: rest.index("}\n}\n") + 4])
        assert members["nodename"] == name
        assert sorted(members["nodelist"]) == ["pve1", "pve2", "pve3"]
        assert '"100": { "node": "pve2"' in rest


def test_vm_process_holds_proxmox_kvm_command_line(pve_lab: Lab) -> None:
    pve = cluster(pve_lab)
    pve.create_vm("pve1", 100, "web")
    pid = pve.start_vm(100)
    host = pve.node("pve1")
    options = pve.tree.read_conf(100)[1]
    assert host.cmdline(pid) == kvm_argv(100, options, real_qemu=False, accel="kvm")
    out = host.ssh(
        f"cat /proc/{pid}/comm /var/run/qemu-server/100.pid; "
        "test -S /var/run/qemu-server/100.qmp && echo qmp"
    ).stdout
    assert out == f"kvm\n{pid}\nqmp\n"
    # The run directory is the node's own.
    assert pve.node("pve2").ssh("ls /var/run/qemu-server").stdout == ""


def test_real_qemu_vm_without_id(pve_lab: Lab) -> None:
    if not shutil.which("qemu-system-x86_64"):
        skip_without("no qemu-system-x86_64")
    pve = cluster(pve_lab)
    pve.create_vm("pve1", 102, "real", real_qemu=True)
    pid = pve.start_vm(102)
    host = pve.node("pve1")
    argv = host.cmdline(pid)
    assert argv[0] == "/usr/bin/qemu-system-x86_64" and "-id" not in argv
    assert argv[argv.index("-pidfile") + 1] == "/var/run/qemu-server/102.pid"
    assert host.vm_pids() == {102: pid}
    assert host.kill_vm(102) and not host.pid_alive(pid)


def test_qm_outputs_and_errors(pve_lab: Lab) -> None:
    pve = cluster(pve_lab)
    host = pve.node("pve1")
    assert host.qm("list") == ""
    pve.create_vm("pve1", 100, "web")
    pve.create_vm("pve1", 101, None)
    assert host.qm("start", "100") == ""
    pid = host.vm_pids()[100]
    assert host.qm("list") == (
        "      VMID NAME                 STATUS     MEM(MB)    BOOTDISK(GB) PID       \n"
        f"       100 web                  running    512                0.00 {pid:<10}\n"
        "       101 VM 101               stopped    512                0.00 0         \n"
    )
    assert host.qm("status", "100") == "status: running\n"
    again = host.ssh("qm start 100", check=False)
    assert again.returncode == 255 and "VM 100 already running" in again.stderr
    foreign = pve.node("pve2").ssh("qm status 100", check=False)
    assert foreign.returncode == 255 and "does not exist" in foreign.stderr
    pve.tree.set_option(100, "lock", "backup")
    locked = host.ssh("qm stop 100", check=False)
    assert locked.returncode == 255 and "VM is locked (backup)" in locked.stderr
    assert host.qm("stop", "100", "--skiplock") == ""
    assert host.vm_pids() == {} and not host.pid_alive(pid)
    assert host.ssh("ls /var/run/qemu-server").stdout == ""


def test_ha_restarts_a_killed_started_vm_and_keeps_a_stopped_one_off(pve_lab: Lab) -> None:
    pve = cluster(pve_lab)
    host = pve.node("pve1")
    pve.create_vm("pve1", 100, "web")
    first = pve.start_vm(100)
    assert host.ssh("ha-manager add vm:100").returncode == 0
    host.kill_vm(100)
    assert wait_for(lambda: host.vm_pids().get(100, first) != first, 10)
    second = host.vm_pids()[100]
    # qm stop of an HA VM only asks the CRM: the VM stops a round later, and stays stopped.
    assert host.qm("stop", "100") == "Requesting HA stop for VM 100\n"
    assert wait_for(lambda: 100 not in host.vm_pids(), 10)
    assert not host.pid_alive(second)
    assert pve.tree.ha_state(100) == "stopped"
    rounds = host.ha_rounds()
    assert wait_for(lambda: host.ha_rounds() >= rounds + 2, 10)
    assert 100 not in host.vm_pids()
    status = host.ssh("ha-manager status").stdout
    assert "service vm:100 (pve1, stopped)" in status
    assert (
        json.loads((pve.dirs.tree / "ha" / "manager_status").read_text())["service_status"][
            "vm:100"
        ]["state"]
        == "stopped"
    )


def test_migration_runs_the_vmid_on_both_nodes_for_a_moment(pve_lab: Lab) -> None:
    pve = cluster(pve_lab)
    pve.create_vm("pve1", 100, "web")
    source = pve.start_vm(100)
    target = pve.begin_migration(100, "pve2")
    assert pve.node("pve1").vm_pids() == {100: source}
    assert pve.node("pve2").vm_pids() == {100: target}
    assert pve.tree.vmlist()[100] == "pve1"
    assert pve.tree.read_conf(100)[1]["lock"] == "migrate"
    pve.finish_migration(100, "pve2")
    assert pve.node("pve1").vm_pids() == {}
    assert pve.tree.vmlist()[100] == "pve2"
    assert "lock" not in pve.tree.read_conf(100)[1]


def test_rename_changes_the_config_not_the_process(pve_lab: Lab) -> None:
    pve = cluster(pve_lab)
    pve.create_vm("pve1", 100, "web")
    pid = pve.start_vm(100)
    pve.rename(100, "shop")
    host = pve.node("pve1")
    assert "100 shop " in host.qm("list")
    argv = host.cmdline(pid)
    assert argv[argv.index("-name") + 1] == "web"


def test_vmid_reused_after_destroy_on_another_node(pve_lab: Lab) -> None:
    pve = cluster(pve_lab)
    pve.create_vm("pve1", 100, "old")
    old = pve.start_vm(100)
    pve.destroy_vm(100)
    assert not pve.node("pve1").pid_alive(old)
    pve.create_vm("pve2", 100, "new")
    new = pve.start_vm(100)
    assert pve.node("pve2").vm_pids() == {100: new}
    assert pve.tree.vmlist() == {100: "pve2"}


def test_node_power_off_and_cut(pve_lab: Lab) -> None:
    pve = cluster(pve_lab)
    pve.create_vm("pve3", 100, "web")
    pve.start_vm(100)
    pve.cut("pve3")
    assert pve.node("pve3").ssh("true", check=False).returncode == 255
    assert pve.node("pve3").vm_pids() != {}  # its VMs run on
    pve.restore("pve3")
    assert pve.node("pve3").ssh("true").returncode == 0
    pve.power_off("pve2")
    members = json.loads(pve.node("pve1").ssh("cat /etc/pve/.members").stdout)
    assert members["nodelist"]["pve2"]["online"] == 0
    assert members["cluster"]["quorate"] == 1  # two of three
    pve.power_off("pve3")
    # Without quorum the tree refuses changes: no HA command goes through.
    refused = pve.node("pve1").ssh("ha-manager add vm:100", check=False)
    assert refused.returncode == 255 and "no quorum" in refused.stderr


def test_fence_pve_against_the_api_stand_in(pve_lab: Lab) -> None:
    skip_without(fence_pve_unavailable())
    pve = cluster(pve_lab)
    pve.create_vm("pve1", 100, "web")
    pve.create_vm("pve2", 101, "db")
    pve.start_vm(100)
    first = pve.start_vm(101)
    with PveApi(pve, pve_lab.workdir / "api", local="pve1", costs=NO_COSTS) as api:

        def run(
            vmid: int, action: str, node: str | None = None
        ) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                api.argv(vmid, action, node=node),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        assert run(101, "status").stdout == "Status: ON\n"
        api.calls.clear()
        off = run(101, "off")
        assert off.returncode == 0, off.stderr
        assert not pve.node("pve2").pid_alive(first) and pve.node("pve2").vm_pids() == {}
        # Login, then the listing of every node and every VM, then the search for the VM's
        # node, the stop and the polls.
        assert api.calls[:4] == [
            "POST /api2/json/access/ticket",
            "GET /api2/json/nodes",
            "GET /api2/json/nodes/pve1/qemu",
            "GET /api2/json/nodes/pve2/qemu",
        ]
        assert "POST /api2/json/nodes/pve2/qemu/101/status/stop" in api.calls
        assert run(101, "on").returncode == 0
        assert 101 in pve.node("pve2").vm_pids()
        # An HA VM: the API queues an HA stop and the HA stand-in carries it out.
        pve.set_ha(100, "started")
        assert run(100, "off", node="pve1").returncode == 0
        assert pve.node("pve1").vm_pids() == {} and pve.tree.ha_state(100) == "stopped"
        # Its node gone, fence_pve cannot obtain the status: it fails.
        pve.power_off("pve2")
        down = run(101, "off")
        assert down.returncode == 1 and "Unable to obtain correct plug status" in down.stderr
        argv = api.argv(100, "status")
        argv[argv.index("--password") + 1] = "wrong"
        wrong = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert wrong.returncode != 0 and "POST /api2/json/nodes" not in " ".join(api.calls[-1:])


def test_proxmox_bench_quick() -> None:
    """bench/proxmox.py still runs (its figures are read by people, not asserted)."""
    out = quick("proxmox.py", missing=fence_pve_unavailable())
    for row in ("fence_pve -o off", "fence_vmfenced -o off", "fence_pve -o off, HA VM"):
        assert f"| {row} | 3 |" in out, out
    assert "| fence_pve -o off / fence_vmfenced -o off |" in out


def test_run_files_cleaned_up_after_a_vm_dies(pve_lab: Lab) -> None:
    """As qmeventd runs `qm cleanup`: a VM killed from outside loses its pid file shortly after,
    while one that is started again keeps the new one."""
    pve = cluster(pve_lab)
    pve.create_vm("pve1", 100, "web")
    host = pve.node("pve1")
    pid = pve.start_vm(100)
    host.ssh(f"kill -9 {pid}")
    gone = (
        "test -e /var/run/qemu-server/100.pid || test -e /var/run/qemu-server/100.qmp || echo gone"
    )
    assert wait_for(lambda: host.ssh(gone).stdout == "gone\n", 10)
    assert host.vm_pids() == {}
    again = pve.start_vm(100)
    assert host.vm_pids() == {100: again}
