"""The README demo: a 3-host ESXi lab, the daemon, `vmfencectl status`, VMs fenced."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vmflab.daemon import LabDaemon
from vmflab.lab import Lab

ALIASES = {"node1": "gfs-node1", "node2": "gfs-node2", "node3": "gfs-node3"}


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _run(argv: list[str], stdin: str | None = None) -> tuple[int, float]:
    start = time.perf_counter()
    done = subprocess.run(argv, input=stdin, text=True, check=False)
    return done.returncode, time.perf_counter() - start


def demo() -> int:
    with tempfile.TemporaryDirectory(prefix="vmflab-demo-") as tmp, Lab(Path(tmp)) as lab:
        _say(
            "lab: 3 ESXi hosts, each a real sshd in its own PID namespace, shims for the ESXi tools"
        )
        for index, name in enumerate(("esx1", "esx2", "esx3"), 1):
            host = lab.hosts[name]
            cartel = host.start_vm(f"gfs-node{index}")
            host.start_vm(f"app-vm{index}")
            print(f"{name} at {host.address}:{host.port}: gfs-node{index} runs as cartel {cartel}")
        for i in range(10):
            lab.hosts["esx3"].start_vm(f"bench-{i}")
        with LabDaemon(lab, aliases=ALIASES) as daemon:
            sock = str(daemon.socket)
            ctl = [sys.executable, "-m", "vmfenced.ctl", "--socket", sock]
            agent = [sys.executable, "-m", "vmfenced.agent"]
            _say("vmfencectl status")
            _run([*ctl, "status"])

            _say("fence_vmfenced, as Pacemaker runs it: key=value lines on stdin")
            print("$ printf 'action=status\\nplug=node2\\n' | fence_vmfenced")
            code, _ = _run(agent, f"action=status\nplug=node2\nsocket={sock}\n")
            print(f"exit {code} (0 = on)")
            victim = lab.hosts["esx2"].vm_pids()["gfs-node2"]
            print("$ printf 'action=off\\nplug=node2\\n' | fence_vmfenced")
            code, elapsed = _run(agent, f"action=off\nplug=node2\nnodename=node2\nsocket={sock}\n")
            print(f"exit {code}; whole agent process: {elapsed * 1000:.1f} ms")
            gone = not lab.hosts["esx2"].pid_alive(victim)
            print(f"cartel {victim} on esx2 gone (checked over ssh on the host): {gone}")

            _say("daemon-side fence latency (socket request to confirmed death), 10 VMs")
            times = []
            for i in range(10):
                reply = daemon.request({"op": "fence", "vm": f"bench-{i}"})
                if not reply["ok"]:
                    print(f"bench-{i}: {reply['error']['message']}")
                    return 1
                times.append(reply["result"]["elapsed_ms"])
            print(
                f"median {statistics.median(times):.2f} ms, max {max(times):.2f} ms "
                f"(today's agents: fence_virsh off 1.1 s, vmware-cmd off hard 3.5 s)"
            )

            _say("vmfencectl status after the fences")
            _run([*ctl, "status"])
            return 0 if code == 0 and gone else 1


def main() -> None:
    sys.exit(demo())


if __name__ == "__main__":
    main()
