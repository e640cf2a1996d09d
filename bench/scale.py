"""One daemon against many hosts: `python3 bench/scale.py [--quick] [--sizes 10,50,100,200]
[--plot docs/bench-growth.png]`.

One lab of real-sshd ESXi hosts (the largest size), VMS real VM processes on each; for each size
N, a new daemon configured with the first N hosts (the lab's daemon settings, the SSH link
settings as shipped, since keepalives are most of the CPU at rest; log level info) and:
- startup: from the daemon's spawn to READY=1, and to the first `status` reply (polled every
  --poll s) showing every host's fence and inventory lanes up and every host's running VMs;
- rest: the daemon's VmRSS and its CPU (utime+stime of /proc/PID/stat) over --window seconds
  (by default one inventory interval, so every host is inventoried once in the window);
- --fences sequential fences on distinct VMs spread over the hosts (daemon-side elapsed_ms);
- at --scale-hosts: one fence per host on every host at once (one socket connection each, all
  requests written before any reply is read), then --burst fences at once on one host.
Prints Markdown tables; `--plot PATH` also draws the growth figure (needs matplotlib, the
`bench` extra). Not a test: no assertion on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if not __package__:  # run as `python3 bench/scale.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.scale_report import SizeResult, plot, report
from vmfenced.config import SSHConfig, load
from vmflab import Lab
from vmflab.daemon import LabDaemon

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SHIPPED_LINK_KEYS = ("keepalive_interval", "keepalive_count_max", "connect_timeout")
Alive = dict[str, list[str]]


@dataclass
class ProcSample:
    at: float
    rss_kib: int
    hwm_kib: int
    cpu_s: float
    threads: int
    fds: int


def sample(pid: int) -> ProcSample:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of stat (utime, stime), counted after the ")" that ends the comm field.
    cpu = (int(stat[11]) + int(stat[12])) / CLOCK_TICKS
    return ProcSample(
        at=time.perf_counter(),
        rss_kib=int(fields["VmRSS"][0]),
        hwm_kib=int(fields["VmHWM"][0]),
        cpu_s=cpu,
        threads=int(fields["Threads"][0]),
        fds=sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir()),
    )


class StartupWatch(threading.Thread):
    """Polls `status` from the daemon's spawn until every host is up and inventoried."""

    def __init__(self, daemon: LabDaemon, expected: dict[str, int], poll: float) -> None:
        super().__init__(daemon=True)
        self._daemon = daemon
        self._expected = expected
        self._poll = poll
        self.done_at: float | None = None
        self.polls = 0
        self.slowest_ms = 0.0
        self.stop = threading.Event()

    def complete(self, status: dict[str, Any]) -> bool:
        seen = {h["name"]: h for h in status["hosts"]}
        return set(seen) == set(self._expected) and all(
            h["lanes"] == {"fence": "up", "inventory": "up"}
            and h["inventory_age_s"] is not None
            and h["vm_count"] == self._expected[name]
            for name, h in seen.items()
        )

    def run(self) -> None:
        took = 0.0
        while not self.stop.is_set():
            try:
                start = time.perf_counter()
                reply = self._daemon.request({"op": "status"}, timeout=10)
                took = time.perf_counter() - start
                self.polls += 1
                self.slowest_ms = max(self.slowest_ms, took * 1000)
                if reply["ok"] and self.complete(reply["result"]):
                    self.done_at = time.perf_counter()
                    return
            except (OSError, ValueError):
                pass  # not listening yet
            # A status of thousands of VMs costs the daemon milliseconds: poll at most a quarter
            # of the time, so the watch does not slow down what it measures.
            self.stop.wait(max(self._poll, 3 * took))


def machine_busy_s() -> tuple[float, float]:
    """CPU seconds the whole machine spent busy, and elapsed CPU seconds (all cores)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks) - idle) / CLOCK_TICKS, sum(ticks) / CLOCK_TICKS


async def fences_at_once(socket_path: Path, vms: list[str]) -> tuple[float, list[dict[str, Any]]]:
    """Wall ms from the first request written to the last reply read, and the replies."""
    conns = [await asyncio.open_unix_connection(str(socket_path)) for _ in vms]
    try:
        start = time.perf_counter()
        for (_, writer), vm in zip(conns, vms, strict=True):
            writer.write(json.dumps({"op": "fence", "vm": vm, "action": "off"}).encode() + b"\n")

        async def answer(reader: asyncio.StreamReader) -> dict[str, Any]:
            reply: dict[str, Any] = json.loads(await reader.readline())
            reply["client_ms"] = (time.perf_counter() - start) * 1000
            return reply

        replies = await asyncio.gather(*(answer(reader) for reader, _ in conns))
        wall = max(r["client_ms"] for r in replies)
    finally:
        for _, writer in conns:
            writer.close()
    return wall, list(replies)


def fence_outcomes(replies: list[dict[str, Any]]) -> list[float]:
    failed = [r for r in replies if not r["ok"] or r["result"]["outcome"] != "killed"]
    if failed:
        raise RuntimeError(f"{len(failed)} fences not killed, first: {failed[0]}")
    return [float(r["result"]["elapsed_ms"]) for r in replies]


def take(alive: Alive, host: str) -> str:
    if not alive[host]:
        raise RuntimeError(f"no VM left to fence on {host}: give hosts more VMs (--vms)")
    return alive[host].pop(0)


def at_once(daemon: LabDaemon, vms: list[str], key: str) -> dict[str, Any]:
    """Fences ``vms`` at once; where the time went, from the client, the journal and /proc."""
    assert daemon.proc is not None
    before, busy0, sent = sample(daemon.proc.pid), machine_busy_s(), time.time()
    wall, replies = asyncio.run(fences_at_once(daemon.socket, vms))
    after, busy1 = sample(daemon.proc.pid), machine_busy_s()
    history = daemon.request({"op": "history", "limit": len(vms)})["result"]["entries"]
    records = [e for e in history if e["vm"] in set(vms)]
    return {
        f"{key}_wall_ms": wall,
        f"{key}_elapsed": fence_outcomes(replies),
        f"{key}_client": [r["client_ms"] for r in replies],
        # When the daemon took each request in (journal "t"), from the moment all were sent.
        f"{key}_arrival": [max(0.0, (e["t"] - sent) * 1000) for e in records],
        # Arrival to journaled, less the fence itself: queueing before the fence and the record.
        f"{key}_overhead": [e["total_ms"] - e["elapsed_ms"] for e in records],
        f"{key}_daemon_cpu_s": after.cpu_s - before.cpu_s,
        f"{key}_machine_cpu_s": (busy1[0] - busy0[0], busy1[1] - busy0[1]),
    }


def concurrent_phases(
    lab: Lab, daemon: LabDaemon, hosts: list[str], alive: Alive, burst: int
) -> dict[str, Any]:
    extra = at_once(daemon, [take(alive, h) for h in hosts], "spread")
    # Burst VMs start only now, so every size's figures above saw the same VMs per host; one
    # vm_status (a live listing of every host) puts them in the daemon's map.
    target = hosts[0]
    names = [f"{target}-burst{j:02d}" for j in range(burst)]
    lab.hosts[target].start_vms(names)
    reply = daemon.request({"op": "vm_status", "vm": names[0]})
    if not (reply["ok"] and reply["result"]["state"] == "on"):
        raise RuntimeError(f"burst VM not seen: {reply}")
    extra.update(at_once(daemon, names, "burst"), burst_host=target)
    return extra


def run_size(lab: Lab, n: int, alive: Alive, args: argparse.Namespace) -> SizeResult:
    hosts = list(lab.hosts)[:n]
    expected = {h: len(alive[h]) for h in hosts}
    # The link settings as shipped: keepalives are most of the CPU at rest.
    shipped = {k: SSHConfig.model_fields[k].default for k in SHIPPED_LINK_KEYS}
    daemon = LabDaemon(lab, hosts=hosts, ssh=shipped)
    daemon.log_level = "info"
    watch = StartupWatch(daemon, expected, args.poll)
    try:
        interval = print_config(daemon.config_path, args.daemon_nice, quiet=n != args.sizes[0])
        if args.window is None:
            args.window = interval
        watch.start()
        daemon.start(timeout=120)
        assert daemon.proc is not None
        renice(daemon.proc.pid, args.daemon_nice)
        watch.join(timeout=120)
        assert daemon.proc is not None and daemon.spawned_at and daemon.ready_at
        if watch.done_at is None:
            raise RuntimeError(f"{n} hosts: not every host up and inventoried within 120 s")
        pid = daemon.proc.pid
        # JSON log lines of lanes going down: each is a failed connection attempt.
        ready_complete = ready_after_full_round(daemon)
        startup_downs = daemon.log_path.read_text().count('"state": "down"')
        before = sample(pid)
        time.sleep(args.window)
        after = sample(pid)
        cpu_pct = 100 * (after.cpu_s - before.cpu_s) / (after.at - before.at)
        fence_ms, client_ms = [], []
        for i in range(args.fences):
            vm = take(alive, hosts[i % n])
            start = time.perf_counter()
            reply = daemon.request({"op": "fence", "vm": vm, "action": "off"})
            client_ms.append((time.perf_counter() - start) * 1000)
            fence_ms += fence_outcomes([reply])
        extra = {}
        if n == args.scale_hosts:
            extra = concurrent_phases(lab, daemon, hosts, alive, args.burst)
        return SizeResult(
            hosts=n,
            vms=sum(expected.values()),
            ready_s=daemon.ready_at - daemon.spawned_at,
            inventoried_s=watch.done_at - daemon.spawned_at,
            rss_mib=after.rss_kib / 1024,
            hwm_mib=after.hwm_kib / 1024,
            cpu_pct=cpu_pct,
            threads=after.threads,
            fds=after.fds,
            fence_ms=fence_ms,
            client_ms=client_ms,
            down_events=startup_downs,
            ready_complete=ready_complete,
            status_ms=watch.slowest_ms,
            extra=extra,
        )
    finally:
        watch.stop.set()
        daemon.close()


def renice(pid: int, nice: int) -> None:
    """Every thread of the process (Linux nice values are per thread)."""
    if nice:
        for task in Path(f"/proc/{pid}/task").iterdir():
            os.setpriority(os.PRIO_PROCESS, int(task.name), nice)


def ready_after_full_round(daemon: LabDaemon) -> bool:
    """Whether READY=1 came after every host's first inventory, or at the daemon's timeout
    (its "ready" log line, written just after READY=1 is sent)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in daemon.log_path.read_text().splitlines():
            if '"event": "ready"' in line:
                return bool(json.loads(line).get("inventoried"))
        time.sleep(0.05)
    raise RuntimeError(f"no ready line in the daemon's log:\n{daemon.log()}")


def print_config(path: Path, nice: int, *, quiet: bool) -> float:
    """Prints the settings the daemon runs with; returns its inventory interval."""
    config = load(path)
    d, s = config.daemon, config.ssh_for(config.hosts[0])
    if quiet:
        return d.inventory_interval
    print(
        f"daemon settings used: inventory_interval={d.inventory_interval:g} s, "
        f"fence_timeout={d.fence_timeout:g} s, keepalive_interval={s.keepalive_interval:g} s, "
        f"keepalive_count_max={s.keepalive_count_max}, connect_timeout={s.connect_timeout:g} s,"
        f" log level info, nice {nice}",
        flush=True,
    )
    return d.inventory_interval


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--sizes", default="10,50,100,200", help="host counts (default %(default)s)"
    )
    parser.add_argument("--vms", type=int, default=20, help="VMs per host (default 20)")
    parser.add_argument("--scale-hosts", type=int, default=100, help="size of the concurrent runs")
    parser.add_argument("--fences", type=int, default=20, help="sequential fences per size")
    parser.add_argument("--burst", type=int, default=20, help="fences at once on one host")
    parser.add_argument("--window", type=float, help="rest window, s (default: inventory interval)")
    parser.add_argument("--poll", type=float, default=0.2, help="status poll period during startup")
    parser.add_argument("--workers", type=int, default=8, help="hosts whose VMs start at once")
    parser.add_argument(
        "--daemon-nice",
        type=int,
        default=0,
        help="nice value of the daemon once READY (say -10: the lab's hosts share its CPUs)",
    )
    parser.add_argument("--plot", type=Path, help="write the growth figure (PNG) there")
    parser.add_argument("--quick", action="store_true", help="5 and 10 hosts x 3 VMs, no plot")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.vms, args.scale_hosts, args.fences, args.burst = "5,10", 3, 10, 5, 5
        args.window, args.plot = 5.0, None
    args.sizes = sorted({int(s) for s in args.sizes.split(",")})
    if args.scale_hosts not in args.sizes:
        parser.error(f"--scale-hosts {args.scale_hosts} must be one of --sizes {args.sizes}")
    return args


def main() -> int:
    args = parse_args()
    begun = time.perf_counter()
    # The daemon inherits this: two SSH connections per host, plus clients.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    print(f"RLIMIT_NOFILE of the daemon: {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}")
    names = [f"s{i:03d}" for i in range(max(args.sizes))]
    results = []
    with tempfile.TemporaryDirectory(prefix="vmf-scale-") as tmp, Lab(Path(tmp), names) as lab:
        print(f"lab: {len(names)} hosts up in {time.perf_counter() - begun:.1f} s", flush=True)
        started = time.perf_counter()
        alive = {h: [f"{h}-vm{j:02d}" for j in range(args.vms)] for h in names}
        lab.start_vms(alive, workers=args.workers)
        print(
            f"lab: {len(names) * args.vms} VMs started in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        for n in args.sizes:
            result = run_size(lab, n, alive, args)
            print(
                f"{n} hosts: READY {result.ready_s:.2f} s, all inventoried "
                f"{result.inventoried_s:.2f} s, RSS {result.rss_mib:.1f} MiB, CPU "
                f"{result.cpu_pct:.2f} %, fence p50 {statistics.median(result.fence_ms):.2f} ms",
                flush=True,
            )
            results.append(result)
    report(results, args)
    if args.plot is not None:
        plot(results, args.plot, args.vms)
    print(f"\nwall time of the whole run: {time.perf_counter() - begun:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
