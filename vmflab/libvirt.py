"""One lab libvirt (KVM) host: a PID + mount namespace with its own virtlogd, libvirtd, sshd and
real qemu VMs (``machine='microvm'`` domains of 32 MiB without disk or network).

The host's PID 1 is the lab's PID-1 program with its libvirt layer (``vmflab.pid1.libvirt``).
Everything about VMs goes through SSH as root (``virsh`` against qemu:///system, /proc); only
``spawn``, sshd control and teardown use the init.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Unpack

from vmflab.control import LabError, SshCommandError
from vmflab.libvirt_files import LibvirtFiles, check_domain_name, pid_file_name
from vmflab.pid1.libvirt import LibvirtInit
from vmflab.sshd import START_TIMEOUT_S, SshdHost, SshdHostArgs

# The first libvirtd ever started probes qemu's capabilities (about 12 s here, more when busy).
LIBVIRTD_TIMEOUT_S = 120.0
RUN_DIR = "/run/libvirt/qemu"


def kvm_usable() -> bool:
    """Whether qemu (run as root by the lab's hosts) can use KVM on this machine."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def caps_cached(caps_dir: Path) -> bool:
    return any((caps_dir / "capabilities").glob("*.xml"))


class LibvirtHost(SshdHost):
    """A lab KVM host; ``Lab(..., libvirt_hosts=(...))`` builds, starts and tears it down."""

    kind: ClassVar[str] = "libvirt"
    ssh_timeout_s: ClassVar[float] = 30.0

    def __init__(
        self, *, files: LibvirtFiles, caps_dir: Path, kvm: bool, **common: Unpack[SshdHostArgs]
    ) -> None:
        SshdHost.__init__(self, files=files, **common)
        self.files = files
        self.kvm = kvm
        self.libvirtd_start_s: float | None = None
        self._caps_dir = caps_dir
        self._uuids: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def accel(self) -> str:
        return "kvm" if self.kvm else "tcg"

    # ----------------------------------------------------------------- lifecycle
    def launch(self) -> None:
        """Starts the namespace, its init (which starts libvirt) and asks for sshd."""
        self._caps_dir.mkdir(parents=True, exist_ok=True)
        self._launch_sshd(
            LibvirtInit, ["--root", str(self.files.root), "--caps", str(self._caps_dir)]
        )

    def wait_ready(
        self, timeout: float = START_TIMEOUT_S, libvirtd_timeout: float = LIBVIRTD_TIMEOUT_S
    ) -> None:
        """Waits until sshd listens and libvirtd answers."""
        SshdHost.wait_ready(self, timeout)
        answer = self._request(f"wait-libvirtd {libvirtd_timeout:g}", libvirtd_timeout + 5)
        if not answer.startswith("ready "):
            raise LabError(f"libvirtd: {answer}:\n{self.files.log_tail()}", host=self.name)
        self.libvirtd_start_s = float(answer.split()[1])

    # ---------------------------------------------------------------------- ssh
    def ssh_exact(self, command: str, *, timeout: float = 30) -> tuple[int, str]:
        """Exit status and stdout exactly as sent: ``ssh`` reads text with universal newlines,
        which turns a CR (which a domain name may hold) into a line break."""
        result = subprocess.run(
            self.ssh_argv(command),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        return result.returncode, result.stdout.decode("utf-8", "surrogateescape")

    def virsh(self, *args: str, check: bool = True) -> str:
        command = shlex.join(["virsh", "-c", "qemu:///system", *args])
        return self.ssh(command, check=check).stdout

    # ---------------------------------------------------------------------- VMs
    def _domain(self, name: str) -> str:
        """How virsh is told which domain: its UUID when known (a name like "5" is an ID)."""
        check_domain_name(name)
        return self._uuids.get(name, name)

    def define_vm(self, name: str, *, uuid: str | None = None) -> str:
        """Defines a persistent microvm domain (KVM when usable, else TCG); returns its UUID."""
        with self._lock:
            path = self.files.write_domain(name, kvm=self.kvm, uuid=uuid)
            self.virsh("define", "--file", str(path))
            self._uuids[name] = path.stem
            return path.stem

    def start_vm(self, name: str) -> int:
        """Starts the domain (defining it first if this lab never did); returns the qemu PID."""
        if name not in self._uuids:
            self.define_vm(name)
        pid_file = shlex.quote(f"{RUN_DIR}/{pid_file_name(name)}")
        domain = self._domain(name)
        start = shlex.join(["virsh", "-c", "qemu:///system", "start", "--domain", domain])
        command = f"{start} >/dev/null && cat {pid_file}"
        try:
            text = self.ssh(command).stdout.strip()
        except SshCommandError as exc:
            # Seen once in a benchmark run right after a kill -9: libvirtd terminated the new
            # qemu while starting it. A second start then works; anything else is raised.
            if "qemu unexpectedly closed the monitor" not in str(exc):
                raise
            text = self.ssh(command).stdout.strip()
        if not text.isdigit():
            raise LabError(f"no qemu PID for {name!r}: {text!r}", host=self.name)
        return int(text)

    def stop_vm(self, name: str) -> None:
        """``virsh destroy``: returns once qemu is gone and the domain shut off."""
        self.virsh("destroy", "--domain", self._domain(name))

    def undefine_vm(self, name: str) -> None:
        """Removes the definition; a running domain keeps running (transient) until stopped."""
        self.virsh("undefine", "--domain", self._domain(name))
        self._uuids.pop(name, None)

    def domstate(self, name: str) -> str:
        """``virsh domstate``: "running", "shut off"..."""
        return self.virsh("domstate", "--domain", self._domain(name)).strip()

    def vm_pids(self) -> dict[str, int]:
        """Running domains as libvirtd reports them, with their qemu PID (from the pid file);
        a domain whose pid file is already gone (libvirtd cleaning up after a kill) is left out."""
        status, text = self.ssh_exact("virsh -c qemu:///system list --name")
        if status != 0:
            raise LabError(f"virsh list failed ({status}): {text!r}", host=self.name)
        names = [n for n in text.split("\n") if n]
        if not names:
            return {}
        files = " ".join(shlex.quote(f"{RUN_DIR}/{pid_file_name(n)}") for n in names)
        # One line per name, in order: its PID, or "-" when its pid file cannot be read.
        script = f'for f in {files}; do p=; read -r p < "$f" 2>/dev/null; echo "${{p:--}}"; done'
        pids = self.ssh_exact(script)[1].split("\n")[:-1]
        if len(pids) != len(names) or not all(p.isdigit() or p == "-" for p in pids):
            raise LabError(f"unexpected PIDs {pids!r} for {names!r}", host=self.name)
        return {n: int(p) for n, p in zip(names, pids, strict=True) if p != "-"}

    def __repr__(self) -> str:
        return f"LibvirtHost({self.name!r}, {self.address}:{self.port}, {self.accel})"


def start_hosts(hosts: Sequence[LibvirtHost], caps_dir: Path) -> None:
    """Starts hosts at once, except on a cold capabilities cache: then the first one alone
    fills it, so the others neither probe nor write the shared files concurrently."""
    rest = list(hosts)
    if rest and not caps_cached(caps_dir):
        first = rest.pop(0)
        first.launch()
        first.wait_ready()
    for host in rest:
        host.launch()
    for host in rest:
        host.wait_ready()


# A process the guards cannot judge, for tests (run with `python3 -c UNJUDGEABLE KIND COMM`):
# its comm set to COMM (a qemu's by default), then either a zombie leader whose other thread
# still runs (the main thread leaves with the raw exit syscall, not the whole process), or a
# live process whose argv area is made empty: PR_SET_MM_MAP with arg_end = arg_start, the rest
# of its memory map unchanged, so /proc/PID/cmdline reads empty (the single-field PR_SET_MM_*
# calls need CAP_SYS_RESOURCE, which this machine's root lacks; PR_SET_MM_MAP does not).
UNJUDGEABLE = """
import ctypes, os, platform, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
kind, comm = sys.argv[1], sys.argv[2]
libc.prctl(15, comm.encode(), 0, 0, 0)
if kind == "zombie-leader":
    threading.Thread(target=time.sleep, args=(3600,)).start()
    libc.syscall({"x86_64": 60, "aarch64": 93}[platform.machine()], 0)
elif kind == "empty-cmdline":
    libc.sbrk.restype = ctypes.c_void_p
    stat = open("/proc/self/stat").read().rpartition(") ")[2].split()
    f = [int(stat[n - 3]) for n in (26, 27, 45, 46, 47)]
    a = [int(stat[n - 3]) for n in (28, 48, 48, 50, 51)]
    class Map(ctypes.Structure):
        _fields_ = [(str(i), ctypes.c_uint64) for i in range(11)] + [
            ("auxv", ctypes.c_void_p), ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]
    mm = Map(*f, libc.sbrk(0), *a, None, 0, 0xFFFFFFFF)
    if libc.prctl(35, 14, ctypes.byref(mm), ctypes.sizeof(mm), 0) != 0:
        sys.exit("prctl(PR_SET_MM_MAP): " + os.strerror(ctypes.get_errno()))
    time.sleep(3600)
sys.exit("unknown kind " + kind)
"""
UNJUDGEABLE_KINDS = ("zombie-leader", "empty-cmdline")


def unjudgeable_argv(kind: str, comm: str = "qemu-system-x86") -> list[str]:
    if kind not in UNJUDGEABLE_KINDS:
        raise LabError(f"unknown kind {kind!r}")
    return [sys.executable, "-c", UNJUDGEABLE, kind, comm]
