"""The tie between a cluster node and its VM: a thread that boots the node whenever the VM's
process runs and records when that process dies.

Each process of the VM is one "life" of the node: the supervisor opens a pidfd on it, boots a
machine bound to it (the machine's init exits, killing the node, the moment the process dies),
and waits. The death time it records is the kernel's word that the VM process is gone, so
fencing is measured and checked on the VM itself, not on anyone's report.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vmflab.cluster.config import NodeSpec
from vmflab.cluster.machine import Machine, NodeDirs
from vmflab.cluster.vm import NodeVm
from vmflab.control import LabError
from vmflab.nsproc import GONE_TIMEOUT_S

REBOOT_WAIT_S = 60.0
REBOOT_POLL_S = 0.25  # each look runs crm_mon and stonith_admin on a survivor
POLL_S = 0.02  # how often a VM that is off is looked for


@dataclass
class Life:
    """One process of a node's VM and the machine booted for it (times: time.monotonic())."""

    vm_pid: int
    seen: float
    booted: float | None = None
    died: float | None = None
    error: str | None = None


@dataclass(eq=False)
class NodeSupervisor:
    """Boots ``spec`` on every new process of ``vm``; ``changed`` is notified on every event.

    ``new_machine(n)`` makes the (unbooted) machine of the node's n-th boot; ``may_reboot()``
    tells when a node that ran before may boot again."""

    spec: NodeSpec
    dirs: NodeDirs
    vm: NodeVm
    new_machine: Callable[[int], Machine]
    changed: threading.Condition
    may_reboot: Callable[[], bool] = field(default=lambda: True, kw_only=True)
    failure: str | None = field(default=None, init=False)
    _lives: list[Life] = field(default_factory=list, init=False)
    _machine: Machine | None = field(default=None, init=False)
    _dead: set[int] = field(default_factory=set, init=False)
    _boots: int = field(default=0, init=False)
    _namespaces: set[int] = field(default_factory=set, init=False)
    _stopping: threading.Event = field(default_factory=threading.Event, init=False)

    def __post_init__(self) -> None:
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(
            target=self._run, name=f"vmflab-node-{self.spec.name}", daemon=True
        )

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise LabError("node supervisor did not stop", host=self.spec.name)
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def lives(self) -> list[Life]:
        with self.changed:
            return [Life(**vars(life)) for life in self._lives]

    @property
    def machine(self) -> Machine | None:
        """The machine of the current life, once booted and while the VM runs."""
        with self.changed:
            return self._machine

    @property
    def namespaces(self) -> set[int]:
        """PID namespaces of every machine this node ever booted (for leak checks)."""
        with self.changed:
            return set(self._namespaces)

    # ------------------------------------------------------------------ thread
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                pid = self._wait_for_vm()
                if pid is None:
                    return
                self._live(pid)
        except Exception as exc:
            with self.changed:
                self.failure = f"{type(exc).__name__}: {exc}"
                self.changed.notify_all()

    def _wait_for_vm(self) -> int | None:
        while not self._stopping.is_set():
            pid = self.vm.process()
            if pid is not None and pid not in self._dead:
                return pid
            self._stopping.wait(POLL_S)
        return None

    def _live(self, pid: int) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._dead.add(pid)
            return
        try:
            # The PID may have been reused between the scan and the open: look again.
            if self.vm.process() != pid:
                return
            if self._boots and not self._boot_allowed(pidfd):
                return
            self._boots += 1
            machine = self.new_machine(self._boots)
            life = Life(vm_pid=pid, seen=time.monotonic())
            with self.changed:
                self._lives.append(life)
            try:
                self._boot(machine, pidfd, life)
                self._wait_for_death(machine, pidfd, life)
            finally:
                with self.changed:
                    self._machine = None
                machine.close()
                with self.changed:
                    self.changed.notify_all()
        finally:
            os.close(pidfd)

    def _boot_allowed(self, pidfd: int) -> bool:
        """Waits (like a VM's firmware and boot loader) until the cluster has finished with
        the node's previous life; False if the VM died meanwhile or the lab stops."""
        deadline = time.monotonic() + REBOOT_WAIT_S
        while not self.may_reboot():
            if self._stopping.is_set() or readable(pidfd):
                return False
            if time.monotonic() > deadline:
                break  # boot anyway: a test waiting on the node will report what it sees
            self._stopping.wait(REBOOT_POLL_S)
        return not readable(pidfd)

    def _boot(self, machine: Machine, pidfd: int, life: Life) -> None:
        try:
            machine.boot(pidfd)
        except (LabError, OSError, subprocess.SubprocessError) as exc:
            error: str | None = str(exc)
        else:
            error = None
        with self.changed:
            if machine.pid_ns is not None:
                self._namespaces.add(machine.pid_ns)
            if error is None:
                life.booted = time.monotonic()
                self._machine = machine
            elif not readable(pidfd):  # a VM that died during the boot is no boot failure
                life.error = error
            self.changed.notify_all()

    def _wait_for_death(self, machine: Machine, pidfd: int, life: Life) -> None:
        machine_fd = machine.open_pidfd()
        watched = [pidfd, self._stop_r] + ([machine_fd] if machine_fd is not None else [])
        try:
            while True:
                ready = select.select(watched, [], [])[0]
                if pidfd in ready:
                    break
                if self._stop_r in ready:
                    return
                # The machine ended on its own while its VM runs: a broken lab, say so.
                watched.remove(ready[0])
                with self.changed:
                    life.error = f"the machine ended while its VM runs: {machine.diagnosis()}"
                    self._machine = None
                    self.changed.notify_all()
        finally:
            if machine_fd is not None:
                os.close(machine_fd)
        died = time.monotonic()
        self._dead.add(life.vm_pid)
        with self.changed:
            life.died = died
            self._machine = None
            self.changed.notify_all()
        # The machine's init saw it too and is ending the machine; close() makes sure.
        machine.wait(GONE_TIMEOUT_S)


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])
