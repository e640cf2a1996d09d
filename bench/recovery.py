"""Recovery from a hung and a dead host, with the daemon's default link settings:
`python3 bench/recovery.py [--quick] [-n N] [--hold S] [--dead-for S]`.

The daemon runs with the SSH link settings of `vmfenced.config.SSHConfig` as shipped (read at
run time, printed in the report), not the lab's or the fault tests' values. Each round, on one lab
host in turn (3 ESXi lab hosts, real sshd, real VM processes):
- hung host: every process of the host but its reaper SIGSTOPped (TCP stays open, nothing
  answers); the daemon's `status` is polled every 10 ms until both lanes of the host are down;
  then (after `--hold` seconds more, 0 by default: the reconnect attempt that followed the drop
  is then pending) every process is SIGCONTed, `status` is polled until both lanes are up, and
  one of the host's VMs is fenced (a fence that fails while the link comes back is retried and
  counted);
- dead host: sshd killed (connections reset), left dead for `--dead-for` seconds (a reboot is
  longer still: the reconnect backoff is then at its cap, as here), restarted; same timings.
Times are from the fault (or its end) to what `status` or the fence reply shows. Targets: down
shown within 3 s of a hang, fenceable again within 2 s of the host's return. `--keepalive-*`,
`--connect-timeout` try other settings than the defaults. Not a test: no assertion on time.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmfenced.config import DaemonConfig, SSHConfig
from vmfenced.daemon import link
from vmflab import Lab, LabHost
from vmflab.daemon import LabDaemon
from vmflab.procs import stopped
from vmflab.stats import percentile

HOSTS = ("esx1", "esx2", "esx3")
POLL_S = 0.01
WAIT_S = 30.0
TARGET_DOWN_S = 3.0
TARGET_BACK_S = 2.0
LINK_KEYS = ("keepalive_interval", "keepalive_count_max", "connect_timeout")


class BenchError(Exception):
    """The lab or the daemon did not do what a round needs."""


@dataclass
class Series:
    """One row of the report: seconds per round, and the target they are held against."""

    what: str
    target_s: float | None = None
    values: list[float] = field(default_factory=list)


def link_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The shipped defaults, unless a flag asks for another value (to try a proposal)."""
    fields = SSHConfig.model_fields
    chosen = {key: fields[key].default for key in LINK_KEYS}
    for key in LINK_KEYS:
        value = getattr(args, key)
        if value is not None:
            chosen[key] = value
    return chosen


def lanes(daemon: LabDaemon, host: str) -> tuple[str, str]:
    for entry in daemon.status()["hosts"]:
        if entry["name"] == host:
            return entry["lanes"]["fence"], entry["lanes"]["inventory"]
    raise BenchError(f"{host} missing from status")


def poll(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> float:
    """perf_counter() at the first poll that saw `condition` hold."""
    deadline = time.perf_counter() + timeout
    while True:
        now = time.perf_counter()
        if condition():
            return now
        if now > deadline:
            raise BenchError(f"{what}: not within {timeout:g} s")
        time.sleep(POLL_S)


def both_up(daemon: LabDaemon, host: str) -> Callable[[], bool]:
    return lambda: all(lane == "up" for lane in lanes(daemon, host))


def until_down(daemon: LabDaemon, host: str) -> tuple[float, float]:
    """perf_counter() when the host's state (its fence lane) first showed down, and when both
    lanes did: each lane has its own connection and keepalive."""
    first: list[float] = []

    def down() -> bool:
        fence, inventory = lanes(daemon, host)
        if fence == "down" and not first:
            first.append(time.perf_counter())
        return fence == inventory == "down"

    both_down = poll(down, f"{host} down")
    return first[0], both_down


def fence_until_done(daemon: LabDaemon, vm: str) -> tuple[float, int, float]:
    """(perf_counter() at the confirmed fence, attempts, daemon-side elapsed_ms)."""
    deadline = time.perf_counter() + WAIT_S
    attempts = 0
    while True:
        attempts += 1
        reply = daemon.request({"op": "fence", "vm": vm})
        done = time.perf_counter()
        if reply["ok"]:
            return done, attempts, float(reply["result"]["elapsed_ms"])
        # Only a link still coming back is worth another try; anything else is a broken round.
        if reply["error"]["code"] != "fence_failed" or done > deadline:
            raise BenchError(f"fence {vm}: {reply['error']}")
        time.sleep(POLL_S)


def back(
    daemon: LabDaemon, host: str, vm: str, since: float, rows: dict[str, Series], *, kind: str
) -> None:
    """Times from `since` (the host's return) to both lanes up, and to a confirmed fence."""
    up = poll(both_up(daemon, host), f"{host} up again")
    done, attempts, elapsed_ms = fence_until_done(daemon, vm)
    rows[f"{kind}: link up"].values.append(up - since)
    rows[f"{kind}: fenced"].values.append(done - since)
    rows[f"{kind}: fence attempts"].values.append(attempts)
    rows[f"{kind}: fence elapsed"].values.append(elapsed_ms / 1000)


def hung_round(
    daemon: LabDaemon, host: LabHost, vm: str, hold: float, rows: dict[str, Series]
) -> None:
    with stopped(host):
        start = time.perf_counter()
        first, down = until_down(daemon, host.name)
        # The hang's duration past detection, not a synchronisation: reconnect attempts pend.
        time.sleep(hold)
    thawed = time.perf_counter()
    rows["hung: host down"].values.append(first - start)
    rows["hung: down"].values.append(down - start)
    back(daemon, host.name, vm, thawed, rows, kind="hung")


def dead_round(
    daemon: LabDaemon, host: LabHost, vm: str, dead_for: float, rows: dict[str, Series]
) -> None:
    start = time.perf_counter()
    host.stop_sshd()
    try:
        first, down = until_down(daemon, host.name)
        # The fault's duration, not a synchronisation: the backoff grows meanwhile.
        time.sleep(max(0.0, start + dead_for - time.perf_counter()))
    finally:
        host.start_sshd()
    restarted = time.perf_counter()
    rows["dead: host down"].values.append(first - start)
    rows["dead: down"].values.append(down - start)
    back(daemon, host.name, vm, restarted, rows, kind="dead")


def new_rows(kind: str, fault: str, comeback: str) -> dict[str, Series]:
    return {
        # A host's state is its fence lane's; the inventory lane's keepalive is slower on
        # purpose (vmfenced.daemon.host.INVENTORY_KEEPALIVE_FACTOR).
        f"{kind}: host down": Series(f"{fault} until `status` shows the host down", TARGET_DOWN_S),
        f"{kind}: down": Series(f"{fault} until `status` shows both lanes down"),
        f"{kind}: link up": Series(f"{comeback} until `status` shows both lanes up"),
        f"{kind}: fenced": Series(f"{comeback} until a fence of its VM confirmed", TARGET_BACK_S),
        f"{kind}: fence attempts": Series("fence requests until that success (count)"),
        f"{kind}: fence elapsed": Series("that fence, daemon-side elapsed"),
    }


def start_vms(lab: Lab, names: dict[str, list[str]]) -> None:
    """Every VM before the daemon starts, so each fence takes the mapped path; hosts in parallel."""
    with ThreadPoolExecutor(len(names)) as pool:
        jobs = [
            pool.submit(lambda h, vms: [lab.hosts[h].start_vm(v) for v in vms], host, vms)
            for host, vms in names.items()
        ]
        for job in jobs:
            job.result()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=10, help="rounds per fault (default 10)")
    parser.add_argument("--quick", action="store_true", help="2 rounds each: proves it still runs")
    parser.add_argument("--dead-for", type=float, default=5.0, help="seconds sshd stays dead")
    parser.add_argument(
        "--hold", type=float, default=0.0, help="seconds a hung host stays hung once seen down"
    )
    parser.add_argument("--keepalive-interval", dest="keepalive_interval", type=float)
    parser.add_argument("--keepalive-count-max", dest="keepalive_count_max", type=int)
    parser.add_argument("--connect-timeout", dest="connect_timeout", type=float)
    args = parser.parse_args()
    n = 2 if args.quick else args.n
    dead_for = 1.0 if args.quick else args.dead_for
    settings = link_settings(args)
    fence_timeout = DaemonConfig.model_fields["fence_timeout"].default
    rows = {
        **new_rows("hung", "all its processes SIGSTOPped", "SIGCONT"),
        **new_rows("dead", "sshd killed", "sshd listening again"),
    }
    per_host = math.ceil(n / len(HOSTS))
    names = {h: [f"{h}-{k}{i}" for k in ("hung", "dead") for i in range(per_host)] for h in HOSTS}
    with tempfile.TemporaryDirectory(prefix="vmf-bench-") as tmp, Lab(Path(tmp), HOSTS) as lab:
        start_vms(lab, names)
        config = {"ssh": settings, "daemon": {"fence_timeout": fence_timeout}}
        with LabDaemon(lab, **config) as daemon:
            for i in range(n):
                host = lab.hosts[HOSTS[i % len(HOSTS)]]
                hung_round(daemon, host, f"{host.name}-hung{i // len(HOSTS)}", args.hold, rows)
            for i in range(n):
                host = lab.hosts[HOSTS[i % len(HOSTS)]]
                vm = f"{host.name}-dead{i // len(HOSTS)}"
                dead_round(daemon, host, vm, dead_for, rows)
    report(rows, n, settings, fence_timeout, (args.hold, dead_for))
    return 0


def report(
    rows: dict[str, Series],
    n: int,
    settings: dict[str, Any],
    fence_timeout: float,
    durations: tuple[float, float],
) -> None:
    hold, dead_for = durations
    defaults = {key: SSHConfig.model_fields[key].default for key in LINK_KEYS}
    origin = "shipped defaults" if settings == defaults else f"NOT the defaults {defaults}"
    interval, count = settings["keepalive_interval"], settings["keepalive_count_max"]
    print(
        f"\n{n} rounds per fault, seconds; a hung host thawed {hold:g} s after it was seen down; "
        f"sshd dead for {dead_for:g} s per dead round\n"
    )
    print(f"Link settings ({origin}): " + ", ".join(f"{k} = {v}" for k, v in settings.items()))
    print(
        f"fence_timeout = {fence_timeout}; vmfenced.daemon.link: "
        f"BACKOFF_FIRST = {link.BACKOFF_FIRST}, "
        f"BACKOFF_CAP = {link.BACKOFF_CAP}, RECONNECT_GRACE = {link.RECONNECT_GRACE}"
    )
    print(
        f"A hung peer is dropped {interval * count:g} to {interval * (count + 1):g} s after the "
        "last thing it sent (keepalive_interval x keepalive_count_max, plus up to one interval)\n"
    )
    print("| fault | from | median | p95 | max | target | max within target |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for key, series in rows.items():
        values = series.values
        kind = key.split(":")[0]
        if "attempts" in key:
            cells = [f"{statistics.median(values):g}", f"{percentile(values, 0.95):g}"]
            cells.append(f"{max(values):g}")
        else:
            cells = [f"{v:.3f}" for v in (statistics.median(values), percentile(values, 0.95))]
            cells.append(f"{max(values):.3f}")
        target = "-" if series.target_s is None else f"< {series.target_s:g}"
        verdict = "-"
        if series.target_s is not None:
            verdict = "yes" if max(values) < series.target_s else "**no**"
        print(f"| {kind} host | {series.what} | {' | '.join(cells)} | {target} | {verdict} |")


if __name__ == "__main__":
    sys.exit(main())
