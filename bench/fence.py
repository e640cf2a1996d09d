"""Fence latency, side by side, in one run on the lab: `python3 bench/fence.py [--quick] [-n N]`.

Compares, on the same lab hosts and the same kind of VM:
- the daemon-side fence (socket request to confirmed death, as the daemon reports it, and as a
  client measures it around the socket round trip), in shell mode and in helper mode
  (vmfenced-host, docs/host-helper.md): two daemons on the same hosts, their fences alternated;
- `fence_vmfenced` as a new process (what Pacemaker runs), against `python3 -c pass` measured
  in the same run: the floor any Python agent pays;
- a cold SSH login that runs the kill, what every existing agent does on every call (OpenSSH
  client, a new connection and authentication each time).
Prints a Markdown table of medians, p95 and ratios. Not a test: no assertion on time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from vmfenced.clients.agent_install import install
from vmflab import Lab
from vmflab.daemon import LabDaemon
from vmflab.stats import percentile

HOSTS = ("esx1", "esx2", "esx3")
SIDE = "fence off, daemon-side (request to confirmed death)"


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1000


def run_quiet(argv: list[str], stdin: str | None = None) -> None:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 2):
        raise RuntimeError(f"{argv[:3]} exited {done.returncode}: {done.stderr.strip()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=30, help="runs per agent method (default 30)")
    parser.add_argument(
        "--daemon-n", type=int, default=200, help="daemon-side fences, for p99 (default 200)"
    )
    parser.add_argument("--quick", action="store_true", help="3 of each: proves it still runs")
    args = parser.parse_args()
    n = 3 if args.quick else args.n
    daemon_n = 3 if args.quick else args.daemon_n
    rows: dict[str, list[float]] = {}
    # The lab's shell-mode sessions run dash (its /bin/sh); the helper runs under the same shell
    # here, so that the comparison measures the modes, not two shells (on a real ESXi host both
    # modes run busybox ash; on the lab busybox ash alone costs the helper ~0.35 ms a fence).
    with (
        tempfile.TemporaryDirectory(prefix="vmf-bench-") as tmp,
        Lab(Path(tmp), HOSTS, esxi_helper_ash=False) as lab,
    ):
        # Every VM exists before the daemon starts, so each fence takes the mapped path.
        counts = {"daemon": daemon_n, "helper": daemon_n, "agent": n, "coldssh": n}
        names = {m: [f"{m}-{i}" for i in range(c)] for m, c in counts.items()}
        for vms in names.values():
            for i, vm in enumerate(vms):
                lab.hosts[HOSTS[i % len(HOSTS)]].start_vm(vm)
        lab.mode = "helper"
        helper_daemon = LabDaemon(lab)
        lab.mode = "shell"
        with LabDaemon(lab) as daemon, helper_daemon:
            sock = str(daemon.socket)
            times: dict[str, tuple[list[float], list[float]]] = {
                "shell": ([], []),
                "helper": ([], []),
            }
            # Alternated, so drift in the machine's load falls on both modes alike, and which
            # goes first alternates too: the first fence's aftermath (the killed VM's teardown,
            # its daemon's listing refresh) overlaps the second's.
            pairs = enumerate(zip(names["daemon"], names["helper"], strict=True))
            for i, (shell_vm, helper_vm) in pairs:
                order = [("shell", daemon, shell_vm), ("helper", helper_daemon, helper_vm)]
                for mode, target, vm in order if i % 2 == 0 else order[::-1]:
                    start = time.perf_counter()
                    reply = target.request({"op": "fence", "vm": vm})
                    times[mode][1].append((time.perf_counter() - start) * 1000)
                    if not reply["ok"]:
                        raise RuntimeError(f"{vm} ({mode} mode): {reply['error']}")
                    times[mode][0].append(reply["result"]["elapsed_ms"])
            for mode, (inside, around) in times.items():
                rows[
                    f"daemon, {mode} mode: fence off, daemon-side (request to confirmed death)"
                ] = inside
                rows[f"daemon, {mode} mode: fence off, client round trip over the socket"] = around

            # As installed for Pacemaker (python3 -m vmfenced.clients.agent_install): no site, -IS.
            agent = [str(install(Path(tmp) / "fence_vmfenced"))]
            rows["python3 -c pass (interpreter floor)"] = [
                timed(lambda: run_quiet([sys.executable, "-c", "pass"])) for _ in range(n)
            ]
            rows["python3 -IS -c pass (the installed agent's interpreter floor)"] = [
                timed(lambda: run_quiet([sys.executable, "-IS", "-c", "pass"])) for _ in range(n)
            ]
            rows["fence_vmfenced -o off (new process, as Pacemaker runs it)"] = [
                timed(partial(run_quiet, agent, f"action=off\nplug={vm}\nsocket={sock}\n"))
                for vm in names["agent"]
            ]
            # A running VM is ON on a fresh listing of its host; an OFF needs positive
            # evidence, every host's registrations listed for the request (`vim-cmd`, slow).
            running = names["coldssh"][0]
            rows["fence_vmfenced -o status (VM running: ON)"] = [
                timed(lambda: run_quiet(agent, f"action=status\nplug={running}\nsocket={sock}\n"))
                for _ in range(n)
            ]
            rows["fence_vmfenced -o status (VM fenced: OFF)"] = [
                timed(lambda: run_quiet(agent, f"action=status\nplug=daemon-0\nsocket={sock}\n"))
                for _ in range(n)
            ]
            rows["fence_vmfenced -o monitor"] = [
                timed(lambda: run_quiet(agent, f"action=monitor\nsocket={sock}\n"))
                for _ in range(n)
            ]
            cold = []
            for i, vm in enumerate(names["coldssh"]):
                host = lab.hosts[HOSTS[i % len(HOSTS)]]
                pid = host.vm_pids()[vm]
                cold.append(timed(partial(host.ssh, f"kill -9 {pid}")))
            rows["cold SSH login + kill -9 (OpenSSH client, what existing agents do)"] = cold
    report(rows)
    shell = statistics.median(rows[f"daemon, shell mode: {SIDE}"])
    helper = statistics.median(rows[f"daemon, helper mode: {SIDE}"])
    print(f"\nhelper mode / shell mode, daemon-side p50: {helper / shell:.3f}")
    return 0


def report(rows: dict[str, list[float]]) -> None:
    floor = statistics.median(rows["python3 -c pass (interpreter floor)"])
    agent_off = statistics.median(rows["fence_vmfenced -o off (new process, as Pacemaker runs it)"])
    print("\nmilliseconds\n")
    print("| what | runs | median | p95 | p99 | vs `python3 -c pass` | vs fence_vmfenced off |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, values in rows.items():
        median = statistics.median(values)
        print(
            f"| {name} | {len(values)} | {median:.2f} | {percentile(values, 0.95):.2f} | "
            f"{percentile(values, 0.99):.2f} | {median / floor:.2f}x | {median / agent_off:.2f}x |"
        )


if __name__ == "__main__":
    sys.exit(main())
