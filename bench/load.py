"""Fence latency under load, against the same lab idle, in one run:
`python3 bench/load.py [--quick] [-n N] [--busy-per-host K] [--no-agent]`.

3 ESXi lab hosts (real sshd, real VM processes). On each host K busy VMs (default 4, at least
2 x the machine's cores in all): their vmx process spins on a CPU instead of sleeping
(`LabHost.start_vm(name, busy=True)`). They stand in for guests under real load (a dovecot IMAP
load, say, which is not reproduced here): what competes with the daemon, sshd and the shell
for the CPUs is the same, the hosts' own VM processes. Idle VMs on the same hosts are fenced
one after the other, in blocks that alternate between the idle lab (busy VMs SIGSTOPped) and
the loaded lab (SIGCONTed): both phases have the same VMs, the same process tables and the same
daemon, and differ only in CPU load; alternating blocks spreads the drift of anything else
running on the machine over both. Measured per fence: the daemon-side `elapsed_ms` (request to
confirmed death), the client round trip over the socket, and (unless --no-agent)
`fence_vmfenced -o off` as a new process, installed as for Pacemaker, next to the bare
interpreter start it pays (`python3 -IS -c pass`). Prints p50, p95, p99 of each phase, the
loaded / idle ratios, and how busy the CPUs were in each phase. Pessimistic for ESXi: there the
host's sshd and shells run in the system resource pool, with a CPU reservation, apart from the
VMs' worlds; here every process has the same weight, and each process the guarded kill starts
(`ps -c`, awk) waits for its turn behind the busy VMs. Not a test: no assertion on time.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vmfenced.clients.agent_install import install
from vmflab import Lab, LabHost
from vmflab.daemon import LabDaemon
from vmflab.procs import outer_pid
from vmflab.stats import percentile

HOSTS = ("esx1", "esx2", "esx3")
PHASES = ("idle", "loaded")
BLOCK = 10
DAEMON_SIDE = "daemon: fence off, daemon-side elapsed_ms"
ROUND_TRIP = "daemon: fence off, client round trip over the socket"
AGENT = "fence_vmfenced -o off (new process)"
FLOOR = "python3 -IS -c pass (the installed agent's interpreter floor)"

Samples = dict[str, dict[str, list[float]]]


class BenchError(Exception):
    """The lab or the daemon did not do what the benchmark needs."""


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of every CPU since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def signal_all(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        os.kill(pid, signum)


def start_host(host: LabHost, idle: list[str], busy: list[str], nice: int) -> list[int]:
    """Starts the host's VMs; returns the outer PIDs of its busy ones, left SIGSTOPped."""
    for name in idle:
        host.start_vm(name)
    stopped = []
    for name in busy:
        host.start_vm(name, busy=True)
        # Stopped at once: starting the next VMs under load would only make the setup slower.
        pid = outer_pid(host, name)
        os.kill(pid, signal.SIGSTOP)
        if nice:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
            # Each VM leads its own session, hence (with sched_autogroup) its own scheduling
            # group: the nice value that counts against the host's shells is the group's.
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")
        stopped.append(pid)
    return stopped


def fence_block(
    daemon: LabDaemon, vms: list[str], agent: Path | None, samples: dict[str, list[float]]
) -> None:
    """Fences `vms` one after the other: the first half (or all, without agent) via the socket."""
    half = len(vms) // 2 if agent is not None else len(vms)
    for vm in vms[:half]:
        start = time.perf_counter()
        reply = daemon.request({"op": "fence", "vm": vm})
        samples[ROUND_TRIP].append((time.perf_counter() - start) * 1000)
        if not reply["ok"]:
            raise BenchError(f"{vm}: {reply['error']}")
        samples[DAEMON_SIDE].append(float(reply["result"]["elapsed_ms"]))
    for vm in vms[half:]:
        assert agent is not None
        start = time.perf_counter()
        done = subprocess.run(
            [str(agent)],
            input=f"action=off\nplug={vm}\nsocket={daemon.socket}\n",
            capture_output=True,
            text=True,
            check=False,
        )
        samples[AGENT].append((time.perf_counter() - start) * 1000)
        if done.returncode != 0:
            raise BenchError(f"fence_vmfenced off {vm} exited {done.returncode}: {done.stderr}")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-IS", "-c", "pass"], check=True)
        samples[FLOOR].append((time.perf_counter() - start) * 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=40, help="fences per phase and method (40)")
    parser.add_argument("--quick", action="store_true", help="3 of each: proves it still runs")
    parser.add_argument(
        "--busy-per-host",
        type=int,
        help="busy VMs per host (default 4; more on a machine of more than 6 cores)",
    )
    parser.add_argument("--no-agent", action="store_true", help="daemon-side fences only")
    parser.add_argument(
        "--vm-nice",
        type=int,
        default=0,
        choices=range(20),
        metavar="0-19",
        help="nice value of the busy VMs (default 0: same weight as the host's shells; 19 is "
        "close to ESXi, where VMs run in host/user below the host/system pool)",
    )
    args = parser.parse_args()
    n = 3 if args.quick else args.n
    cores = os.cpu_count() or 1
    per_host = args.busy_per_host or max(4, math.ceil(2 * cores / len(HOSTS)))
    methods = 1 if args.no_agent else 2
    block = min(BLOCK, n)
    blocks = math.ceil(n / block)
    # VM names per phase, block and host: each fence takes the mapped path of an idle VM.
    targets = {
        (phase, b): [f"{phase[0]}{b}-{i}" for i in range(min(block, n - b * block) * methods)]
        for phase in PHASES
        for b in range(blocks)
    }
    placement: dict[str, list[str]] = {h: [] for h in HOSTS}
    for vms in targets.values():
        for i, vm in enumerate(vms):
            placement[HOSTS[i % len(HOSTS)]].append(vm)
    samples: Samples = {p: {DAEMON_SIDE: [], ROUND_TRIP: []} for p in PHASES}
    if not args.no_agent:
        for phase in PHASES:
            samples[phase][AGENT] = []
            samples[phase][FLOOR] = []
    cpu = {p: [0, 0] for p in PHASES}
    with tempfile.TemporaryDirectory(prefix="vmf-bench-") as tmp, Lab(Path(tmp), HOSTS) as lab:
        with ThreadPoolExecutor(len(HOSTS)) as pool:
            jobs = [
                pool.submit(
                    start_host,
                    lab.hosts[h],
                    placement[h],
                    [f"busy-{h}-{k}" for k in range(per_host)],
                    args.vm_nice,
                )
                for h in HOSTS
            ]
            busy = [pid for job in jobs for pid in job.result()]
        agent = None if args.no_agent else install(Path(tmp) / "fence_vmfenced")
        with LabDaemon(lab) as daemon:
            for b in range(blocks):
                for phase in PHASES:
                    signal_all(busy, signal.SIGCONT if phase == "loaded" else signal.SIGSTOP)
                    before = cpu_ticks()
                    fence_block(daemon, targets[(phase, b)], agent, samples[phase])
                    after = cpu_ticks()
                    cpu[phase][0] += after[0] - before[0]
                    cpu[phase][1] += after[1] - before[1]
            signal_all(busy, signal.SIGSTOP)
    busy_share = {p: cpu[p][0] / max(1, cpu[p][1]) for p in PHASES}
    report(samples, n, cores, per_host * len(HOSTS), busy_share, nice=args.vm_nice)
    return 0


def report(
    samples: Samples,
    n: int,
    cores: int,
    busy_vms: int,
    busy_share: dict[str, float],
    *,
    nice: int,
) -> None:
    print(
        f"\n{n} fences per phase and method, milliseconds; {cores} cores; {busy_vms} busy VMs "
        f"({busy_vms / cores:g} per core, nice {nice}) on {len(HOSTS)} hosts, SIGSTOPped in the "
        "idle phase"
    )
    print(
        f"CPUs busy while fencing: idle phase {busy_share['idle']:.0%}, "
        f"loaded phase {busy_share['loaded']:.0%}\n"
    )
    print("| what | phase | n | p50 | p95 | p99 | loaded / idle p50 | loaded / idle p95 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for what in samples["idle"]:
        idle, loaded = samples["idle"][what], samples["loaded"][what]
        for phase, values in (("idle", idle), ("loaded", loaded)):
            cells = [statistics.median(values), percentile(values, 0.95), percentile(values, 0.99)]
            ratios = ["", ""]
            if phase == "loaded":
                ratios = [
                    f"{statistics.median(loaded) / statistics.median(idle):.2f}x",
                    f"{percentile(loaded, 0.95) / percentile(idle, 0.95):.2f}x",
                ]
            print(
                f"| {what} | {phase} | {len(values)} | "
                + " | ".join(f"{c:.2f}" for c in cells)
                + f" | {' | '.join(ratios)} |"
            )


if __name__ == "__main__":
    sys.exit(main())
