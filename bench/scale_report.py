"""Tables and figure of bench/scale.py: Markdown for the README, a PNG for docs/."""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmflab.stats import percentile


def summary(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):.2f}, p99 {percentile(values, 0.99):.2f}, "
        f"max {max(values):.2f} ms"
    )


@dataclass
class SizeResult:
    hosts: int
    vms: int
    ready_s: float
    inventoried_s: float
    rss_mib: float
    hwm_mib: float
    cpu_pct: float
    threads: int
    fds: int
    fence_ms: list[float]
    client_ms: list[float]
    down_events: int
    ready_complete: bool
    status_ms: float
    extra: dict[str, Any] = field(default_factory=dict)


def report(results: list[SizeResult], args: argparse.Namespace) -> None:
    print(f"\n### Growth ({args.fences} sequential fences per size, rest window {args.window:g} s)")
    print(
        "\n| hosts | VMs | to READY=1 (s) | READY after a full round | to all inventoried (s) "
        "| lanes down at startup | slowest status (ms) | RSS (MiB) | peak RSS (MiB) "
        "| CPU at rest (% of a core) | CPU per 100 hosts (%) | fence p50 (ms) | fence p99 (ms) "
        "| client p50 (ms) | threads | fds |"
    )
    print("| ---: " * 16 + "|")
    for r in results:
        print(
            f"| {r.hosts} | {r.vms} | {r.ready_s:.2f} | {'yes' if r.ready_complete else 'NO'} "
            f"| {r.inventoried_s:.2f} | {r.down_events} | {r.status_ms:.0f} | {r.rss_mib:.1f} "
            f"| {r.hwm_mib:.1f} | {r.cpu_pct:.2f} | {r.cpu_pct * 100 / r.hosts:.2f} "
            f"| {statistics.median(r.fence_ms):.2f} | {percentile(r.fence_ms, 0.99):.2f} "
            f"| {statistics.median(r.client_ms):.2f} | {r.threads} | {r.fds} |"
        )
    first, last = results[0], results[-1]
    factor = last.hosts / first.hosts
    print(
        f"\n{first.hosts} -> {last.hosts} hosts (x{factor:g}): "
        f"RSS x{last.rss_mib / first.rss_mib:.2f}"
        f", CPU at rest x{last.cpu_pct / max(first.cpu_pct, 1e-9):.2f}, startup to all "
        f"inventoried x{last.inventoried_s / first.inventoried_s:.2f}, fence p50 "
        f"x{statistics.median(last.fence_ms) / statistics.median(first.fence_ms):.2f}"
    )
    for r in results:
        if r.extra:
            print_scale(r)


def print_scale(r: SizeResult) -> None:
    e = r.extra
    print(f"\n### Scale: {r.hosts} hosts, {r.vms} VMs")
    print("\n| what | value |\n| --- | ---: |")
    per100 = 100 / r.hosts
    rows = [
        ("spawn to READY=1", f"{r.ready_s:.2f} s"),
        ("spawn to every lane up and every host inventoried", f"{r.inventoried_s:.2f} s"),
        ("lanes down during startup (failed first attempts)", f"{r.down_events}"),
        ("daemon RSS at rest", f"{r.rss_mib:.1f} MiB ({r.rss_mib * per100:.1f} per 100 hosts)"),
        ("daemon CPU at rest", f"{r.cpu_pct:.2f} % of a core ({r.cpu_pct * per100:.2f} per 100)"),
    ]
    for key, title in (
        ("spread", f"{r.hosts} fences at once on {r.hosts} hosts"),
        ("burst", f"{len(e['burst_elapsed'])} fences at once on one host ({e['burst_host']})"),
    ):
        busy, total = e[f"{key}_machine_cpu_s"]
        cores = os.cpu_count() or 1
        rows += [
            (f"{title}: wall (first request sent to last reply)", f"{e[key + '_wall_ms']:.1f} ms"),
            ("  each, daemon-side elapsed", summary(e[f"{key}_elapsed"])),
            ("  each, client request to reply", summary(e[f"{key}_client"])),
            ("  each, sent to taken in by the daemon", summary(e[f"{key}_arrival"])),
            ("  each, in the daemon but not fencing", summary(e[f"{key}_overhead"])),
            (
                "  CPU meanwhile: daemon / whole machine",
                f"{e[key + '_daemon_cpu_s']:.2f} / {busy:.2f} of {total:.2f} CPU-s",
            ),
            (
                # What the hosts' shells alone need, with the daemon's share taken out.
                f"  floor set by the lab on {cores} cores: (busy - daemon) / cores",
                f"{(busy - e[key + '_daemon_cpu_s']) * 1000 / cores:.0f} ms",
            ),
        ]
    for what, value in rows:
        print(f"| {what} | {value} |")


def plot(results: list[SizeResult], path: Path, vms_per_host: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r.hosts for r in results]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    panels = [
        (
            axes[0][0],
            "fence, daemon-side (ms)",
            {
                "p50": [statistics.median(r.fence_ms) for r in results],
                "p99": [percentile(r.fence_ms, 0.99) for r in results],
            },
        ),
        (
            axes[0][1],
            "startup (s)",
            {
                "to READY=1": [r.ready_s for r in results],
                "to all inventoried": [r.inventoried_s for r in results],
            },
        ),
        (axes[1][0], "daemon RSS (MiB)", {"RSS at rest": [r.rss_mib for r in results]}),
        (axes[1][1], "daemon CPU at rest (% of a core)", {"CPU": [r.cpu_pct for r in results]}),
    ]
    for ax, title, series in panels:
        for label, ys in series.items():
            ax.plot(x, ys, marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("hosts")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"vmfenced growth on the lab ({vms_per_host} VMs per host, fewer once fenced)")
    fig.savefig(path, dpi=110)
    print(f"\nplot written to {path}")
