"""Every benchmark, one after the other, into one report: `python3 bench/all.py [-o FILE]`.

Runs bench/fence.py, virsh.py, recovery.py, load.py, scale.py and profile.py in that order (each
compares its figures with their peer inside its own run), prints their output as it comes and
writes it all, with the machine it ran on, to FILE (default docs/benchmarks.md). Benchmarks share
the machine badly: run this on an otherwise idle one. `--dry-run` lists the commands.
About 20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# (title, script, arguments): the arguments README's tables were produced with.
RUNS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Fence latency and the agent, ESXi lab (figures 1-3)", "fence.py", ("-n", "30")),
    ("Beside fence_virsh on real qemu VMs, and through Pacemaker", "virsh.py", ("-n", "20")),
    ("Beside fence_pve on lab Proxmox VE VMs, plain and HA-managed", "proxmox.py", ("-n", "20")),
    ("Recovery from a hung and a dead host, default link settings", "recovery.py", ("-n", "10")),
    ("Under load: every core busy with the hosts' VM processes", "load.py", ("-n", "40")),
    (
        "Under load, the busy VMs at nice 19 (as ESXi puts VMs below its system pool)",
        "load.py",
        ("-n", "40", "--vm-nice", "19"),
    ),
    (
        "Scale and growth",
        "scale.py",
        ("--sizes", "10,50,100,200", "--plot", str(ROOT / "docs" / "bench-growth.png")),
    ),
    ("Profile of the fence and inventory paths", "profile.py", ()),
)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}; load average before the run: {load}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--dry-run", action="store_true", help="list the commands, run nothing")
    parser.add_argument("--skip", default="", help="comma-separated scripts to leave out")
    args = parser.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {script for _, script, _ in RUNS}
    if unknown:
        parser.error(f"unknown scripts in --skip: {sorted(unknown)}")
    runs = [run for run in RUNS if run[1] not in skip]
    if args.dry_run:
        for _, script, extra in runs:
            print(" ".join(["python3", f"bench/{script}", *extra]))
        return 0
    if "profile.py" not in skip and shutil.which("py-spy") is None:
        parser.error("py-spy not found: pip install -e '.[bench]' (or --skip profile.py)")
    started = datetime.now(UTC)
    parts = [
        "# Benchmark report",
        "",
        f"`python3 bench/all.py`, started {started:%Y-%m-%d %H:%M} UTC on {machine()}.",
    ]
    failed = []
    for title, script, extra in runs:
        argv = [sys.executable, str(BENCH / script), *extra]
        shown = " ".join(["python3", f"bench/{script}", *extra]).replace(str(ROOT) + "/", "")
        print(f"\n=== {title}: {shown}", flush=True)
        begin = time.monotonic()
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
        took = time.monotonic() - begin
        print(done.stdout, end="", flush=True)
        if done.returncode != 0:
            failed.append(script)
            print(done.stderr[-3000:], file=sys.stderr)
        parts += ["", f"## {title}", "", f"`{shown}` ({took:.0f} s, exit {done.returncode})"]
        parts += ["", done.stdout.strip() or "(no output)"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(parts) + "\n")
    print(f"\nreport written to {args.output}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
