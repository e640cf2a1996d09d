"""The verdict, exhaustively: every combination of answers from three hosts.

Each host has a truth (how many instances of the VM really run there: 0, 1 or 2), an answer to
this request (not asked yet, a fresh listing, which tells the truth, silence (unreachable), or a
doubt: an answer that cannot be read), a belief (the map's latest listing: never listed, listed without the VM, listed
with it, whatever the truth is now) and a registration answer. The invariant, checked on every
decision: a success never leaves a live instance anywhere the daemon could know of; the only
instance it may miss is on a host that did not answer now and whose latest complete listing
did not show the VM (docs/safety.md); never one on a host in doubt.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from vmfenced.daemon.verdict import (
    HostView,
    KillReport,
    Step,
    decide_off,
    decide_on,
    decide_status,
)
from vmfenced.model import KillOutcome, Located, RegisteredVM, RunningVM

VM = "node1"
HOSTS = ("esx1", "esx2", "esx3")
TRUTHS = (0, 1, 2)
ANSWERS = ("unasked", "fresh", "silent", "doubt")
BELIEFS = (None, 0, 1)
REGISTRATIONS = ("unasked", "yes", "no", "failed")


def instances(host: str, count: int, base: int = 100) -> tuple[RunningVM, ...]:
    return tuple(
        RunningVM(VM, f"/vmfs/volumes/ds{i}/{VM}/{VM}.vmx", base + i, uuid=None)
        for i in range(count)
    )


@dataclass(frozen=True)
class World:
    """One host: its truth and the view the daemon has of it."""

    truth: int
    view: HostView

    @property
    def may_miss(self) -> bool:
        """An instance here is one the rule accepts not to see: silent, believed without it."""
        return self.view.fresh is None and not self.view.doubt and self.view.latest == ()


def worlds(host: str, registrations: tuple[str, ...] = REGISTRATIONS) -> list[World]:
    out = []
    for truth, answer, belief, reg in itertools.product(TRUTHS, ANSWERS, BELIEFS, registrations):
        if truth == 2 and answer != "fresh":
            continue  # unseen, two instances decide nothing one does not
        fresh = instances(host, truth) if answer == "fresh" else None
        problem = {
            "silent": "unreachable: connection lost",
            "doubt": "cannot list running VMs: a VM name holds U+2028",
        }.get(answer)
        latest = None if belief is None else instances(host, belief, base=500)
        registered = {
            "yes": (RegisteredVM("7", VM, f"[ds] {VM}/{VM}.vmx"),),
            "no": (),
        }.get(reg)
        out.append(
            World(
                truth,
                HostView(
                    host,
                    fresh=fresh,
                    problem=problem,
                    doubt=answer == "doubt",
                    latest=latest,
                    registered=registered,
                    reg_problem="vim-cmd exited 1" if reg == "failed" else None,
                ),
            )
        )
    return out


def combinations(registrations: tuple[str, ...] = REGISTRATIONS) -> Iterator[tuple[World, ...]]:
    return itertools.product(*(worlds(h, registrations) for h in HOSTS))


def known_instances(combo: tuple[World, ...]) -> int:
    """Instances the daemon knows of: fresh ones, and believed ones where nothing is fresh."""
    return sum(
        len(w.view.fresh if w.view.fresh is not None else w.view.latest or ()) for w in combo
    )


def test_off_and_status_and_on_before_any_kill() -> None:
    counts: dict[Step, int] = {}
    for combo in combinations():
        views = [w.view for w in combo]
        off = decide_off(VM, views)
        counts[off.step] = counts.get(off.step, 0) + 1
        if off.step is Step.ALREADY_OFF:
            # Positive evidence: every host listed now, none runs it, one registers it.
            assert all(w.view.fresh == () and w.truth == 0 for w in combo), combo
            assert any(w.view.registered for w in combo), combo
        if off.step is Step.KILL:
            # Nothing killed on a guess: the target is the only instance known of, and every
            # host is either listed now or has a complete listing that rules the VM out.
            assert off.target is not None
            assert known_instances(combo) == 1, combo
            assert all(w.view.fresh is not None or w.view.latest is not None for w in combo)
            assert all(not (w.view.problem and w.view.latest) for w in combo), combo
            assert not any(w.view.doubt for w in combo), combo
        if off.step in (Step.LIST, Step.REGISTRATIONS):
            assert off.hosts, combo
        assert off.step not in (Step.KILLED, Step.ON, Step.OFF, Step.POWER_ON), combo

        status = decide_status(VM, views)
        if status.step is Step.OFF:
            assert all(w.view.fresh == () and w.truth == 0 for w in combo), combo
            assert any(w.view.registered for w in combo), combo
        if status.step is Step.ON:
            assert status.target is not None
            assert any(w.truth > 0 and w.view.fresh for w in combo), combo

        on = decide_on(VM, views)
        if on.step is Step.POWER_ON:
            # A second copy must never start: every host listed now and none runs it.
            assert all(w.view.fresh == () and w.truth == 0 for w in combo), combo
            assert sum(len(w.view.registered or ()) for w in combo) == 1, combo
    # Every kind of decision is reachable.
    assert {Step.ALREADY_OFF, Step.KILL, Step.LIST, Step.REGISTRATIONS, Step.FAIL} <= set(counts)


OUTCOMES = (None, *KillOutcome)


@pytest.mark.parametrize("outcome", OUTCOMES, ids=str)
def test_after_a_kill(outcome: KillOutcome | None) -> None:
    """Views after the kill: the target host's listing (if any) was taken after it."""
    target = Located("esx1", instances("esx1", 1)[0])
    report = KillReport(target, outcome, None if outcome else "connection lost")
    seen: set[Step] = set()
    for combo in combinations(registrations=("unasked",)):
        decision = decide_off(VM, [w.view for w in combo], report)
        seen.add(decision.step)
        if decision.step is Step.KILLED:
            assert outcome is KillOutcome.KILLED
            # The invariant: no live instance anywhere the daemon could know of.
            assert all(w.truth == 0 or w.may_miss for w in combo), combo
            assert combo[0].view.fresh == (), combo  # listed after the kill, without it
        assert decision.step not in (Step.ALREADY_OFF, Step.KILL, Step.OFF, Step.POWER_ON)
        if outcome in (KillOutcome.NOT_RUNNING, KillOutcome.NOT_THAT_VM):
            assert decision.step is Step.SEARCH_AGAIN
        if outcome in (None, KillOutcome.ALIVE):
            assert decision.step is Step.FAIL
    if outcome is KillOutcome.KILLED:
        assert {Step.KILLED, Step.LIST, Step.FAIL} <= seen


def view(host: str, **kw: object) -> HostView:
    return HostView(host, **kw)  # type: ignore[arg-type]


def test_two_instances_on_one_host_fail_naming_both() -> None:
    twins = (
        RunningVM(VM, "/vmfs/volumes/ds1/node1/node1.vmx", 11),
        RunningVM(VM, "/vmfs/volumes/ds2/node1/node1.vmx", 22),
    )
    decision = decide_off(VM, [view("esx1", fresh=twins), view("esx2", fresh=())])
    assert decision.step is Step.FAIL
    assert "ds1/node1/node1.vmx" in decision.reason and "ds2/node1/node1.vmx" in decision.reason
    assert "nothing was killed" in decision.reason


def test_fast_path_kills_on_the_map_alone() -> None:
    """The map places one instance, every other host's latest listing rules it out."""
    one = instances("esx1", 1)
    decision = decide_off(
        VM, [view("esx1", latest=one), view("esx2", latest=()), view("esx3", latest=())]
    )
    assert decision.step is Step.KILL and decision.target == Located("esx1", one[0])


def test_absent_and_registered_nowhere_says_host_may_be_missing() -> None:
    views = [view(h, fresh=(), registered=()) for h in HOSTS]
    decision = decide_off(VM, views)
    assert decision.step is Step.FAIL and not decision.unknown
    assert "missing from the configuration" in decision.reason
    assert decide_off(VM, views, known=False).unknown


def test_unreachable_host_that_held_it_fails_even_after_a_kill_elsewhere() -> None:
    """An HA restart during an isolation: a copy on a host that cannot answer now."""
    copy = instances("esx2", 1)
    target = Located("esx1", instances("esx1", 1)[0])
    views = [
        view("esx1", fresh=()),
        view("esx2", problem="unreachable: keepalive timeout", latest=copy),
        view("esx3", fresh=()),
    ]
    decision = decide_off(VM, views, KillReport(target, KillOutcome.KILLED))
    assert decision.step is Step.FAIL and decision.host == "esx2"
    assert "stonith_admin --confirm" in decision.reason


def test_a_host_in_doubt_fails_a_kill_elsewhere_whatever_it_listed_before() -> None:
    """It answers but cannot be read (a hostile name): it runs on, so no old listing speaks."""
    target = Located("esx1", instances("esx1", 1)[0])
    views = [
        view("esx1", fresh=()),
        view("esx2", problem="cannot list running VMs: U+2028", doubt=True, latest=()),
    ]
    decision = decide_off(VM, views, KillReport(target, KillOutcome.KILLED))
    assert decision.step is Step.FAIL and decision.host == "esx2"
    assert "cannot be read" in decision.reason
