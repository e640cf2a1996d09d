"""The truth oracle of the fault generator (``vmflab.chaos``): what really runs on the lab's hosts,
and a check of every daemon reply against it.

The truth is read from the kernel's process table of each host's PID namespace, from outside
(``/proc/<pid>/stat`` of the process as this namespace sees it): no ssh, no shim, no parser the
daemon shares, and it answers while a host is frozen or its sshd is dead. A process instance is
identified by its outer PID and its start time (clock ticks since boot), so a PID reused by
another process is never mistaken for the one the schedule started.

Rules, per reply (the time rules keep races the schedule makes on purpose from being counted):

* ``fence off`` answered ok: right after the reply, no instance of that VM name whose start had
  returned before the request was sent may run on any lab host, in the daemon's config or not.
  Else a *false success*.
* ``vm_status`` answered ``off``: same check, else a *false OFF*.
* an instance that died although the schedule did not kill it and no fence of its name was in
  flight while it lived: a *collateral kill* (unrelated processes that got a reused PID carry a
  name no fence ever uses).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vmflab.control import LabError

MAX_EXAMPLES = 12
EXAMPLES_PER_CLASS = 2


class Host(Protocol):
    """A lab host of any kind, as the oracle sees it: processes of one PID namespace."""

    name: str

    def namespace_pids(self) -> list[int]: ...


@dataclass
class Instance:
    """One process the schedule started: a VM (by display name) or an unrelated process."""

    vm: str
    host: str
    pid: int  # as the host sees it: the cartel ID or qemu PID the daemon deals with
    outer: int
    ticks: int  # start time, clock ticks since boot
    begun: float  # time.monotonic() before the start was asked
    started: float  # time.monotonic() once the start returned
    is_vm: bool = True
    killed_by_schedule: bool = False
    dead_at: float | None = None


@dataclass
class Window:
    """A request in flight: from the moment it was sent to its reply (None while pending)."""

    op: str
    vm: str
    sent: float
    replied: float | None = None


@dataclass
class Tally:
    """What a run did and found; the report is built from it."""

    ops: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    hostile: Counter[str] = field(default_factory=Counter)  # names started, by class
    findings: Counter[str] = field(default_factory=Counter)  # false answers, by situation
    # Answers the evidence rules allow while a VM runs on a host outside the config: counted
    # apart, never as false answers (docs/safety.md, "Known limits").
    beyond: Counter[str] = field(default_factory=Counter)
    false_successes: int = 0
    false_off: int = 0
    collateral: int = 0
    instances: int = 0
    examples: list[str] = field(default_factory=list)


def proc_stat(outer: int) -> tuple[str, int] | None:
    """(state letter, start ticks) of a process of this namespace, None when it is gone."""
    try:
        text = Path(f"/proc/{outer}/stat").read_text()
    except OSError:
        return None
    _, sep, rest = text.rpartition(") ")
    fields = rest.split()
    if not sep or len(fields) < 20:
        raise LabError(f"unexpected /proc/{outer}/stat {text[:200]!r}")
    # Fields 3 (state) and 22 (starttime) of proc(5), counted from the one after the comm.
    return fields[0], int(fields[19])


def inner_pid(outer: int) -> int | None:
    """The PID a process has in its own (innermost) PID namespace."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{outer}/status").read_text().split("\n"):
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    return None


def find_outer(host: Host, pid: int) -> int:
    """The outer PID of the process that has ``pid`` inside ``host``."""
    for outer in host.namespace_pids():
        if inner_pid(outer) == pid:
            return outer
    raise LabError(f"no process {pid} on {host.name}", host=host.name)


class Oracle:
    """Thread-safe: requests are checked in the threads that sent them."""

    def __init__(
        self, configured: set[str], registered: Callable[[str], bool] | None = None
    ) -> None:
        """``registered(vm)``: whether a configured host has ``vm`` registered, to tell apart
        the false answers about a VM running outside the config (see ``_situation``)."""
        self.configured = configured
        self.registered = registered
        self.tally = Tally()
        self._instances: list[Instance] = []
        self._windows: list[Window] = []
        self._lock = threading.Lock()
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------ the schedule's side
    def started(
        self, host: Host, vm: str, pid: int, begun: float, *, is_vm: bool = True
    ) -> Instance:
        """Records a process the schedule just started (``pid`` as the host sees it)."""
        done = time.monotonic()
        outer = find_outer(host, pid)
        stat = proc_stat(outer)
        if stat is None:
            raise LabError(f"{vm} ({pid}) died at once", host=host.name)
        instance = Instance(vm, host.name, pid, outer, stat[1], begun, done, is_vm)
        with self._lock:
            self._instances.append(instance)
            self.tally.instances += 1
        return instance

    def live(self, host: str | None = None, *, vms_only: bool = True) -> list[Instance]:
        """Instances alive now (on ``host`` if given)."""
        with self._lock:
            found = [i for i in self._instances if i.dead_at is None and self._alive(i)]
        return [i for i in found if (host is None or i.host == host) and (i.is_vm or not vms_only)]

    def killing(self, instance: Instance) -> None:
        """Marks an instance as killed by the schedule itself, before the kill is sent."""
        with self._lock:
            instance.killed_by_schedule = True

    # -------------------------------------------------------------------- the daemon's side
    def sent(self, op: str, vm: str) -> Window:
        with self._lock:
            self._sweep()  # a death seen now is not blamed on this request
            window = Window(op, vm, time.monotonic())
            self._windows.append(window)
            return window

    def replied(self, window: Window, reply: dict[str, Any] | None) -> None:
        """Checks one reply against the process tables, right after it arrived."""
        with self._lock:
            window.replied = time.monotonic()
            outcome = self._outcome(window, reply)
            self.tally.replies[f"{window.op}: {outcome}"] += 1
            claims_off = (window.op == "fence" and outcome in ("killed", "already_off")) or (
                window.op == "vm_status" and outcome == "off"
            )
            if claims_off:
                running = [
                    i
                    for i in self._instances
                    if i.is_vm and i.vm == window.vm and i.started <= window.sent and self._alive(i)
                ]
                counted = [i for i in running if not self._beyond(i, outcome)]
                if counted:
                    self._finding(window, outcome, reply or {}, counted)
            self._sweep()

    def sweep(self) -> None:
        with self._lock:
            self._sweep()

    # ------------------------------------------------------------------------------ inside
    def _outcome(self, window: Window, reply: dict[str, Any] | None) -> str:
        if reply is None:
            self.tally.failures["no reply (connection)"] += 1
            return "no reply"
        if reply.get("ok"):
            result = reply.get("result") or {}
            return str(result.get("outcome") or result.get("state"))
        error = reply.get("error") or {}
        code = str(error.get("code"))
        self.tally.failures[f"{code}: {reason_class(str(error.get('message', '')))}"] += 1
        return code

    def _finding(
        self, window: Window, outcome: str, reply: dict[str, Any], running: list[Instance]
    ) -> None:
        """Counts a false success or false OFF, with the situation that explains it."""
        label = "false success" if window.op == "fence" else "false OFF"
        if window.op == "fence":
            self.tally.false_successes += 1
        else:
            self.tally.false_off += 1
        result = reply.get("result") or {}
        killed_on = result.get("host")
        situations = sorted({f"{label}: {self._situation(i, killed_on)}" for i in running})
        said = f"{outcome} (host {killed_on}, cartel {result.get('cartel')})"
        # The first few of each situation: one class found often must not hide the others.
        if min(self.tally.findings[key] for key in situations) < EXAMPLES_PER_CLASS:
            self._example(
                f"{label.upper()}: {window.op} {window.vm!r} answered {said} while it runs on "
                + ", ".join(self._where(i) for i in running)
            )
        self.tally.findings.update(situations)

    def _beyond(self, instance: Instance, outcome: str) -> bool:
        """An instance on a host outside the config that the rules cannot be asked to see:
        beside a killed instance (no configured host can show a twin elsewhere), or while a
        configured host registers the VM (the rules' positive evidence that it is off).
        Counted in `tally.beyond`, by situation."""
        if instance.host in self.configured:
            return False
        if outcome == "killed":
            why = "killed on a configured host while a twin runs outside the config"
        elif self.registered is not None and self.registered(instance.vm):
            why = f"{outcome} while it runs outside the config, registered on a configured host"
        else:
            return False
        self.tally.beyond[why] += 1
        return True

    def _situation(self, instance: Instance, killed_on: object) -> str:
        if instance.host not in self.configured:
            # Still registered on a configured host, the VM looks there exactly like one that
            # crashed: only a daemon that remembers it running could doubt.
            if self.registered is None:
                return "VM runs on a host outside the config"
            if self.registered(instance.vm):
                return "VM runs outside the config, still registered on a configured host"
            return "VM runs outside the config, registered on no configured host"
        if instance.host == killed_on:
            return "another VM of that name on the host where it killed one"
        twins = [
            i
            for i in self._instances
            if i.vm == instance.vm and i is not instance and self._alive(i)
        ]
        if any(i.host == instance.host for i in twins):
            return "two VMs of that name on one configured host"
        if killed_on is not None:
            return "twin on another configured host than the one it killed on"
        return "VM runs on a configured host"

    def _alive(self, instance: Instance) -> bool:
        stat = proc_stat(instance.outer)
        return stat is not None and stat[1] == instance.ticks and stat[0] not in "ZXx"

    def _where(self, instance: Instance) -> str:
        outside = "" if instance.host in self.configured else " (outside the config)"
        return f"{instance.host}{outside} pid {instance.pid}"

    def _sweep(self) -> None:
        now = time.monotonic()
        for instance in self._instances:
            if instance.dead_at is not None or self._alive(instance):
                continue
            instance.dead_at = now
            if instance.killed_by_schedule:
                continue
            fenced = any(
                w.op == "fence"
                and w.vm == instance.vm
                and instance.is_vm
                and (w.replied is None or w.replied >= instance.begun)
                for w in self._windows
            )
            if not fenced:
                self.tally.collateral += 1
                what = "VM" if instance.is_vm else "unrelated process"
                self._example(
                    f"COLLATERAL KILL: {what} {instance.vm!r} on {self._where(instance)} died "
                    "with no fence of its name in flight"
                )

    def _example(self, text: str) -> None:
        if len(self.tally.examples) < MAX_EXAMPLES:
            self.tally.examples.append(f"[{time.monotonic() - self._t0:7.2f} s] {text}")


def reason_class(message: str) -> str:
    """A short class of a failure message, for the summary (the daemon's wording may change)."""
    text = message.lower()
    for needle, label in (
        ("not understood", "listing not readable"),
        ("unreadable", "listing not readable"),
        ("ambiguous", "ambiguous (several hosts)"),
        ("several", "ambiguous (several)"),
        ("unreachable", "host unreachable"),
        ("fence_timeout", "fence_timeout"),
        ("no answer", "no answer in time"),
        ("still running", "still running after kill -9"),
        ("kept moving", "kept moving"),
        ("control", "name refused"),
        ("string should match", "name refused"),
        ("no host runs", "unknown"),
    ):
        if needle in text:
            return label
    return text[:40] or "-"
