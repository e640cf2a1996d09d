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


# ---------------------------------------------------------------------------------- Proxmox VE

PVE = ("pve1", "pve2", "pve3")
# What one node's registration listing says of the VM: the whole cluster's, from any node.
OWNED = RegisteredVM("100", VM, "/etc/pve/nodes/pve2/qemu-server/100.conf", owner="pve2")
PVE_REGS = {
    "unasked": None,
    "owned": (OWNED,),
    "owner-missing": (
        RegisteredVM("100", VM, "/etc/pve/nodes/pve9/qemu-server/100.conf", owner="pve9"),
    ),
    "shared-name": (
        RegisteredVM("100", VM, "/etc/pve/nodes/pve2/qemu-server/100.conf", owner="pve2"),
        RegisteredVM("101", VM, "/etc/pve/nodes/pve3/qemu-server/101.conf", owner="pve3"),
    ),
    "none": (),
    "failed": None,
}


def pve_worlds(host: str) -> list[World]:
    out = []
    for truth, answer, reg in itertools.product((0, 1), ("unasked", "fresh", "silent"), PVE_REGS):
        fresh = None
        if answer == "fresh":
            fresh = tuple(
                RunningVM(VM, "/etc/pve/nodes/pve2/qemu-server/100.conf", 900, vmid="100")
                for _ in range(truth)
            )
        view_ = HostView(
            host,
            fresh=fresh,
            problem="unreachable" if answer == "silent" else None,
            latest=(),
            registered=PVE_REGS[reg],
            reg_problem="exited 3" if reg == "failed" else None,
            node=host,
        )
        out.append(World(truth, view_))
    return out


def test_proxmox_off_status_on_need_the_owner_configured() -> None:
    seen: set[Step] = set()
    for combo in itertools.product(*(pve_worlds(h) for h in PVE)):
        views = [w.view for w in combo]
        regs = [r for w in combo for r in w.view.registered or ()]
        clean = bool(regs) and {(r.owner, r.vmid) for r in regs} == {("pve2", "100")}
        for decision in (decide_off(VM, views), decide_status(VM, views)):
            seen.add(decision.step)
            if decision.step in (Step.ALREADY_OFF, Step.OFF):
                assert all(w.view.fresh == () and w.truth == 0 for w in combo), combo
                # Only the configured owner's registration, never a missing node's or a twin's.
                assert clean, combo
                assert decision.hosts == ("pve2",) or decision.step is Step.OFF
        on = decide_on(VM, views)
        seen.add(on.step)
        if on.step is Step.POWER_ON:
            assert all(w.view.fresh == () and w.truth == 0 for w in combo), combo
            assert clean and on.hosts == ("pve2",), combo
            assert on.registration is not None and on.registration.vmid == "100"
        if any(r.owner == "pve9" for r in regs) and all(w.view.fresh == () for w in combo):
            for decision in (decide_off(VM, views), decide_on(VM, views)):
                if decision.step is Step.FAIL and "pve9" in decision.reason:
                    assert (
                        "not in the configuration" in decision.reason
                        or "changed while" in decision.reason
                        or "more than one VM" in decision.reason
                    )
    assert {Step.ALREADY_OFF, Step.OFF, Step.POWER_ON, Step.KILL, Step.FAIL} <= seen


def test_proxmox_owner_missing_from_the_config_fails_naming_it() -> None:
    views = [view(h, fresh=(), registered=PVE_REGS["owner-missing"], node=h) for h in PVE]
    for decision in (decide_off(VM, views), decide_status(VM, views), decide_on(VM, views)):
        assert decision.step is Step.FAIL and not decision.unknown
        assert "Proxmox node pve9" in decision.reason and "VMID 100" in decision.reason


def test_proxmox_a_name_two_vmids_share_fails() -> None:
    views = [view(h, fresh=(), registered=PVE_REGS["shared-name"], node=h) for h in PVE]
    for decision in (decide_off(VM, views), decide_on(VM, views)):
        assert decision.step is Step.FAIL and "more than one VM" in decision.reason
        assert "VMID" in decision.reason


def test_proxmox_one_registration_reported_by_every_node_counts_once() -> None:
    views = [view(h, fresh=(), registered=PVE_REGS["owned"], node=h) for h in PVE]
    off = decide_off(VM, views)
    assert off.step is Step.ALREADY_OFF and off.hosts == ("pve2",)
    assert off.registration == OWNED
    on = decide_on(VM, views)
    assert on.step is Step.POWER_ON and on.hosts == ("pve2",)


def test_proxmox_live_migration_twins_fail() -> None:
    """Both nodes run the VMID for a moment: nothing is killed on a guess."""
    one = RunningVM(VM, "/etc/pve/nodes/pve1/qemu-server/100.conf", 11, vmid="100")
    other = RunningVM(VM, "/etc/pve/nodes/pve1/qemu-server/100.conf", 22, vmid="100")
    views = [view("pve1", fresh=(one,), node="pve1"), view("pve2", fresh=(other,), node="pve2")]
    decision = decide_off(VM, views)
    assert decision.step is Step.FAIL and "2 instances" in decision.reason
