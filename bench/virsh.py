"""vmfenced against fence_virsh on the same real VMs, in one run: `python3 bench/virsh.py [--quick]
[-n N] [--no-pacemaker]`.

A lab of two libvirt hosts (kvm1, kvm2: real sshd, libvirtd and qemu microvm VMs, KVM when
usable, else TCG). Alternately, on the same VMs (powered on again between off runs, outside the
timed part):
- `fence_virsh` (Debian's fence-agents, /usr/sbin) as a new process: it logs into the libvirt
  host as root over the lab's sshd and runs `virsh` there, what it does under Pacemaker;
- `fence_vmfenced` as a new process, against a real vmfenced daemon configured with those hosts;
- the daemon-side fence (`elapsed_ms` of the reply: socket request to confirmed death).
Then the Pacemaker path (unless --no-pacemaker): a 2-node cluster on two of those VMs with two
stonith devices, one per agent, and `stonith_admin --reboot NODE` timed through each.
Prints Markdown tables of medians, p95 and ratios. Not a test: no assertion on time.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import vmfenced
from vmfenced.clients.agent_install import install
from vmflab import Lab, LibvirtHost
from vmflab.cluster import Cluster
from vmflab.cluster.config import agent_wrapper, host_map
from vmflab.cluster.vm import LibvirtLabVm, NodeVm
from vmflab.daemon import LabDaemon
from vmflab.stats import percentile

HOSTS = ("kvm1", "kvm2")
VMS = {"bench-vm1": "kvm1", "bench-vm2": "kvm2"}
FENCE_VIRSH = "/usr/sbin/fence_virsh"
# fence_virsh's own default ssh options (a bash with a prompt it can expect), with host keys
# checked against the lab's known_hosts like every other client of the lab.
VIRSH_SHELL = "-t '/bin/bash -c \"PS1=\\\\[EXPECT\\\\]# /bin/bash --noprofile --norc\"'"
WAIT_S = 30.0
DAEMON_SIDE = "daemon: fence off, daemon-side (socket request to confirmed death)"

# The cluster: node2 is the one fenced, from node1; node3 keeps quorum while node2 is down.
PCMK_NODES = {"node1": "pcmk-vm1", "node2": "pcmk-vm2", "node3": "pcmk-vm3"}
PCMK_HOSTS = {"pcmk-vm1": "kvm1", "pcmk-vm2": "kvm2", "pcmk-vm3": "kvm1"}
TARGET = "node2"
VMFENCED_AGENT = "fence_vmfenced"
# fence_virsh itself, run in the network namespace where the lab hypervisors' sshd listens
# (a cluster node has its own network stack; the daemon, like the hypervisors, lives outside).
VIRSH_AGENT = "fence_virsh_labnet"
DEVICES = {"fence_virsh": "dev-virsh", "fence_vmfenced": "dev-vmfenced"}
REBOOT_TIMEOUT_S = 60

Rows = dict[str, list[float]]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not after {timeout} s: {what}")
        time.sleep(0.05)  # polling a condition with a deadline


def timed_run(argv: list[str], stdin: str | None, expect: int) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    elapsed = (time.perf_counter() - start) * 1000
    if done.returncode != expect:
        raise RuntimeError(
            f"{argv[0]} exited {done.returncode}, not {expect}: {done.stderr.strip()[-800:]}"
        )
    return elapsed


def virsh_argv(lab: Lab, host: LibvirtHost, vm: str, action: str) -> list[str]:
    ssh_options = (
        f"-o UserKnownHostsFile={lab.known_hosts} -o StrictHostKeyChecking=yes "
        f"-o BatchMode=yes {VIRSH_SHELL}"
    )
    return [
        *(FENCE_VIRSH, "--ssh", "--ip", host.address, "--ipport", str(host.port)),
        *("--username", "root", "--identity-file", str(lab.client_key)),
        f"--ssh-options={ssh_options}",
        *("--plug", vm, "--action", action),
    ]


def agent_stdin(daemon: LabDaemon, vm: str, action: str) -> str:
    return f"action={action}\nplug={vm}\nnodename={vm}\nsocket={daemon.socket}\n"


def mapped_pid(daemon: LabDaemon, vm: str) -> int | None:
    for entry in daemon.status()["vms"]:
        if entry["name"] == vm and entry["state"] == "on":
            cartel = entry["cartel"]
            return int(cartel) if cartel is not None else None
    return None


def power_on(lab: Lab, daemon: LabDaemon, vm: str) -> None:
    """Starts ``vm`` again and waits until the daemon's map has its new qemu PID, so that
    every off run starts from the same state: VM running, daemon up to date."""
    host = lab.libvirt[VMS[vm]]
    if vm not in host.vm_pids():
        # libvirtd notices a kill -9 a moment after the process is gone.
        wait_for(lambda: host.domstate(vm).startswith("shut off"), f"{vm} shut off")
        host.start_vm(vm)
    pid = host.vm_pids()[vm]
    wait_for(lambda: mapped_pid(daemon, vm) == pid, f"daemon maps {vm} to qemu {pid}")


def check_off(lab: Lab, vm: str) -> None:
    host = lab.libvirt[VMS[vm]]
    if vm in host.vm_pids():
        raise RuntimeError(f"{vm} still runs on {host.name} after a successful off")


FAST_FLOOR = "python3 -IS -c pass (the installed agent's interpreter floor)"


def agents(lab: Lab, daemon: LabDaemon, n: int, agent: list[str]) -> Rows:
    """off and status through both agents, and the daemon-side fence, alternating on the VMs.
    `agent` is fence_vmfenced as installed (`python3 -m vmfenced.clients.agent_install`)."""
    rows: Rows = {}

    def add(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)

    names = list(VMS)
    for i in range(n):
        vm = names[i % len(names)]
        host = lab.libvirt[VMS[vm]]
        power_on(lab, daemon, vm)
        add("fence_virsh -o status", timed_run(virsh_argv(lab, host, vm, "status"), None, 0))
        add("fence_vmfenced -o status", timed_run(agent, agent_stdin(daemon, vm, "status"), 0))

        add("fence_virsh -o off", timed_run(virsh_argv(lab, host, vm, "off"), None, 0))
        check_off(lab, vm)
        power_on(lab, daemon, vm)
        add("fence_vmfenced -o off", timed_run(agent, agent_stdin(daemon, vm, "off"), 0))
        check_off(lab, vm)

        power_on(lab, daemon, vm)
        start = time.perf_counter()
        reply = daemon.request({"op": "fence", "vm": vm, "action": "off"})
        around = (time.perf_counter() - start) * 1000
        if not reply["ok"] or reply["result"]["outcome"] != "killed":
            raise RuntimeError(f"{vm}: {reply}")
        check_off(lab, vm)
        add(DAEMON_SIDE, float(reply["result"]["elapsed_ms"]))
        add("daemon: fence off, client round trip over the socket", around)
        add(
            "python3 -c pass (interpreter floor)",
            timed_run([sys.executable, "-c", "pass"], None, 0),
        )
        add(FAST_FLOOR, timed_run([sys.executable, "-IS", "-c", "pass"], None, 0))
    return rows


def labnet_wrapper(netns: Path) -> str:
    """The node's fencer runs agents as root: fence_virsh then joins the lab's network. Its
    controller asks for metadata as hacluster, which needs no network."""
    return (
        "#!/bin/sh\n"
        "# vmflab bench: fence_virsh in the network namespace of the lab's hypervisors\n"
        'if [ "$(id -u)" = 0 ]; then\n'
        f'    exec nsenter --net={netns} -- /usr/sbin/fence_virsh "$@"\n'
        "fi\n"
        'exec /usr/sbin/fence_virsh "$@"\n'
    )


def device_params(lab: Lab, daemon: LabDaemon, agent: str) -> tuple[str, dict[str, str]]:
    """(agent type, parameters) of the device of ``agent`` for the target node's VM."""
    vm = PCMK_NODES[TARGET]
    if agent == "fence_vmfenced":
        return VMFENCED_AGENT, {
            "pcmk_host_map": host_map(PCMK_NODES),
            "pcmk_reboot_action": "off",
            "socket": str(daemon.socket),
        }
    # fence_virsh logs into one hypervisor: one device per host, here the target's.
    host = lab.libvirt[PCMK_HOSTS[vm]]
    ssh_options = (
        f"-o UserKnownHostsFile={lab.known_hosts} -o StrictHostKeyChecking=yes "
        f"-o BatchMode=yes {VIRSH_SHELL}"
    )
    return VIRSH_AGENT, {
        "pcmk_host_map": host_map({TARGET: vm}),
        "pcmk_reboot_action": "off",
        "ipaddr": host.address,
        "ipport": str(host.port),
        "login": "root",
        "identity_file": str(lab.client_key),
        "secure": "1",
        "ssh_options": ssh_options,
    }


def devices_for(cluster: Cluster, via: str) -> set[str]:
    done = cluster.run(via, ["stonith_admin", "--list", TARGET], timeout=30, check=False)
    return {line.strip() for line in done.stdout.splitlines() if line.strip() in DEVICES.values()}


def only_device(cluster: Cluster, via: str, device: str) -> bool:
    return devices_for(cluster, via) == {device}


def activate(cluster: Cluster, lab: Lab, daemon: LabDaemon, agent: str, active: str | None) -> None:
    """Leaves exactly the device of ``agent`` able to fence the target, on every node."""
    if active is not None:
        xml = f'<primitive id="{DEVICES[active]}"/>'
        cluster.run("node1", ["cibadmin", "--delete", "--scope", "resources", "--xml-text", xml])
    kind, params = device_params(lab, daemon, agent)
    cluster.add_stonith_device(DEVICES[agent], kind, params, via="node1")
    for node in PCMK_NODES:
        wait_for(partial(only_device, cluster, node, DEVICES[agent]), f"{agent} on {node}")


def log_ms(line: str) -> float:
    """Milliseconds since midnight of a pacemaker.log line (``Nov 24 22:33:07.668 node1 ...``)."""
    hours, minutes, seconds = line.split()[2].split(":")
    return ((int(hours) * 60 + int(minutes)) * 60 + float(seconds)) * 1000


def log_lines(cluster: Cluster, nodes: list[str], pattern: re.Pattern[str]) -> list[str]:
    found = []
    for node in nodes:
        text = (cluster.supervisor(node).dirs.log / "pacemaker.log").read_text(errors="replace")
        found += [line for line in text.splitlines() if pattern.search(line)]
    if not found:
        raise RuntimeError(f"no {pattern.pattern!r} in the pacemaker logs")
    return sorted(found, key=log_ms)


def agent_ms(cluster: Cluster, device: str) -> float:
    """How long the fencer's agent run took for the last ``stonith_admin``: from the request
    to the executing node to that node's "returned 0" (one clock: every node runs here)."""
    nodes = list(PCMK_NODES)
    wants = log_lines(cluster, ["node1"], re.compile(r"Client stonith_admin\.\d+ wants to fence"))
    client = re.escape(wants[-1].split("Client ", 1)[1].split()[0])
    asked = log_lines(cluster, nodes, re.compile(rf"Requesting that \S+ perform .* {client}\b"))
    done = log_lines(
        cluster,
        nodes,
        re.compile(rf"targeting {TARGET} using {device} returned 0 \| call \d+ from {client}\b"),
    )
    return (log_ms(done[-1]) - log_ms(asked[-1])) % 86_400_000


def reboot_once(cluster: Cluster, vms: dict[str, NodeVm], agent: str, rows: Rows) -> None:
    cluster.wait_online(PCMK_NODES, via="node1", timeout=120)
    before = vms[TARGET].process()
    argv = ["stonith_admin", "--reboot", TARGET, "--timeout", str(REBOOT_TIMEOUT_S)]
    start = time.perf_counter()
    cluster.run("node1", argv, timeout=REBOOT_TIMEOUT_S + 30)
    elapsed = (time.perf_counter() - start) * 1000
    wait_for(lambda: vms[TARGET].process() is None, f"{TARGET}'s VM {before} is off")
    # The DC may have seen the node leave before the fence was recorded, and fence it once
    # more itself: power on only once the node is offline and clean.
    cluster.wait_view(
        "node1",
        lambda v: TARGET in v.nodes and not v.nodes[TARGET].online and not v.nodes[TARGET].unclean,
        timeout=60,
        what=f"{TARGET} offline and clean",
    )
    rows.setdefault(f"stonith_admin --reboot via {agent}", []).append(elapsed)
    rows.setdefault(f"{agent} off inside the fencer", []).append(agent_ms(cluster, DEVICES[agent]))
    # Powered on only now: a node back before the cluster has recorded its fence would take
    # the fence notification for itself and shut Pacemaker down for good.
    vms[TARGET].power_on()


def pacemaker_rows(lab: Lab, daemon: LabDaemon, workdir: Path, n: int) -> Rows:
    """``stonith_admin --reboot`` of the same node, alternating the device that may fence it."""
    vms: dict[str, NodeVm] = {}
    for node, vm in PCMK_NODES.items():
        host = lab.libvirt[PCMK_HOSTS[vm]]
        host.start_vm(vm)
        vms[node] = LibvirtLabVm(host, vm)
    workdir.mkdir(parents=True)
    netns = workdir / "labnet"
    netns.touch()
    subprocess.run(["mount", "--bind", "/proc/self/ns/net", str(netns)], check=True)
    rows: Rows = {}
    try:
        wrapper = agent_wrapper("vmfenced.clients.agent", [sys.executable, "/usr/bin/python3"])
        with Cluster(
            workdir / "cluster",
            vms,
            agents={VMFENCED_AGENT: wrapper, VIRSH_AGENT: labnet_wrapper(netns)},
            python_dir=Path(vmfenced.__file__).resolve().parents[1],
        ) as cluster:
            active: str | None = None
            for _ in range(n):
                for agent in DEVICES:
                    cluster.wait_online(PCMK_NODES, via="node1", timeout=120)
                    activate(cluster, lab, daemon, agent, active)
                    active = agent
                    reboot_once(cluster, vms, agent, rows)
            cluster.wait_online(PCMK_NODES, via="node1", timeout=120)
    finally:
        subprocess.run(["umount", str(netns)], check=False)
    return rows


def table(title: str, rows: Rows, pairs: list[tuple[str, str]]) -> str:
    """Markdown: every row's median and p95, then ``slow / fast`` ratios of medians."""
    lines = [
        f"\n### {title}\n",
        "| what | runs | median ms | p95 ms |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, values in rows.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {len(values)} | {median:.2f} | {percentile(values, 0.95):.2f} |")
    if pairs:
        lines += ["", "| ratio of medians | value |", "| --- | ---: |"]
        for slow, fast in pairs:
            ratio = statistics.median(rows[slow]) / statistics.median(rows[fast])
            lines.append(f"| {slow} / {fast} | {ratio:.1f}x |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=20, help="runs per agent and action (default 20)")
    parser.add_argument("--quick", action="store_true", help="3 of each: proves it still runs")
    parser.add_argument(
        "--no-pacemaker", action="store_true", help="skip the stonith_admin --reboot part"
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep the lab and cluster files (logs) here, not in /tmp"
    )
    args = parser.parse_args()
    n = 3 if args.quick else args.n
    if n < 1:
        parser.error("-n must be at least 1")
    with contextlib.ExitStack() as stack:
        if args.workdir:
            tmp = str(args.workdir.resolve())
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="vmf-virsh-"))
        lab = Lab(Path(tmp) / "lab", host_names=(), libvirt_hosts=HOSTS)
        with lab:
            accel = lab.libvirt[HOSTS[0]].accel
            for vm, host in VMS.items():
                lab.libvirt[host].start_vm(vm)
            print(f"\nqemu microvm VMs ({accel}) on 2 libvirt hosts, same sshd for both agents")
            with LabDaemon(lab, hosts=list(HOSTS), daemon={"inventory_interval": 1}) as daemon:
                agent = [str(install(Path(tmp) / "fence_vmfenced"))]
                rows = agents(lab, daemon, n, agent)
                title = "Agents as Pacemaker runs them (new process each), and the daemon"
                pairs = [
                    ("fence_virsh -o off", "fence_vmfenced -o off"),
                    ("fence_virsh -o status", "fence_vmfenced -o status"),
                    ("fence_vmfenced -o off", "python3 -c pass (interpreter floor)"),
                    ("fence_vmfenced -o off", FAST_FLOOR),
                ]
                print(table(title, rows, pairs), flush=True)
                if not args.no_pacemaker:
                    pcmk = pacemaker_rows(lab, daemon, Path(tmp) / "pacemaker", n)
                    title = (
                        "Pacemaker: stonith_admin --reboot NODE through each device "
                        "(pcmk_reboot_action=off; VM powered on after, untimed)"
                    )
                    via = "stonith_admin --reboot via "
                    pairs = [
                        (via + "fence_virsh", via + "fence_vmfenced"),
                        (
                            "fence_virsh off inside the fencer",
                            "fence_vmfenced off inside the fencer",
                        ),
                    ]
                    print(table(title, pcmk, pairs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
