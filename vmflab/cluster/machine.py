"""One boot of a cluster node (a "machine"), and the switch that links the machines.

A machine is ``unshare --pid --mount --uts --net`` around the lab's PID 1 with the node layer
(``vmflab.cluster.pid1``), bound to one process of the node's VM. Its network is a veth pair
whose other end is a port of a bridge in the switch's network namespace; the addresses exist
only inside those namespaces.
Everything is torn down by PID: SIGKILL of a machine's init kills its whole PID namespace.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vmflab.cluster.config import NODE_PYTHON_DIR, NodeSpec
from vmflab.cluster.pid1 import NodeInit
from vmflab.control import LabError
from vmflab.nsproc import GONE_TIMEOUT_S, NamespaceProcess, processes_in

BRIDGE = "br0"
PREFIX_LEN = 24
MAX_IFNAME = 15
BOOT_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 40.0
NODE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C", "HOME": "/root"}


def hacluster_ids() -> tuple[int, int]:
    try:
        return pwd.getpwnam("hacluster").pw_uid, grp.getgrnam("haclient").gr_gid
    except KeyError as exc:
        raise LabError("no hacluster user or haclient group: is pacemaker installed?") from exc


@dataclass(frozen=True)
class NodeDirs:
    """A node's persistent state (its "disk"), under ``<cluster workdir>/nodes/<node>``."""

    root: Path

    @property
    def lib(self) -> Path:  # /var/lib/pacemaker
        return self.root / "pacemaker"

    @property
    def log(self) -> Path:  # /var/log/pacemaker: pacemaker.log, corosync.log
        return self.root / "log"

    @property
    def corosync_lib(self) -> Path:
        return self.root / "corosync-lib"

    @property
    def corosync_etc(self) -> Path:
        return self.root / "corosync-etc"

    @property
    def sbin(self) -> Path:  # overlaid on /usr/sbin: the node's extra fence agents
        return self.root / "sbin"

    @property
    def cib(self) -> Path:
        return self.lib / "cib" / "cib.xml"

    def create(self) -> None:
        uid, gid = hacluster_ids()
        for path in (self.root, self.corosync_lib, self.corosync_etc, self.sbin):
            path.mkdir(mode=0o755, parents=True, exist_ok=True)
        for path, mode in ((self.lib, 0o750), (self.log, 0o770)):
            path.mkdir(mode=mode, exist_ok=True)
            os.chown(path, uid, gid)
        for sub in ("cib", "pengine", "blackbox", "cores"):
            (self.lib / sub).mkdir(mode=0o750, exist_ok=True)
            os.chown(self.lib / sub, uid, gid)

    def write_cib(self, text: str) -> None:
        """Pre-seeds the CIB (hacluster:haclient, 0600), as the node's first boot will read it."""
        uid, gid = hacluster_ids()
        self.cib.write_text(text)
        os.chown(self.cib, uid, gid)
        self.cib.chmod(0o600)

    def install(self, name: str, text: str) -> None:
        """Puts an executable into the node's /usr/sbin overlay."""
        path = self.sbin / name
        path.write_text(text)
        path.chmod(0o755)

    def pacemaker_log(self, size: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return (self.log / "pacemaker.log").read_text(errors="replace")[-size:]
        return ""


def run_checked(argv: list[str], *, what: str, stdin: str | None = None) -> None:
    result = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        raise LabError(f"{what}: {' '.join(argv)} exited {result.returncode}: {result.stderr}")


class Switch:
    """A bridge in a network namespace of its own, held by a ``cat`` reading a pipe from us:
    if the harness dies, cat reads EOF and the namespace goes with it."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            ["unshare", "--net", "--", "cat"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        pid = self._proc.pid
        # unshare execs cat once the namespace exists: wait for that exec.
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while Path(f"/proc/{pid}/ns/net").stat().st_ino == Path("/proc/self/ns/net").stat().st_ino:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise LabError("the switch's network namespace did not come up")
            time.sleep(0.005)
        self.ip_batch(f"link set lo up\nlink add {BRIDGE} type bridge\nlink set {BRIDGE} up\n")

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise LabError("switch not started")
        return self._proc.pid

    def ip_batch(self, commands: str) -> None:
        run_checked(
            ["nsenter", "-t", str(self.pid), "-n", "ip", "-batch", "-"],
            what="switch",
            stdin=commands,
        )

    def attach(self, init_pid: int, port: str, address: str) -> None:
        """A veth from the bridge to ``eth0`` of the machine whose init is ``init_pid``."""
        self.ip_batch(
            f"link add {port} type veth peer name eth0 netns {init_pid}\n"
            f"link set {port} master {BRIDGE} up\n"
        )
        run_checked(
            ["nsenter", "-t", str(init_pid), "-n", "ip", "-batch", "-"],
            what="node network",
            stdin=f"addr add {address}/{PREFIX_LEN} dev eth0\nlink set eth0 up\n",
        )

    def close(self) -> None:
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=GONE_TIMEOUT_S)
        if proc.stdin is not None:
            proc.stdin.close()
        self._proc = None


class Machine(NamespaceProcess):
    """One boot of node ``spec``, bound to the VM process behind ``vm_pidfd``."""

    def __init__(
        self,
        spec: NodeSpec,
        dirs: NodeDirs,
        switch: Switch,
        *,
        boot: int,
        python_dir: Path | None = None,
    ) -> None:
        NamespaceProcess.__init__(self, spec.name, dirs.root / "init.err")
        self.spec = spec
        self.python_dir = python_dir
        self.dirs = dirs
        self.boot_number = boot
        self._switch = switch

    @property
    def init_log(self) -> Path:
        return self.dirs.root / "init.log"

    @property
    def init_err(self) -> Path:
        return self._err_file

    def boot(self, vm_pidfd: int, timeout: float = BOOT_TIMEOUT_S) -> None:
        """Namespaces and mounts, network, then corosync and pacemakerd (the join is not
        waited for here). Raises LabError, leaving whatever started for ``close``."""
        dirs = self.dirs
        python = ["--python-dir", str(self.python_dir), "--python-mount", NODE_PYTHON_DIR]
        control = self._launch(
            NodeInit,
            [
                *("--hostname", self.spec.name, "--vm-pidfd", str(vm_pidfd)),
                *("--lib-dir", str(dirs.lib), "--log-dir", str(dirs.log)),
                *("--corosync-lib", str(dirs.corosync_lib)),
                *("--corosync-etc", str(dirs.corosync_etc), "--sbin-dir", str(dirs.sbin)),
                *("--log", str(self.init_log), "--stack-log", str(dirs.log / "stack.log")),
                *(python if self.python_dir else []),
            ],
            uts_net=True,
            pass_fds=(vm_pidfd,),
        )
        self._expect(control.read_reply(timeout), "ready")
        init_pid = self._found_init()
        # Interface names are at most 15 bytes; each boot gets a new one (the old pair may
        # linger a moment while the kernel destroys the previous network namespace).
        port = f"n{self.spec.nodeid}b{self.boot_number}"
        if len(port) > MAX_IFNAME:
            raise LabError(f"interface name {port!r} too long", host=self.name)
        self._switch.attach(init_pid, port, self.spec.address)
        self._expect(control.request("start", timeout), "started")

    def _expect(self, answer: str, wanted: str) -> None:
        if answer != wanted:
            raise LabError(f"init answered {answer!r} instead of {wanted!r}", host=self.name)

    def run(
        self, argv: list[str], *, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``argv`` inside the machine (all its namespaces, PID one included)."""
        if self.init_pid is None:
            raise LabError("machine not booted", host=self.name)
        result = subprocess.run(
            ["nsenter", "-t", str(self.init_pid), "-m", "-u", "-n", "-p", "--", *argv],
            env=NODE_ENV,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise LabError(
                f"{' '.join(argv)} exited {result.returncode}: {result.stdout}{result.stderr}",
                host=self.name,
            )
        return result

    def processes(self) -> dict[int, str]:
        """PID (outside) -> command name of every process of this machine."""
        return processes_in({self.pid_ns}) if self.pid_ns is not None else {}

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stops pacemakerd (which leaves the cluster cleanly), then corosync."""
        self._expect(self._request("stop", timeout), "stopped")

    def diagnosis(self, size: int = 1500) -> str:
        """The end of the init's log and error output."""
        texts = []
        for path in (self.init_log, self.init_err):
            with contextlib.suppress(OSError):
                texts.append(path.read_text(errors="replace")[-size:].strip())
        return " | ".join(t for t in texts if t) or "no output"

    def close(self) -> None:
        """Kills the machine if it still runs and waits until none of its processes is left."""
        if self._proc is None:
            return
        NamespaceProcess.close(self)
        deadline = time.monotonic() + GONE_TIMEOUT_S
        while left := self.processes():
            if time.monotonic() > deadline:
                raise LabError(f"processes survive the machine: {left}", host=self.name)
            time.sleep(0.01)
