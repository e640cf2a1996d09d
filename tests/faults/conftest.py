"""Fault-suite fixtures: the integration lab, and a ledger that checks the one invariant.

Set VMF_FAULTS_REPORT=FILE to write the table of scenarios (docs/faults.md) at the end of the run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

import vmflab
from tests.integration.conftest import fence, fence_failure, kvm_lab, lab, lab_unavailable
from tests.waiting import wait_until
from vmflab.chaos_report import kept_section
from vmflab.daemon import LabDaemon
from vmflab.procs import stopped

__all__ = [
    "FAST_KEEPALIVE",
    "Ledger",
    "check_hung_host",
    "fence_when_up",
    "fence_where_it_moved",
    "kvm_lab",
    "lab",
    "lab_unavailable",
    "ledger",
    "report_row",
]

T = TypeVar("T")
# A lab host of any kind (ESXi, esx-classic, libvirt) that the scenarios below can also stop.
AnyHost = vmflab.LabHost | vmflab.LibvirtHost
# Dead links are seen within keepalive_interval x (keepalive_count_max + 1) = 1.5 s.
FAST_KEEPALIVE = {"keepalive_interval": 0.5, "keepalive_count_max": 2}


class LabHost(Protocol):
    """What the ledger needs of a lab host, ESXi or libvirt alike."""

    name: str

    def start_vm(self, name: str) -> int: ...

    def vm_pids(self) -> dict[str, int]: ...

    def pid_alive(self, pid: int) -> bool: ...


_ROWS: list[dict[str, Any]] = []
HOSTILE = """Hostile input, in the same run (`tests/faults/test_hostile_socket.py`; the daemon keeps serving
and its memory stays bounded throughout): 150 random byte strings and 100 random JSON shapes
(hypothesis), 2,000 seeded mutations of valid requests, truncated JSON, a 2 MiB line without a
newline, 200,000-deep and 30,000-deep nesting, wrong types and unknown keys, 1,500 idle
connections beyond the 1,024 served at once (told `unavailable`), and a client that floods
requests and never reads its replies. An unauthorised uid, socket modes, malformed agent stdin
and every config key with a bad value are covered in tests/integration and tests/unit."""


@dataclass
class Ledger:
    """Every VM a scenario started, which ones it targeted, and what the daemon answered.

    `check()` asserts on the hosts' real process tables, not on the daemon's word: each target
    of a successful fence is gone (else a false success); each VM not targeted is alive (else a
    collateral kill).
    """

    scenario: str
    injected: str
    vms: dict[tuple[str, str], tuple[LabHost, int]] = field(default_factory=dict)
    others: dict[tuple[str, str], tuple[LabHost, int]] = field(default_factory=dict)
    targets: set[tuple[str, str]] = field(default_factory=set)
    successes: set[tuple[str, str]] = field(default_factory=set)
    outcome: str = ""
    seconds: float | None = None
    started: float = field(default_factory=time.monotonic)

    def start(self, host: LabHost, name: str, **kwargs: Any) -> int:
        pid = host.start_vm(name, **kwargs)
        self.vms[(host.name, name)] = (host, pid)
        return pid

    def target(self, host: str, name: str) -> None:
        self.targets.add((host, name))

    def succeeded(self, host: str, name: str) -> None:
        self.targets.add((host, name))
        self.successes.add((host, name))

    def timed(self, call: Callable[[], T]) -> T:
        """What `call` returns; the time it took is the scenario's time to outcome."""
        start = time.monotonic()
        answer = call()
        self.seconds = time.monotonic() - start
        return answer

    def track(self, host: LabHost, name: str, pid: int) -> None:
        """A process that is not a VM (checked by PID alone)."""
        self.others[(host.name, name)] = (host, pid)

    def _alive(self) -> dict[tuple[str, str], bool]:
        # A VM instance is alive while a VM of that name runs under that cartel: a PID reused
        # by something else does not keep it alive. One listing per host.
        running = {
            name: host.vm_pids() for name, host in {h.name: h for h, _ in self.vms.values()}.items()
        }
        alive = {key: running[key[0]].get(key[1]) == pid for key, (_h, pid) in self.vms.items()}
        alive.update({key: host.pid_alive(pid) for key, (host, pid) in self.others.items()})
        return alive

    def check(self) -> tuple[int, int]:
        alive = self._alive()
        false_successes = sum(1 for key in self.successes if alive[key])
        collateral = sum(1 for key, up in alive.items() if key not in self.targets and not up)
        _ROWS.append(
            {
                "scenario": self.scenario,
                "injected": self.injected,
                "outcome": self.outcome,
                "seconds": self.seconds,
                "false_successes": false_successes,
                "collateral": collateral,
                "checked": len(alive),
            }
        )
        assert false_successes == 0, "a fence reported success while its target still runs"
        assert collateral == 0, "a VM that was not targeted died"
        return false_successes, collateral


def fence_when_up(daemon: LabDaemon, ledger: Ledger, *, down: str, host: str, vm: str) -> None:
    """Once host `down` is up again, a fence of `vm` (on `host`) succeeds."""
    wait_until(lambda: daemon.host_state(down) == "up")
    reply = fence(daemon, vm)
    assert reply["ok"], reply
    ledger.succeeded(host, vm)


def fence_where_it_moved(daemon: LabDaemon, ledger: Ledger, host: AnyHost, vm: str) -> None:
    """`vm` started on `host` after the daemon's inventory, which saw it elsewhere: the fence
    finds it there and kills it."""
    ledger.start(host, vm)
    reply = ledger.timed(lambda: fence(daemon, vm))
    assert reply["ok"] and reply["result"]["host"] == host.name, reply
    ledger.succeeded(host.name, vm)


def check_hung_host(
    lab: vmflab.Lab,
    ledger: Ledger,
    *,
    hung: tuple[AnyHost, str],
    well: tuple[AnyHost, str],
    down_within_s: float | None = None,
    **settings: Any,
) -> None:
    """Every process of the `hung` host SIGSTOPped, then thawed: the daemon sees it down (within
    `down_within_s` if given), a fence of its VM fails meanwhile; after the thaw, it is up again and a
    fence of `well`'s VM, on another host, succeeds. `settings` go to the daemon's config."""
    (host, vm), (other, other_vm) = hung, well
    ledger.start(other, other_vm)
    ledger.start(host, vm)
    with LabDaemon(lab, ssh=FAST_KEEPALIVE, daemon={"fence_timeout": 2}, **settings) as daemon:
        with stopped(host):
            ledger.seconds = wait_until(lambda: daemon.host_state(host.name) == "down")
            ledger.target(host.name, vm)
            fence_failure(daemon, vm)
        # Checked before the ledger writes its row: a slow detection never reads as a pass.
        assert down_within_s is None or ledger.seconds < down_within_s, ledger.seconds
        fence_when_up(daemon, ledger, down=host.name, host=other.name, vm=other_vm)
    ledger.outcome = "down detected; fence on it failed; link back after thaw"
    ledger.check()


def report_row(**row: Any) -> None:
    """A row of the scenario table from a test that keeps no Ledger (the fault generator)."""
    _ROWS.append(row)


@pytest.fixture
def ledger(request: pytest.FixtureRequest) -> Iterator[Ledger]:
    doc = (request.function.__doc__ or request.node.name).strip().splitlines()
    book = Ledger(scenario=request.node.name.removeprefix("test_"), injected=doc[0])
    yield book


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    target = os.environ.get("VMF_FAULTS_REPORT")
    if not target or not _ROWS:
        return
    lines = [
        "# Fault suite: what was tried, what happened",
        "",
        "Generated by `VMF_FAULTS_REPORT=docs/faults.md python3 -m pytest tests/faults` on the",
        "real-sshd lab (real OpenSSH hosts in their own PID namespaces, real VM processes). After",
        "every scenario the hosts' real process tables are checked: a *false success* is a fence",
        "reported successful whose target still runs; a *collateral kill* is a VM the scenario did",
        "not target that died. Both must be 0.",
        "",
        "| scenario | injected | outcome | time to outcome | VMs checked | false successes | collateral kills |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in _ROWS:
        seconds = "-" if row["seconds"] is None else f"{row['seconds']:.3f} s"
        lines.append(
            f"| {row['scenario']} | {row['injected']} | {row['outcome']} | {seconds} | "
            f"{row['checked']} | {row['false_successes']} | {row['collateral']} |"
        )
    total_false = sum(r["false_successes"] for r in _ROWS)
    total_collateral = sum(r["collateral"] for r in _ROWS)
    lines += [
        "",
        f"Totals: {len(_ROWS)} scenarios, {total_false} false successes, "
        f"{total_collateral} collateral kills.",
        "",
        *HOSTILE.splitlines(),
        "",
    ]
    # The fault generator's long run (bench/faults.py) keeps its own section of the file.
    kept = kept_section(Path(target))
    Path(target).write_text("\n".join(lines) + ("\n" + kept if kept else ""))
