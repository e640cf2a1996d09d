"""The fence verdict: every host's answer in, one decision out. Pure: no I/O, no clock.

This is the only place that decides whether `off`, `status` or `on` may answer success. The
fencer gathers evidence (fresh listings, registrations, a kill's report) and asks `decide_off`,
`decide_status` or `decide_on` what to do next; it never decides on its own. The rules are
docs/safety.md's table, in code:

- `off` is **killed** when the guarded kill of the VM's only running instance is confirmed on
  its host, a listing of that host taken after the kill shows no instance of the VM, every other
  configured host answered a fresh complete listing without it, and any host that is silent
  (unreachable) has a latest complete listing that did not show the VM running. A host that
  answers something that cannot be read is no such host: it runs on, so it fails the fence.
- `off` is **already off** when every configured host answered a fresh complete listing, none
  runs the VM, and a configured host that answered registers it (positive evidence it exists and
  is off). Registered nowhere: it may run on a host missing from the config, so it fails.
- Two instances of one name anywhere (one host or several) fail, naming every location; nothing
  is killed on a guess.
- `status` is OFF only on the evidence that would make `off` answer already off; ON on a fresh
  listing that shows the VM.
- `on` powers on only when every configured host answered and none runs the VM, and exactly
  one host registers it, in a registration listing taken for this request.
- Proxmox VE: any node's registration listing holds the whole cluster's VMs and names each
  one's owner node (the same registration comes from every node that answered: it counts
  once). "Already off", OFF and `on` need that owner among the configured hosts (its fresh
  listing is then one of the listings above); a VM owned by a node missing from the config may
  run there unseen, so they fail naming that node. A name that several VMIDs share is no one
  VM: they fail too. Power-on runs on the owner.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from vmfenced.model import KillOutcome, Located, RegisteredVM, RunningVM


@dataclass(frozen=True, slots=True)
class HostView:
    """What one configured host has told us about one VM.

    `fresh`: the VM's instances in a complete process listing taken for this request (empty: the
    host answered and runs none); None while the host has not answered one. `problem` says why it
    did not (unreachable, or an answer that cannot be read); None: not asked yet.
    `doubt`: the problem is an answer that cannot be read, not silence.
    `latest`: the VM's instances in the host's latest complete listing before that (the map's
    belief, of any age); None when the host has never answered a complete listing.
    `registered`: the VM's registrations in a registration listing taken for this request; None
    while there is none; `reg_problem` says why (None: not asked yet).
    """

    host: str
    fresh: tuple[RunningVM, ...] | None = None
    problem: str | None = None
    # The host answered, but its listing cannot be read: unlike a silent host it runs on, so
    # its latest listing says nothing of now.
    doubt: bool = False
    latest: tuple[RunningVM, ...] | None = None
    registered: tuple[RegisteredVM, ...] | None = None
    reg_problem: str | None = None
    # Proxmox VE: the cluster node this host is (None for the other kinds).
    node: str | None = None

    @property
    def asked(self) -> bool:
        return self.fresh is not None or self.problem is not None

    @property
    def reg_asked(self) -> bool:
        return self.registered is not None or self.reg_problem is not None


@dataclass(frozen=True, slots=True)
class KillReport:
    """The guarded kill of `target`: its outcome on the host (None: no readable answer)."""

    target: Located
    outcome: KillOutcome | None
    problem: str | None = None


class Step(StrEnum):
    LIST = "list"  # fresh process listings of `hosts`, then decide again
    REGISTRATIONS = "registrations"  # fresh registration listings of `hosts`, then decide again
    KILL = "kill"  # guarded kill of `target` (the fencer lists the other hosts meanwhile)
    SEARCH_AGAIN = "search-again"  # the VM was not where we looked: forget fresh answers, again
    POWER_ON = "power-on"  # power on `registration` on `target_host`
    KILLED = "killed"  # success: off, by the confirmed kill of `target`
    ALREADY_OFF = "already_off"  # success: off, on positive evidence
    ON = "on"  # status: runs as `target`; on: already on
    OFF = "off"  # status: off, on the same evidence as ALREADY_OFF
    FAIL = "fail"  # no success possible: `reason` says why, `host` where


@dataclass(frozen=True, slots=True)
class Decision:
    step: Step
    hosts: tuple[str, ...] = ()
    target: Located | None = None
    registration: RegisteredVM | None = None
    reason: str = ""
    host: str | None = None
    # FAIL only: no alias names the VM and no host ever ran or registered it.
    unknown: bool = False

    @property
    def success(self) -> bool:
        return self.step in (Step.KILLED, Step.ALREADY_OFF, Step.OFF)


# What an administrator does when a host cannot answer for its VMs (README, Troubleshooting).
_ADVICE = "check that host, then confirm the node is down by hand (stonith_admin --confirm NODE)"


def _fail(reason: str, host: str | None = None, *, unknown: bool = False) -> Decision:
    return Decision(Step.FAIL, reason=reason, host=host, unknown=unknown)


def _where(found: Iterable[Located]) -> str:
    return "; ".join(
        f"{loc.host}: {loc.vm.config_file or loc.vm.name} ({_handle(loc.vm)})" for loc in found
    )


def _handle(vm: RunningVM) -> str:
    # An instance found through a vSphere API has no process (cartel 0): its instance UUID
    # tells it apart.
    if vm.cartel == 0 and vm.uuid:
        return f"instance UUID {vm.uuid}"
    return f"cartel/PID {vm.cartel}"


def _problems(views: Sequence[HostView]) -> str:
    return "; ".join(f"{v.host} ({v.problem})" for v in views)


def _ambiguous(vm: str, found: Sequence[Located], extra: str = "") -> Decision:
    return _fail(
        f"ambiguous: {len(found)} instances of {vm!r} run at once, nothing was killed on a "
        f"guess ({_where(found)}){extra}",
        found[0].host,
    )


def _fresh(views: Sequence[HostView]) -> list[Located]:
    return [Located(v.host, vm) for v in views for vm in v.fresh or ()]


def _unanswered_risk(views: Sequence[HostView], vm: str) -> Decision | None:
    """FAIL when a host that did not answer may run the VM: its latest listing showed it, or it
    never answered a complete listing at all."""
    for view in views:
        if view.fresh is not None:
            continue
        why = view.problem or "no answer"
        if view.doubt:
            return _fail(
                f"cannot rule out an instance on {view.host}: it answers, but its listing "
                f"cannot be read ({why}); fix what the listing names (vmfencectl status shows "
                f"it), or {_ADVICE}",
                view.host,
            )
        if view.latest is None:
            return _fail(
                f"cannot rule out an instance on {view.host}: {why}, and it has not answered "
                f"a complete listing since vmfenced started (or a reload replaced it); {_ADVICE}",
                view.host,
            )
        if view.latest:
            return _fail(
                f"its latest listing placed {vm!r} on {view.host}, which cannot confirm it now "
                f"({why}); {_ADVICE}",
                view.host,
            )
    return None


def _absent_everywhere(views: Sequence[HostView], vm: str, known: bool) -> Decision:
    """No fresh listing shows the VM: OFF needs every host's listing and a registration."""
    silent = [v for v in views if v.fresh is None]
    if silent:
        return _fail(
            f"cannot confirm {vm!r} is off: no complete listing from " + _problems(silent),
            silent[0].host,
        )
    unasked = tuple(v.host for v in views if not v.reg_asked)
    if any(v.registered for v in views):
        owned = _owner(vm, views)
        if isinstance(owned, Decision):
            return owned
        if owned is not None:
            return Decision(Step.ALREADY_OFF, hosts=(owned[0],), registration=owned[1])
        return Decision(Step.ALREADY_OFF, hosts=tuple(v.host for v in views if v.registered))
    if unasked:
        return Decision(Step.REGISTRATIONS, hosts=unasked)
    failed = [f"{v.host} ({v.reg_problem})" for v in views if v.registered is None]
    reason = (
        f"{vm!r} runs on none of the configured hosts and none of them registers it: it may run "
        "on a hypervisor host missing from the configuration (moved by DRS/vMotion or restarted "
        "by HA); add that host, or confirm the node is down by hand (stonith_admin --confirm NODE)"
    )
    if failed:
        reason += "; registration listing failed on " + "; ".join(failed)
    return _fail(reason, unknown=not known and not failed)


def _owner(vm: str, views: Sequence[HostView]) -> tuple[str, RegisteredVM] | Decision | None:
    """Proxmox: the configured host that owns the VM and its registration; FAIL when the owner
    is not configured or the name belongs to several VMs (or to registrations of other kinds
    as well); None when no registration is a Proxmox one."""
    regs = [r for v in views for r in v.registered or ()]
    owned = {(r.owner, r.vmid): r for r in regs if r.owner is not None}
    if not owned:
        return None
    where = "; ".join(
        sorted({f"{r.owner or 'not Proxmox'}: {r.config_file or r.vmid}" for r in regs})
    )
    if len({r.vmid for r in owned.values()}) > 1 or any(r.owner is None for r in regs):
        return _fail(f"{vm!r} names more than one VM ({where}): alias the node to its VMID")
    if len(owned) > 1 or len(owned) != len({r for r in regs if r.owner is not None}):
        # One VMID, told differently by nodes read at different moments: it is moving.
        return _fail(f"{vm!r} changed while the nodes were read ({where}): try again")
    (node, _vmid), reg = next(iter(owned.items()))
    hosts = [v.host for v in views if v.node == node]
    if not hosts:
        return _fail(
            f"{vm!r} (VMID {reg.vmid}) belongs to Proxmox node {node}, which is not in the "
            f"configuration: it may run there unseen; add {node} as a host, or {_ADVICE}"
        )
    return hosts[0], reg


def decide_off(
    vm: str, views: Sequence[HostView], kill: KillReport | None = None, *, known: bool = True
) -> Decision:
    """The next step of `off`. `known`: an alias names the VM or a host ever listed it."""
    if kill is not None:
        return _after_kill(vm, views, kill)
    unasked = tuple(v.host for v in views if not v.asked)
    if unasked:
        # The fast path: the map places exactly one instance, every other host's latest listing
        # rules the VM out, and nothing fresh contradicts it: kill now, list the rest meanwhile.
        believed = [Located(v.host, vm_) for v in views if not v.asked for vm_ in v.latest or ()]
        found = _fresh(views) + believed
        beliefs_complete = all(v.latest is not None for v in views if not v.asked)
        if (
            len(found) == 1
            and beliefs_complete
            and _unanswered_risk([v for v in views if v.asked], vm) is None
        ):
            return Decision(Step.KILL, target=found[0])
        return Decision(Step.LIST, hosts=unasked)
    found = _fresh(views)
    if len(found) > 1:
        return _ambiguous(vm, found)
    risk = _unanswered_risk(views, vm)
    if risk is not None:
        return risk
    if found:
        return Decision(Step.KILL, target=found[0])
    return _absent_everywhere(views, vm, known)


def _after_kill(vm: str, views: Sequence[HostView], kill: KillReport) -> Decision:
    target = kill.target
    if kill.outcome is None:
        return _fail(
            f"the guarded kill on {target.host} gave no readable answer "
            f"({kill.problem or 'no answer'}): cannot confirm it is dead; {_ADVICE}",
            target.host,
        )
    if kill.outcome is KillOutcome.ALIVE:
        return _fail(f"cartel/PID {target.vm.cartel} still running after kill -9", target.host)
    if kill.outcome is not KillOutcome.KILLED:
        # Not there (stopped, moved, restarted under a new cartel): look again everywhere.
        return Decision(Step.SEARCH_AGAIN, target=target)
    unasked = tuple(v.host for v in views if not v.asked)
    if unasked:
        return Decision(Step.LIST, hosts=unasked)
    others = _fresh(views)
    if others:
        return _fail(
            f"killed the instance at {_where([target])}, but another instance of {vm!r} runs "
            f"({_where(others)})",
            others[0].host,
        )
    home = next(v for v in views if v.host == target.host)
    if home.fresh is None:
        return _fail(
            f"killed, but no listing of {target.host} after the kill ({home.problem}): "
            "cannot confirm no other instance runs there",
            target.host,
        )
    risk = _unanswered_risk(views, vm)
    if risk is not None:
        return risk
    return Decision(Step.KILLED, target=target)


def decide_status(vm: str, views: Sequence[HostView], *, known: bool = True) -> Decision:
    """ON from any fresh listing that shows the VM; OFF only on already-off evidence."""
    found = _fresh(views)
    if found:
        return Decision(Step.ON, target=found[0], hosts=tuple(loc.host for loc in found))
    unasked = tuple(v.host for v in views if not v.asked)
    if unasked:
        # Where the map places it first: one round trip when the map is right.
        believed = tuple(v.host for v in views if not v.asked and v.latest)
        return Decision(Step.LIST, hosts=believed or unasked)
    decision = _absent_everywhere(views, vm, known)
    if decision.step is Step.ALREADY_OFF:
        return Decision(Step.OFF, hosts=decision.hosts)
    return decision


def decide_on(vm: str, views: Sequence[HostView], *, known: bool = True) -> Decision:
    """Power on only with every host's listing (a copy must not run twice) and one registration."""
    found = _fresh(views)
    if found:
        if len(found) > 1:
            return _ambiguous(vm, found)
        return Decision(Step.ON, target=found[0])
    unasked = tuple(v.host for v in views if not v.asked)
    if unasked:
        return Decision(Step.LIST, hosts=unasked)
    silent = [v for v in views if v.fresh is None]
    if silent:
        return _fail(
            f"cannot power on {vm!r}: it may already run on a host that did not answer: "
            + _problems(silent),
            silent[0].host,
        )
    unasked = tuple(v.host for v in views if not v.reg_asked)
    if unasked:
        return Decision(Step.REGISTRATIONS, hosts=unasked)
    owned = _owner(vm, views)
    if isinstance(owned, Decision):
        return owned
    if owned is not None:
        return Decision(Step.POWER_ON, hosts=(owned[0],), registration=owned[1])
    registered = [(v.host, reg) for v in views for reg in v.registered or ()]
    if len(registered) > 1:
        where = "; ".join(f"{h}: {r.config_file or r.vmid}" for h, r in registered)
        return _fail(f"registered more than once ({where}): cannot tell which to power on")
    if not registered:
        failed = [f"{v.host} ({v.reg_problem})" for v in views if v.registered is None]
        reason = f"{vm!r} is not registered on any configured host: cannot power it on"
        if failed:
            reason += "; registration listing failed on " + "; ".join(failed)
        return _fail(reason, unknown=not known and not failed)
    host, reg = registered[0]
    return Decision(Step.POWER_ON, hosts=(host,), registration=reg)
