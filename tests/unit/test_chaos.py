"""The fault generator's oracle rules, hostile names and report section, without the lab."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmflab.chaos_names import LIMITS, SEPARATORS, hostile_name
from vmflab.chaos_report import BEGIN, END, kept_section, write_section
from vmflab.oracle import Oracle, proc_stat, reason_class


class Local:
    """A 'host' whose namespace is this one: the oracle finds the test's own children."""

    name = "local"

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def namespace_pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def spawn(self) -> int:
        self.procs.append(subprocess.Popen(["sleep", "600"]))
        return self.procs[-1].pid


@pytest.fixture
def host() -> Iterator[Local]:
    local = Local()
    yield local
    for proc in local.procs:  # by PID, whatever the test did
        proc.kill()
        proc.wait()


def ok(outcome: str) -> dict[str, Any]:
    return {"ok": True, "result": {"outcome": outcome, "state": outcome}}


def dead(pid: int) -> None:
    """Kills a child and polls until it is dead (a zombie counts) or a deadline passes."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (stat := proc_stat(pid)) is not None and stat[0] not in "ZX":
        assert time.monotonic() < deadline, "child survived SIGKILL"
        time.sleep(0.005)


def test_success_while_the_vm_runs_is_false(host: Local) -> None:
    oracle = Oracle({"local"})
    pid = host.spawn()
    oracle.started(host, "vm1", pid, time.monotonic())
    oracle.replied(oracle.sent("fence", "vm1"), ok("already_off"))
    oracle.replied(oracle.sent("vm_status", "vm1"), ok("off"))
    oracle.replied(oracle.sent("vm_status", "vm1"), ok("on"))
    oracle.replied(oracle.sent("fence", "vm2"), ok("already_off"))
    assert (oracle.tally.false_successes, oracle.tally.false_off) == (1, 1)
    assert oracle.tally.findings["false success: VM runs on a configured host"] == 1


def test_a_vm_outside_the_config_counts_unless_the_rules_evidence_covers_it(
    host: Local,
) -> None:
    """Outside the config: a twin beside a kill, or a VM a configured host registers, is what
    the rules answer (kept apart); a VM registered nowhere configured answered OFF is false."""
    registered = {"vm1"}
    oracle = Oracle({"esx1"}, registered=lambda vm: vm in registered)
    for name in ("vm1", "vm2"):
        oracle.started(host, name, host.spawn(), time.monotonic())
    oracle.replied(oracle.sent("fence", "vm1"), ok("killed"))
    oracle.replied(oracle.sent("vm_status", "vm1"), ok("off"))
    oracle.replied(oracle.sent("fence", "vm2"), ok("already_off"))
    assert (oracle.tally.false_successes, oracle.tally.false_off) == (1, 0)
    assert sum(oracle.tally.beyond.values()) == 2
    assert oracle.tally.findings == {
        "false success: VM runs outside the config, registered on no configured host": 1
    }


def test_a_vm_started_after_the_request_does_not_count(host: Local) -> None:
    oracle = Oracle(set())
    window = oracle.sent("fence", "vm1")
    oracle.started(host, "vm1", host.spawn(), time.monotonic())
    oracle.replied(window, ok("killed"))
    assert oracle.tally.false_successes == 0


def test_deaths_are_blamed_on_fences_of_their_name_only(host: Local) -> None:
    oracle = Oracle({"local"})
    fenced, bystander, killed = (host.spawn() for _ in range(3))
    for name, pid in (("vm1", fenced), ("vm2", bystander)):
        oracle.started(host, name, pid, time.monotonic())
    victim = oracle.started(host, "<unrelated>", killed, time.monotonic(), is_vm=False)
    window = oracle.sent("fence", "vm1")
    dead(fenced)
    dead(bystander)
    oracle.replied(window, ok("killed"))
    oracle.killing(victim)
    dead(killed)
    oracle.sweep()
    assert oracle.tally.false_successes == 0
    assert oracle.tally.collateral == 1
    assert "'vm2'" in oracle.tally.examples[0]


def test_a_reused_pid_is_another_process(host: Local) -> None:
    oracle = Oracle({"local"})
    pid = host.spawn()
    instance = oracle.started(host, "vm1", pid, time.monotonic())
    instance.ticks -= 1  # as if the PID now belonged to a process started later
    assert oracle.live() == []


def test_failures_are_classed() -> None:
    oracle = Oracle(set())
    failed = {"ok": False, "error": {"code": "fence_failed", "message": "ambiguous: running"}}
    oracle.replied(oracle.sent("fence", "x"), failed)
    oracle.replied(oracle.sent("fence", "x"), None)
    assert oracle.tally.failures == {
        "fence_failed: ambiguous (several hosts)": 1,
        "no reply (connection)": 1,
    }
    assert reason_class("cannot confirm it is off: unreachable esx2") == "host unreachable"
    unreadable = "unreachable kvm1 (cannot list running VMs: line 2 not understood: 'k1')"
    assert reason_class(unreadable) == "listing not readable"


def test_hostile_names_cover_every_separator() -> None:
    rng = random.Random(7)
    names = [hostile_name(rng, kind, i, "e1", 4242) for i in range(400) for kind in LIMITS]
    assert {n.separator for n in names} == {*SEPARATORS, " "}
    assert all(n.name.startswith("h") and n.separator in n.name for n in names[:50])
    assert len({n.name for n in names}) == len(names)
    assert all(len(n.name) <= LIMITS["libvirt"] for n in names)
    again = [hostile_name(random.Random(7), "esxi", 0, "e1", 4242).name for _ in range(2)]
    assert again[0] == again[1]


def test_report_section_is_replaced_and_kept(tmp_path: Path) -> None:
    doc = tmp_path / "faults.md"
    doc.write_text("# Scenario table\n\n| a |\n")
    write_section(doc, "first run")
    write_section(doc, "second run")
    text = doc.read_text()
    assert text.startswith("# Scenario table\n") and text.count(BEGIN) == 1
    assert "second run" in text and "first run" not in text
    assert kept_section(doc) == f"{BEGIN}\nsecond run\n{END}\n"
    assert kept_section(tmp_path / "missing.md") == ""
