"""vmfenced against fence_pve on the same lab Proxmox VE VMs, in one run: `python3
bench/proxmox.py [--quick] [-n N] [--ha-round S]`.

A lab of three Proxmox nodes (pve1..pve3: real sshd, one shared /etc/pve, VMs holding
Proxmox's exact kvm command line, `qm`/`ha-manager` paying a Perl start-up, the HA stand-in
acting every --ha-round seconds, Proxmox's own 10 by default). Alternately, on the same VMs
(powered on again between off runs, outside the timed part):
- `fence_pve` (Debian's fence-agents, /usr/sbin) as a new process against the lab's API
  stand-in (vmflab.pve_api: HTTPS, the endpoints fence_pve calls, chosen per-call costs), what
  it does under Pacemaker: log in, list every node and VM, find the VM's node (or be told it),
  stop, poll the status once a second;
- `fence_vmfenced` as a new process, against a real vmfenced daemon configured with the nodes;
- for an HA-managed VM (state started) the same two: fence_pve's stop becomes an HA request
  that the HA stack carries out on its next round; vmfenced kills first, then asks the HA stack
  to keep it stopped.
Then the stand-ins' own costs. Prints Markdown tables of medians, p95 and ratios. Not a test:
no assertion on time.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shlex
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

if not __package__:  # run as `python3 bench/proxmox.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.virsh import FAST_FLOOR, Rows, agent_stdin, table, timed_run, wait_for
from vmfenced.clients.agent_install import install
from vmflab import Lab
from vmflab.daemon import LabDaemon
from vmflab.proxmox import ProxmoxCluster
from vmflab.proxmox_files import PERL_MODULES
from vmflab.pve_api import ApiCosts, PveApi

NODES = ("pve1", "pve2", "pve3")
# name -> (VMID, node); the HA one is HA-managed (state started).
VMS = {"bench-web": (100, "pve2"), "bench-db": (101, "pve3")}
HA_VM, HA_VMID, HA_NODE = "bench-ha", 102, "pve3"
WAIT_S = 60.0


def mapped_pid(daemon: LabDaemon, vm: str) -> int | None:
    for entry in daemon.status()["vms"]:
        if entry["name"] == vm and entry["state"] == "on" and entry["cartel"] is not None:
            return int(entry["cartel"])
    return None


def power_on(pve: ProxmoxCluster, daemon: LabDaemon, vm: str, vmid: int, node: str) -> None:
    """The VM running again and the daemon's map up to date, so every off run starts from
    the same state."""
    host = pve.node(node)
    if vmid == HA_VMID:
        pve.set_ha(vmid, "started")
        wait_for(lambda: vmid in host.vm_pids(), f"the HA stack starts {vm}", WAIT_S)
    elif vmid not in host.vm_pids():
        host.start_vm(vmid)
    pid = host.vm_pids()[vmid]
    wait_for(lambda: mapped_pid(daemon, vm) == pid, f"daemon maps {vm} to kvm {pid}")


def check_off(pve: ProxmoxCluster, vm: str, vmid: int, node: str) -> None:
    if vmid in pve.node(node).vm_pids():
        raise RuntimeError(f"{vm} still runs on {node} after a successful off")


def agents(pve: ProxmoxCluster, api: PveApi, daemon: LabDaemon, n: int, agent: list[str]) -> Rows:
    rows: Rows = {}

    def add(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)

    names = list(VMS)
    for i in range(n):
        vm = names[i % len(names)]
        vmid, node = VMS[vm]
        power_on(pve, daemon, vm, vmid, node)
        add("fence_pve -o status", timed_run(api.argv(vmid, "status"), None, 0))
        add("fence_vmfenced -o status", timed_run(agent, agent_stdin(daemon, vm, "status"), 0))
        add("fence_pve -o off", timed_run(api.argv(vmid, "off"), None, 0))
        check_off(pve, vm, vmid, node)
        power_on(pve, daemon, vm, vmid, node)
        add(
            "fence_pve -o off --pve-node (node given)",
            timed_run(api.argv(vmid, "off", node=node), None, 0),
        )
        check_off(pve, vm, vmid, node)
        power_on(pve, daemon, vm, vmid, node)
        add("fence_vmfenced -o off", timed_run(agent, agent_stdin(daemon, vm, "off"), 0))
        check_off(pve, vm, vmid, node)
        add(FAST_FLOOR, timed_run([sys.executable, "-IS", "-c", "pass"], None, 0))
    return rows


def settled(pve: ProxmoxCluster, seen: set[int]) -> bool:
    """The HA VM is stopped for good; ``seen`` collects every PID it ran under meanwhile."""
    pids = pve.node(HA_NODE).vm_pids()
    seen.update(pids.values())
    return pve.tree.ha_state(HA_VMID) == "stopped" and HA_VMID not in pids


def ha_rows(
    pve: ProxmoxCluster, api: PveApi, daemon: LabDaemon, n: int, agent: list[str]
) -> tuple[Rows, int]:
    """off of the HA VM: fence_pve returns once the HA stack has stopped it; vmfenced kills,
    then has the HA stack keep it stopped. Also returns how many of vmfenced's kills the HA
    stack undid for a while (the VM started again before its next round carried out the stop,
    then stopped again)."""
    rows: Rows = {}
    restarts = 0
    for _ in range(n):
        power_on(pve, daemon, HA_VM, HA_VMID, HA_NODE)
        elapsed = timed_run(api.argv(HA_VMID, "off"), None, 0)
        rows.setdefault("fence_pve -o off, HA VM", []).append(elapsed)
        check_off(pve, HA_VM, HA_VMID, HA_NODE)
        power_on(pve, daemon, HA_VM, HA_VMID, HA_NODE)
        # power_on returns just after the node's LRM round that started the VM: without this
        # the kill would always fall early in that node's round, and the CRM's round would
        # nearly always come first. Not a synchronisation: it spreads the kills over the round.
        time.sleep(random.uniform(0, pve.ha_round))
        elapsed = timed_run(agent, agent_stdin(daemon, HA_VM, "off"), 0)
        rows.setdefault("fence_vmfenced -o off, HA VM", []).append(elapsed)
        seen: set[int] = set()
        wait_for(partial(settled, pve, seen), "HA state stopped and the VM off", WAIT_S)
        restarts += bool(seen)
    return rows, restarts


def stand_in_rows(pve: ProxmoxCluster, n: int) -> Rows:
    """What the stand-ins cost: over a new SSH connection each, as an admin runs them."""
    rows: Rows = {}
    host = pve.node("pve2")
    perl = ["perl", *(f"-M{m}" for m in PERL_MODULES), "-e", "1"]
    for _ in range(n):
        for label, command in (
            ("ssh pve2 true (SSH floor)", "true"),
            ("ssh pve2 qm status 100", "qm status 100"),
            ("ssh pve2 ha-manager status", "ha-manager status"),
        ):
            rows.setdefault(label, []).append(timed_run(host.ssh_argv(command), None, 0))
        perl_row = f"{shlex.join(perl[:2])} ... ({len(PERL_MODULES)} core modules) -e 1"
        rows.setdefault(perl_row, []).append(timed_run(perl, None, 0))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=20, help="runs per agent and action (default 20)")
    parser.add_argument("--quick", action="store_true", help="3 of each: proves it still runs")
    parser.add_argument(
        "--ha-round", type=float, help="HA round in seconds (default 10 as Proxmox; --quick: 1)"
    )
    parser.add_argument("--workdir", type=Path, help="keep the lab's files here, not in /tmp")
    args = parser.parse_args()
    n = 3 if args.quick else args.n
    if n < 1:
        parser.error("-n must be at least 1")
    ha_round = args.ha_round or (1.0 if args.quick else 10.0)
    with contextlib.ExitStack() as stack:
        if args.workdir:
            tmp = str(args.workdir.resolve())
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="vmf-pve-"))
        lab = stack.enter_context(
            Lab(Path(tmp) / "lab", host_names=(), proxmox_hosts=NODES, pve_ha_round=ha_round)
        )
        pve = lab.pve
        if pve is None:
            raise RuntimeError("the lab has no Proxmox nodes")
        for vm, (vmid, node) in {**VMS, HA_VM: (HA_VMID, HA_NODE)}.items():
            pve.create_vm(node, vmid, vm)
            pve.start_vm(vmid)
        pve.set_ha(HA_VMID, "started")
        costs = ApiCosts()
        api = stack.enter_context(PveApi(pve, Path(tmp) / "api", local="pve1", costs=costs))
        daemon = stack.enter_context(
            LabDaemon(lab, hosts=list(NODES), daemon={"inventory_interval": 1})
        )
        agent = [str(install(Path(tmp) / "fence_vmfenced"))]
        print(
            f"\n3 lab Proxmox nodes, kvm stand-in VMs; fence_pve against the API stand-in on "
            f"pve1 (per call: {costs.request * 1000:g} ms, login {costs.ticket * 1000:g} ms, "
            f"proxied {costs.proxy * 1000:g} ms, task fork {costs.worker * 1000:g} ms; TLS real); "
            f"HA round {ha_round:g} s"
        )
        rows = agents(pve, api, daemon, n, agent)
        pairs = [
            ("fence_pve -o off", "fence_vmfenced -o off"),
            ("fence_pve -o off --pve-node (node given)", "fence_vmfenced -o off"),
            ("fence_pve -o status", "fence_vmfenced -o status"),
        ]
        title = "Agents as Pacemaker runs them (new process each), VMs without HA"
        print(table(title, rows, pairs), flush=True)
        runs = max(1, min(n, 5))
        ha, restarts = ha_rows(pve, api, daemon, runs, agent)
        pairs = [("fence_pve -o off, HA VM", "fence_vmfenced -o off, HA VM")]
        print(table(f"An HA-managed VM (HA round {ha_round:g} s)", ha, pairs), flush=True)
        print(
            f"\nvmfenced's kill undone for a while by the HA stack (started again before it "
            f"carried out the stop): {restarts} of {runs}"
        )
        calls = [c for c in api.calls if not c.startswith("TASK")]
        print(f"\nAPI calls made by fence_pve in this run: {len(calls)}")
        title = "The lab's stand-ins (each over a new SSH connection)"
        print(table(title, stand_in_rows(pve, n), []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
