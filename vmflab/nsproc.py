"""A lab host seen from outside: ``unshare`` around the host's PID 1, the control pipe to it,
its PID namespace, and its teardown by PID.

Every lab host kind (ESXi, esx-classic, libvirt) and every cluster node machine is one of these;
the PID-1 program inside is ``vmflab.pid1.core`` with the kind's layer.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from vmflab.control import InitControl, LabError
from vmflab.pid1.core import BOOT, Init

REQUEST_TIMEOUT_S = 10.0
GONE_TIMEOUT_S = 10.0
PACKAGE_PARENT = Path(__file__).resolve().parent.parent
MAX_PID = 2**22  # the kernel's PID_MAX_LIMIT on 64-bit machines


def parent_pid(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def pid_namespace(pid: int) -> int | None:
    """Inode of the PID namespace of ``pid``, None if it is gone."""
    try:
        return Path(f"/proc/{pid}/ns/pid").stat().st_ino
    except OSError:
        return None


def pids_in(namespaces: set[int]) -> list[int]:
    """PIDs (as seen from here) of every process whose PID namespace is one of ``namespaces``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "ns" / "pid").stat().st_ino in namespaces:
                    found.append(int(entry.name))
    return found


def processes_in(namespaces: set[int]) -> dict[int, str]:
    """Every process (PID -> command name) whose PID namespace is one of ``namespaces``."""
    found = {}
    for pid in pids_in(namespaces):
        with contextlib.suppress(OSError):
            found[pid] = Path(f"/proc/{pid}/comm").read_text().removesuffix("\n")
    return found


def pid1_command(kind: type[Init], args: Sequence[str]) -> list[str]:
    """The command line of the lab's PID 1 with the layer ``kind``: the package is found by
    path, as ``-I -S`` leave the working directory and site-packages out of ``sys.path``."""
    where = f"{kind.__module__}:{kind.__qualname__}"
    return [sys.executable, "-I", "-S", "-c", BOOT, str(PACKAGE_PARENT), where, *args]


def check_pid(pid: int) -> None:
    if not 2 <= pid < MAX_PID:
        raise LabError(f"PID {pid} outside 2..{MAX_PID - 1}")


class NamespaceProcess:
    """``unshare --pid --fork --kill-child --mount-proc --mount`` around a PID-1 program that
    answers one line per request on its stdin (see ``InitControl``). ``name`` names the host in
    errors; the init's stderr goes to ``err_file``."""

    def __init__(self, name: str, err_file: Path) -> None:
        self.name = name
        self._err_file = err_file
        self._proc: subprocess.Popen[bytes] | None = None
        self._control: InitControl | None = None
        self._init_pid: int | None = None
        self._pid_ns: int | None = None

    def _launch(
        self,
        kind: type[Init],
        args: Sequence[str],
        *,
        uts_net: bool = False,
        pass_fds: Sequence[int] = (),
    ) -> InitControl:
        """Starts the lab's PID 1 with the layer ``kind`` and its ``args`` (``uts_net``: with
        a hostname and network of its own too)."""
        if self._proc is not None:
            raise LabError("host already launched", host=self.name)
        unshare = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--mount"]
        if uts_net:
            unshare += ["--uts", "--net"]
        with self._err_file.open("ab") as err:
            self._proc = subprocess.Popen(
                [*unshare, "--propagation", "private", "--", *pid1_command(kind, args)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                close_fds=True,
                pass_fds=tuple(pass_fds),
            )
        self._control = InitControl(self._proc, host=self.name, err_file=self._err_file)
        return self._control

    def _found_init(self) -> int:
        """Records the init's PID and PID namespace once it runs; returns the PID."""
        pid = self._find_init_pid()
        namespace = pid_namespace(pid)
        if namespace is None:
            raise LabError("the init vanished during start-up", host=self.name)
        self._init_pid, self._pid_ns = pid, namespace
        return pid

    def _find_init_pid(self) -> int:
        proc = self._require_proc()
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except FileNotFoundError:  # kernel without CONFIG_PROC_CHILDREN
            children = [
                entry.name
                for entry in Path("/proc").iterdir()
                if entry.name.isdigit() and parent_pid(entry) == proc.pid
            ]
        if len(children) != 1:
            raise LabError(f"unshare {proc.pid} has children {children}", host=self.name)
        return int(children[0])

    @property
    def unshare_pid(self) -> int | None:
        """PID of the host's ``unshare`` process (parent of its init), while the host runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def init_pid(self) -> int | None:
        """PID (in the lab's namespace) of the host's init, once the host is ready."""
        return self._init_pid

    @property
    def pid_ns(self) -> int | None:
        """Inode of the host's PID namespace, once the host is ready."""
        return self._pid_ns

    def namespace_pids(self) -> list[int]:
        """PIDs (as seen from outside) of every process still in this host's PID namespace."""
        return pids_in({self._pid_ns}) if self._pid_ns is not None else []

    def _request(self, line: str, timeout: float = REQUEST_TIMEOUT_S) -> str:
        return self._require_control().request(line, timeout)

    def _claim_pid(self, pid: int) -> None:
        """Raises LabError unless ``pid`` is free in the host now (the init checks)."""
        check_pid(pid)
        answer = self._request(f"pid-free {pid}")
        if answer != "ok":
            raise LabError(f"cannot give PID {pid} to the next VM: {answer}", host=self.name)

    def spawn(self, argv: Sequence[str], *, pid: int | None = None) -> int:
        """Starts a process on the host (stdio /dev/null, own session), with ``pid`` if given:
        the init sets ``ns_last_pid`` right before its fork. Returns the PID."""
        if pid is not None:
            check_pid(pid)
        answer = self._request(f"spawn {pid or 0} {json.dumps(list(argv))}")
        if not answer.startswith("ok "):
            raise LabError(f"cannot spawn {list(argv)!r}: {answer}", host=self.name)
        return int(answer.split()[1])

    def open_pidfd(self) -> int | None:
        """A pidfd readable once the host has ended (None if it never started or is reaped)."""
        if self._proc is None:
            return None
        try:
            return os.pidfd_open(self._proc.pid)
        except ProcessLookupError:
            return None

    def kill(self) -> None:
        """SIGKILLs the host's init: the kernel then kills every process of the namespace."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        pid = self._init_pid
        if pid is None:
            with contextlib.suppress(LabError, OSError, ValueError):
                pid = self._find_init_pid()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid if pid is not None else proc.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> bool:
        """Waits until the init has exited; True if it did."""
        proc = self._proc
        if proc is None:
            return True
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def close(self) -> None:
        """Kills the host (every process of its namespace) and waits until its init is gone."""
        proc = self._proc
        if proc is None:
            return
        try:
            self.kill()
            if not self.wait(GONE_TIMEOUT_S):
                proc.kill()  # --kill-child: the init follows unshare
                proc.wait(GONE_TIMEOUT_S)
        finally:
            if self._control is not None:
                self._control.close()
            self._control = None
            self._proc = None

    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise LabError("host not started", host=self.name)
        return self._proc

    def _require_control(self) -> InitControl:
        if self._control is None:
            raise LabError("host not started", host=self.name)
        return self._control
