"""The README demo: real qemu VMs on 2 libvirt lab hosts when qemu can start here (KVM, else
TCG), else the 3-host ESXi lab; the daemon, `vmfencectl status`, VMs fenced, fence_virsh beside."""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from vmfenced.clients.agent_install import install
from vmflab.control import LabError
from vmflab.daemon import LabDaemon
from vmflab.lab import Lab

ESXI_HOSTS = ("esx1", "esx2", "esx3")
KVM_HOSTS = ("kvm1", "kvm2")
LIBVIRT_TOOLS = ("virsh", "libvirtd", "virtlogd", "qemu-system-x86_64")
FENCE_VIRSH = "/usr/sbin/fence_virsh"
# fence_virsh's default ssh options (a bash with a prompt it expects) plus the lab's host keys.
VIRSH_SHELL = "-t '/bin/bash -c \"PS1=\\\\[EXPECT\\\\]# /bin/bash --noprofile --norc\"'"
BENCH_VMS = 10

PidAlive = Callable[[int], bool]


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _run(argv: list[str], stdin: str | None = None) -> tuple[int, float]:
    start = time.perf_counter()
    done = subprocess.run(argv, input=stdin, text=True, check=False)
    return done.returncode, time.perf_counter() - start


def libvirt_missing() -> str | None:
    missing = [t for t in LIBVIRT_TOOLS if not (shutil.which(t) or Path(f"/usr/sbin/{t}").exists())]
    return f"{', '.join(missing)} not installed" if missing else None


def start_libvirt_lab(workdir: Path) -> tuple[Lab | None, str]:
    """A started lab of 2 libvirt hosts with the demo's qemu VMs, or None and why not."""
    missing = libvirt_missing()
    if missing:
        return None, missing
    lab = Lab(workdir, host_names=(), libvirt_hosts=KVM_HOSTS)
    try:
        lab.start()
        for index, name in enumerate(KVM_HOSTS, 1):
            lab.libvirt[name].start_vm(f"gfs-node{index}")
            lab.libvirt[name].start_vm(f"app-vm{index}")
        for i in range(BENCH_VMS):
            lab.libvirt[KVM_HOSTS[i % 2]].start_vm(f"bench-{i}")
    except (LabError, OSError, subprocess.SubprocessError) as exc:
        with contextlib.suppress(LabError):
            lab.close()
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        return None, lines[0][:200]
    return lab, ""


def fenced(daemon: LabDaemon, host: str, victim: int, pid_alive: PidAlive) -> bool:
    """Status and off of node2 through fence_vmfenced, as Pacemaker runs it; True when the
    VM's process is gone afterwards, checked over ssh on its host."""
    sock = str(daemon.socket)
    # The agent as installed for Pacemaker (python3 -m vmfenced.clients.agent_install), next to the
    # daemon's own files.
    agent = [str(install(daemon.dir / "fence_vmfenced"))]
    _say("vmfencectl status")
    _run([sys.executable, "-m", "vmfenced.clients.ctl", "--socket", sock, "status"])

    _say("fence_vmfenced, as Pacemaker runs it: key=value lines on stdin")
    print("$ printf 'action=status\\nplug=node2\\n' | fence_vmfenced")
    code, _ = _run(agent, f"action=status\nplug=node2\nsocket={sock}\n")
    print(f"exit {code} (0 = on)")
    print("$ printf 'action=off\\nplug=node2\\n' | fence_vmfenced")
    code, elapsed = _run(agent, f"action=off\nplug=node2\nnodename=node2\nsocket={sock}\n")
    print(f"exit {code}; whole agent process: {elapsed * 1000:.1f} ms")
    gone = not pid_alive(victim)
    print(f"process {victim} of gfs-node2 on {host} gone (checked over ssh on {host}): {gone}")
    return code == 0 and gone


def latency(daemon: LabDaemon) -> list[float] | None:
    _say(f"daemon-side fence latency (socket request to confirmed death), {BENCH_VMS} VMs")
    times = []
    for i in range(BENCH_VMS):
        reply = daemon.request({"op": "fence", "vm": f"bench-{i}"})
        if not reply["ok"]:
            print(f"bench-{i}: {reply['error']['message']}")
            return None
        times.append(reply["result"]["elapsed_ms"])
    print(f"median {statistics.median(times):.2f} ms, max {max(times):.2f} ms")
    return times


def fence_virsh_beside(lab: Lab) -> None:
    """The peer agent on the same kind of VM, same host, same sshd."""
    host = lab.libvirt["kvm1"]
    options = (
        f"-o UserKnownHostsFile={lab.known_hosts} -o StrictHostKeyChecking=yes "
        f"-o BatchMode=yes {VIRSH_SHELL}"
    )
    argv = [
        *(FENCE_VIRSH, "--ssh", "--ip", host.address, "--ipport", str(host.port)),
        *("--username", "root", "--identity-file", str(lab.client_key)),
        *(f"--ssh-options={options}", "--plug", "app-vm1", "--action", "off"),
    ]
    _say("the peer agent on the same host: fence_virsh -o off (Debian fence-agents)")
    print(f"$ fence_virsh -x -a {host.address} -u {host.port} -l root -k KEY -n app-vm1 -o off")
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = (time.perf_counter() - start) * 1000
    if done.stdout.strip():
        print(done.stdout.strip())
    print(f"exit {done.returncode}; whole agent process: {elapsed:.0f} ms")


def libvirt_demo(lab: Lab) -> int:
    accel = lab.libvirt["kvm1"].accel.upper()
    _say(
        f"lab: real qemu/{accel} VMs on 2 libvirt hosts (kvm1, kvm2), each a real sshd + "
        "libvirtd in its own PID namespace"
    )
    for name in KVM_HOSTS:
        host = lab.libvirt[name]
        vms = ", ".join(f"{vm} (qemu {pid})" for vm, pid in sorted(host.vm_pids().items())[:3])
        print(f"{name} at {host.address}:{host.port}: {vms}, ...")
    kvm2 = lab.libvirt["kvm2"]
    victim = kvm2.vm_pids()["gfs-node2"]
    aliases = {"node1": "gfs-node1", "node2": "gfs-node2"}
    with LabDaemon(lab, aliases=aliases) as daemon:
        ok = fenced(daemon, "kvm2", victim, kvm2.pid_alive)
        state = kvm2.domstate("gfs-node2")
        print(f"libvirtd on kvm2 says gfs-node2 is: {state}")
        times = latency(daemon)
        _ctl_status(daemon)
    if Path(FENCE_VIRSH).exists():
        fence_virsh_beside(lab)
    return 0 if ok and times else 1


def _ctl_status(daemon: LabDaemon) -> None:
    _say("vmfencectl status after the fences")
    _run([sys.executable, "-m", "vmfenced.clients.ctl", "--socket", str(daemon.socket), "status"])


def esxi_demo(lab: Lab) -> int:
    _say("lab: 3 ESXi hosts, each a real sshd in its own PID namespace, shims for the ESXi tools")
    for index, name in enumerate(ESXI_HOSTS, 1):
        host = lab.hosts[name]
        cartel = host.start_vm(f"gfs-node{index}")
        host.start_vm(f"app-vm{index}")
        print(f"{name} at {host.address}:{host.port}: gfs-node{index} runs as cartel {cartel}")
    for i in range(BENCH_VMS):
        lab.hosts["esx3"].start_vm(f"bench-{i}")
    esx2 = lab.hosts["esx2"]
    victim = esx2.vm_pids()["gfs-node2"]
    aliases = {"node1": "gfs-node1", "node2": "gfs-node2", "node3": "gfs-node3"}
    with LabDaemon(lab, aliases=aliases) as daemon:
        ok = fenced(daemon, "esx2", victim, esx2.pid_alive)
        times = latency(daemon)
        print("(today's agents: fence_virsh off about 1 s, vmware-cmd off hard 3.5 s)")
        _ctl_status(daemon)
        return 0 if ok and times else 1


def demo() -> int:
    with tempfile.TemporaryDirectory(prefix="vmflab-demo-") as tmp:
        lab, reason = start_libvirt_lab(Path(tmp) / "kvm")
        if lab is not None:
            with contextlib.closing(lab):
                accel = lab.libvirt["kvm1"].accel.upper()
                print(f"demo on: real qemu/{accel} VMs on 2 libvirt hosts", flush=True)
                return libvirt_demo(lab)
        print(f"demo on: ESXi lab (qemu could not start: {reason})", flush=True)
        with Lab(Path(tmp) / "esxi", ESXI_HOSTS) as esxi:
            return esxi_demo(esxi)


def main() -> None:
    sys.exit(demo())


if __name__ == "__main__":
    main()
