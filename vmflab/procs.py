"""A lab host's processes seen from outside its PID namespace: find a VM's, stop them all."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from vmflab.control import LabError


class Namespaced(Protocol):
    """A lab host of any kind: its processes are those of its PID namespace."""

    name: str

    @property
    def init_pid(self) -> int | None: ...

    def namespace_pids(self) -> list[int]: ...


def outer_pid(host: Namespaced, vm: str) -> int:
    """The VM's PID as this (outer) PID namespace sees it, to signal it without ssh."""
    for pid in host.namespace_pids():
        with contextlib.suppress(OSError):
            if f"/{vm}.vmx".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    raise LabError(f"{vm} not running", host=host.name)


@contextlib.contextmanager
def stopped(host: Namespaced) -> Iterator[list[int]]:
    """Every process of the host but its reaper stopped: TCP stays open, nothing answers.
    SIGCONTed on the way out, whatever happened meanwhile."""
    pids = [pid for pid in host.namespace_pids() if pid != host.init_pid]
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # it may exit meanwhile
                os.kill(pid, signal.SIGSTOP)
        yield pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
