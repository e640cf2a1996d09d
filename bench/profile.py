"""Where the daemon spends its CPU: `python3 bench/profile.py [--quick] [--fences N] [-o DIR]`.

Samples a lab daemon with py-spy (`pip install -e '.[bench]'`) in two phases:
- fence path: N sequential fences (socket request to confirmed death) on three ESXi lab hosts;
- inventory path: the same hosts with many VMs each, refreshed every second, nothing else.
Prints, per phase, the functions with the most samples (own and inclusive); `-o DIR` keeps
py-spy's raw stacks, so a change can be compared before and after.
Not a test: no assertion on time.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from vmflab import Lab
from vmflab.daemon import LabDaemon

HOSTS = ("esx1", "esx2", "esx3")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?):\d+\)$")


class Spy:
    """py-spy recording one process until stopped; its raw output is the collapsed stacks."""

    def __init__(self, daemon: LabDaemon, raw: Path, rate: int) -> None:
        if daemon.proc is None:
            raise RuntimeError("the daemon is not running")
        pid = daemon.proc.pid
        argv = ["py-spy", "record", "--pid", str(pid), "--rate", str(rate), "--nonblocking"]
        self.proc = subprocess.Popen(
            [*argv, "--format", "raw", "-o", str(raw)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.raw = raw
        # py-spy says (on stdout) that it samples once it has attached; a SIGINT before that
        # ends it without writing anything (a short --quick phase on a busy machine lost that
        # race).
        assert self.proc.stdout is not None
        seen = b""
        while b"Sampling process" not in seen:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"py-spy ended before sampling: {seen.decode(errors='replace')}")
            seen += line

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=30)
        if not self.raw.exists():
            raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")


def frame_name(frame: str) -> str:
    match = FRAME.match(frame)
    if match is None:
        return frame
    return f"{match['func']} ({Path(match['file']).name})"


def summarise(raw: Path, top: int) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        total += count
        frames = [frame_name(f) for f in stack.split(";")[1:]]  # [0] is the thread
        if frames:
            own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    # uvloop's loop is C: its own samples are the loop itself, waits in epoll included.
    lines = [f"{total} samples", "", "| own | inclusive | function |", "| ---: | ---: | --- |"]
    for name, count in own.most_common(top):
        lines.append(f"| {count / total:.1%} | {inclusive[name] / total:.1%} | `{name}` |")
    # The modules a fence and an inventory round go through (frames carry file names only).
    ours = ("(fence.py)", "(link.py)", "(host.py)", "(inventory.py)")
    lines += ["", "Inclusive, vmfenced's own functions:", ""]
    lines += [
        f"- {c / total:.1%} `{n}`"
        for n, c in inclusive.most_common()
        if n.endswith(ours) and not n.startswith("<module>")
    ][:top]
    return "\n".join(lines)


def fence_phase(lab: Lab, out: Path, n: int, rate: int) -> tuple[Path, list[float]]:
    vms = [f"p{i}" for i in range(n)]
    for i, vm in enumerate(vms):
        lab.hosts[HOSTS[i % len(HOSTS)]].start_vm(vm)
    raw = out / "fence.txt"
    with LabDaemon(lab) as daemon:
        spy = Spy(daemon, raw, rate)
        try:
            elapsed = []
            for vm in vms:
                reply = daemon.request({"op": "fence", "vm": vm})
                if not reply["ok"]:
                    raise RuntimeError(f"{vm}: {reply['error']}")
                elapsed.append(reply["result"]["elapsed_ms"])
        finally:
            spy.stop()
    return raw, elapsed


def inventory_phase(lab: Lab, out: Path, per_host: int, seconds: float, rate: int) -> Path:
    for host in HOSTS:
        for i in range(per_host):
            lab.hosts[host].start_vm(f"{host}-i{i}")
    raw = out / "inventory.txt"
    with LabDaemon(lab, daemon={"inventory_interval": 1}) as daemon:
        spy = Spy(daemon, raw, rate)
        try:
            # Nothing but the inventory loops and keepalives runs meanwhile.
            time.sleep(seconds)
        finally:
            spy.stop()
    return raw


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fences", type=int, default=150, help="fences sampled (default 150)")
    parser.add_argument("--vms", type=int, default=60, help="VMs per host, inventory phase")
    parser.add_argument("--seconds", type=float, default=20, help="inventory phase length")
    parser.add_argument("--rate", type=int, default=1000, help="samples per second")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("-o", "--out", type=Path, help="keep the raw stacks in this directory")
    parser.add_argument("--quick", action="store_true", help="a few samples: proves it runs")
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        print("py-spy not found: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    if args.quick:
        args.fences, args.vms, args.seconds = 6, 3, 2
    with tempfile.TemporaryDirectory(prefix="vmf-profile-") as tmp:
        out = args.out or Path(tmp) / "out"
        out.mkdir(parents=True, exist_ok=True)
        with Lab(Path(tmp) / "lab", HOSTS) as lab:
            raw, elapsed = fence_phase(lab, out, args.fences, args.rate)
            print(f"### Fence path: {args.fences} fences\n")
            print(
                f"daemon-side elapsed: median {statistics.median(elapsed):.2f} ms, "
                f"max {max(elapsed):.2f} ms (py-spy attached: slower than unobserved)\n"
            )
            print(summarise(raw, args.top))
            raw = inventory_phase(lab, out, args.vms, args.seconds, args.rate)
            print(f"\n### Inventory path: {len(HOSTS)} hosts x {args.vms} VMs, refreshed every 1 s")
            print(f"for {args.seconds:g} s\n")
            print(summarise(raw, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
