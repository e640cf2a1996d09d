"""Fencing: gather evidence, ask the verdict, act. Any doubt is a failure, never a success.

`vmfenced.daemon.verdict` decides; this module only runs what it asks for (fresh listings,
registration listings, the guarded kill, a power-on) and turns its decision into a result.
Requests for one VM are serialised; a power-on that outlives its request's budget keeps
running in the background and the VM's later requests queue behind it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import structlog

from vmfenced.daemon import verdict
from vmfenced.daemon.evidence import Evidence
from vmfenced.daemon.host import Host
from vmfenced.daemon.verdict import Decision, HostView, KillReport, Step
from vmfenced.errors import FenceFailed, LinkError, ParseError, UnknownVM
from vmfenced.model import HoldOff, KillOutcome, Located, RegisteredVM, VMMap, resolve

# A VM that moves between our listing and our kill (migration, HA restart) is chased this often.
SEARCH_ROUNDS = 3
# The HA stack's answer after an `off` (Proxmox), on top of the fence: the host bounds the
# command itself a little below this (backends.proxmox_ha.HA_TIMEOUT).
HOLD_OFF_TIMEOUT = 10.0
# What the HA stack answered that leaves the VM free to start again: a warning on the success.
# `stop-accepted` gets a warning of its own: the stop is only queued.
_HOLD_DOUBTS = ("stop-refused", "unknown")


@dataclass(frozen=True, slots=True)
class FenceResult:
    vm: str
    action: str
    outcome: str
    host: str | None
    cartel: int | None
    elapsed_ms: float
    warning: str | None = None
    # Proxmox: what the HA stack answered when asked to keep the VM stopped after `off`
    # (not-managed, stop-accepted, stop-refused, unknown); None for the other kinds.
    ha: str | None = None


@dataclass(frozen=True, slots=True)
class VMState:
    vm: str
    state: str
    host: str | None
    cartel: int | None


@dataclass(slots=True)
class _Off:
    """One `off` request's evidence: answers by host, and since when each must be fresh."""

    start: float  # perf_counter at the request's start, for its budget and elapsed_ms
    since: float  # monotonic: a listing used here must have started after this
    views: dict[str, HostView]
    # Per host, a later `since` (the target's host after the kill).
    since_of: dict[str, float] = field(default_factory=dict)


class Fencer:
    def __init__(
        self,
        hosts: dict[str, Host],
        vmmap: VMMap,
        aliases: dict[str, str],
        fence_timeout: float,
        refresh: Callable[[str], None],
        *,
        on_timeout: float = 14.0,
    ) -> None:
        self.hosts = hosts
        self.aliases = aliases
        self.fence_timeout = fence_timeout
        self.on_timeout = on_timeout
        self._map = vmmap
        self._refresh = refresh
        self._evidence = Evidence(hosts, vmmap, lambda: self.fence_timeout)
        self._inflight: dict[tuple[str, str], asyncio.Task[FenceResult]] = {}
        self._per_vm: dict[str, asyncio.Lock] = {}
        # Power-ons still running on a host after their request was answered, by VM.
        self._pending_on: dict[str, asyncio.Task[FenceResult]] = {}
        self._log = structlog.get_logger("vmfenced.fence")

    def target(self, name: str) -> str:
        return resolve(name, self.aliases)[0]

    def inflight(self) -> list[asyncio.Task[FenceResult]]:
        return [*self._inflight.values(), *self._pending_on.values()]

    def _known(self, vm: str) -> bool:
        return vm in self.aliases.values() or vm in self._evidence.seen or self._map.is_known(vm)

    # -- entry points --------------------------------------------------------------------------

    async def fence(self, name: str, action: str) -> tuple[FenceResult, bool]:
        """Run (or join) a fence; the task outlives a client that goes away."""
        vm = self.target(name)
        key = (vm, action)
        task = self._inflight.get(key)
        joined = task is not None
        if task is None:
            task = asyncio.create_task(self._serialised(vm, action), name=f"fence-{action}-{vm}")
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        return await asyncio.shield(task), joined

    async def _serialised(self, vm: str, action: str) -> FenceResult:
        # Different actions on one VM (off while on runs) must not interleave.
        lock = self._per_vm.setdefault(vm, asyncio.Lock())
        try:
            async with lock:
                await self._behind_power_on(vm)
                start = time.perf_counter()
                log = self._log.bind(vm=vm, action=action)
                try:
                    result = await self._timed(vm, action, start)
                except FenceFailed as exc:
                    log.error("fence failed", reason=exc.reason, host=exc.host)
                    raise
                log.info(
                    "fence done",
                    outcome=result.outcome,
                    host=result.host,
                    elapsed_ms=result.elapsed_ms,
                    warning=result.warning,
                )
                return result
        finally:
            # Requests may name any string: keep a lock only while someone uses it.
            me = asyncio.current_task()
            if not any(name == vm and t is not me for (name, _), t in self._inflight.items()):
                self._per_vm.pop(vm, None)

    async def _behind_power_on(self, vm: str) -> None:
        """A power-on still running on the host: until it ends, no listing says what the VM is
        (an `off` must not answer "already off" while it may be starting)."""
        pending = self._pending_on.get(vm)
        if pending is None:
            return
        await asyncio.wait([pending], timeout=self.fence_timeout)
        if not pending.done():
            raise FenceFailed(
                vm, "a power-on of this VM is still in progress on its host: try again later"
            )

    async def _timed(self, vm: str, action: str, start: float) -> FenceResult:
        run: Callable[[str, float], Awaitable[FenceResult]] = {
            "off": self._bounded_off,
            "on": self._on,
            "reboot": self._reboot,
        }[action]
        return await run(vm, start)

    async def _bounded_off(self, vm: str, start: float, *, hold: bool = True) -> FenceResult:
        """`hold`: then ask the VM's HA stack to keep it stopped (not for a reboot's off)."""
        try:
            async with asyncio.timeout(self.fence_timeout):
                result, where = await self._off(vm, start)
        except TimeoutError:
            raise FenceFailed(
                vm, f"off not confirmed within fence_timeout ({self.fence_timeout:g} s)"
            ) from None
        if hold and where is not None:
            result = await self._hold_off(vm, result, *where)
        return result

    async def _hold_off(self, vm: str, result: FenceResult, name: str, vmid: str) -> FenceResult:
        """Off is confirmed: the HA stack (Proxmox) would start the VM again, so ask it not to.
        Only after the kill (its commands need a quorate cluster, the kill must not wait for
        them), bounded; its answer is reported, and never turns the success into a failure."""
        host = self.hosts.get(name)
        backend = None if host is None else host.backend
        if host is None or backend is None or backend.hold_off is None:
            return result
        assert backend.parse_hold_off is not None
        try:
            hold = backend.parse_hold_off(await host.hold_off(vmid, HOLD_OFF_TIMEOUT))
        except (LinkError, ParseError) as exc:
            hold = HoldOff("unknown", exc.reason)
        warning = result.warning
        if hold.outcome in _HOLD_DOUBTS:
            warning = (
                f"off confirmed, but the HA stack may start {vm!r} (VMID {vmid}) again: "
                f"{hold.outcome}: {hold.detail or 'no detail'}; run `ha-manager crm-command "
                f"stop vm:{vmid} 0` once the cluster is quorate"
            )
        elif hold.outcome == "stop-accepted":
            # Only queued until the CRM's next round: an LRM round before it starts the killed
            # VM again (the bench sees it every time).
            warning = (
                f"off confirmed, HA stop of {vm!r} (VMID {vmid}) queued: the HA stack may "
                "start it once before its next round; keep Pacemaker's node VMs out of "
                "Proxmox HA"
            )
        if hold.outcome == "not-managed":
            self._log.info("HA hold-off", vm=vm, host=name, outcome=hold.outcome)
        else:
            self._log.warning(
                "HA hold-off", vm=vm, host=name, outcome=hold.outcome, detail=hold.detail
            )
        return replace(result, ha=hold.outcome, warning=warning)

    async def vm_status(self, name: str) -> VMState:
        """Live: ON from a fresh listing, OFF only on the evidence `off` would need."""
        vm = self.target(name)
        await self._behind_power_on(vm)
        since = time.monotonic()
        views = self._evidence.views(vm)
        try:
            async with asyncio.timeout(self.fence_timeout):
                while True:
                    decision = verdict.decide_status(
                        vm, list(views.values()), known=self._known(vm)
                    )
                    if decision.step is Step.ON and decision.target is not None:
                        loc = decision.target
                        return VMState(vm, "on", loc.host, loc.vm.cartel)
                    if decision.step is Step.OFF:
                        return VMState(vm, "off", None, None)
                    await self._gather(vm, views, decision, since)
        except TimeoutError:
            raise FenceFailed(vm, "no answer from the hosts within fence_timeout") from None

    async def _gather(
        self,
        vm: str,
        views: dict[str, HostView],
        decision: Decision,
        since: float,
        since_of: dict[str, float] | None = None,
    ) -> None:
        """Run the evidence step `decision` asks for; anything else ends the request."""
        if decision.step is Step.LIST:
            when = {n: (since_of or {}).get(n, since) for n in decision.hosts}
            await self._evidence.list(vm, views, decision.hosts, when)
        elif decision.step is Step.REGISTRATIONS:
            await self._evidence.registrations(vm, views, decision.hosts, since)
        else:
            _raise(vm, decision)

    # -- off -----------------------------------------------------------------------------------

    async def _off(self, vm: str, start: float) -> tuple[FenceResult, tuple[str, str] | None]:
        """The result, and where to ask a Proxmox VM's HA stack to keep it off (host, VMID)."""
        off = _Off(start, time.monotonic(), self._evidence.views(vm))
        kill: KillReport | None = None
        rounds = 0
        while True:
            decision = verdict.decide_off(vm, list(off.views.values()), kill, known=self._known(vm))
            match decision.step:
                case Step.KILLED:
                    target = decision.target
                    assert target is not None
                    self._refresh(target.host)
                    where = None if target.vm.vmid is None else (target.host, target.vm.vmid)
                    return self._done(vm, "off", "killed", target, start), where
                case Step.ALREADY_OFF:
                    reg = decision.registration
                    # Off, but an HA stack that still wants it started would start it.
                    where = (
                        None if reg is None or reg.owner is None else (decision.hosts[0], reg.vmid)
                    )
                    return self._done(vm, "off", "already_off", None, start), where
                case Step.KILL:
                    assert decision.target is not None
                    kill = await self._kill(vm, off, decision.target)
                case Step.SEARCH_AGAIN:
                    rounds += 1
                    if rounds >= SEARCH_ROUNDS:
                        raise FenceFailed(
                            vm, f"kept moving between hosts over {SEARCH_ROUNDS} searches"
                        )
                    # Every answer so far predates the VM's move: ask everyone again.
                    off = _Off(start, time.monotonic(), self._evidence.views(vm))
                    kill = None
                case _:
                    await self._gather(vm, off.views, decision, off.since, off.since_of)

    async def _kill(self, vm: str, off: _Off, target: Located) -> KillReport:
        """The guarded kill on the target's host; every other host is listed meanwhile."""
        host = self.hosts[target.host]
        views = off.views
        remaining = self.fence_timeout - (time.perf_counter() - off.start)
        others = tuple(n for n, v in views.items() if n != target.host and not v.asked)
        listing_others = asyncio.ensure_future(
            self._evidence.list(vm, views, others, dict.fromkeys(others, off.since))
        )
        try:
            outcome, after = await host.kill_and_list(target.vm, max(0.05, remaining))
        except LinkError as exc:
            self._log.warning("guarded kill failed", vm=vm, host=target.host, reason=exc.reason)
            await listing_others
            return KillReport(target, None, exc.reason)
        except BaseException:
            listing_others.cancel()
            raise
        await listing_others
        # Only a listing taken after the kill speaks for the target's host now.
        killed_at = time.monotonic()
        off.since_of[target.host] = killed_at
        if after is None:
            old = views[target.host]
            views[target.host] = HostView(target.host, latest=old.latest, node=old.node)
        else:
            self._evidence.record(host, after, time.time())
            mine = tuple(v for v in after if v.answers_to(vm))
            views[target.host] = replace(views[target.host], fresh=mine, problem=None)
        if outcome is KillOutcome.KILLED:
            self._map.drop_running(target.host, vm)
        elif outcome is not KillOutcome.ALIVE:
            self._log.info("not where the map says", vm=vm, host=target.host, outcome=outcome)
        return KillReport(target, outcome)

    # -- on, reboot ----------------------------------------------------------------------------

    async def _on(self, vm: str, start: float) -> FenceResult:
        """Bounded by on_timeout; a power-on still running then goes on in the background."""
        task = asyncio.create_task(self._power_on(vm, start), name=f"power-on-{vm}")
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.on_timeout)
        except TimeoutError:
            self._background(vm, task)
            raise FenceFailed(
                vm,
                f"power-on not confirmed within on_timeout ({self.on_timeout:g} s); it goes on "
                "on the host, and later requests for this VM wait for it",
            ) from None

    def _background(self, vm: str, task: asyncio.Task[FenceResult]) -> None:
        self._pending_on[vm] = task

        def done(t: asyncio.Task[FenceResult]) -> None:
            if self._pending_on.get(vm) is t:
                del self._pending_on[vm]
            if t.cancelled():
                return
            exc = t.exception()
            if exc is None:
                self._log.info("background power-on done", vm=vm, outcome=t.result().outcome)
            else:
                self._log.warning("background power-on failed", vm=vm, reason=str(exc))

        task.add_done_callback(done)

    async def _power_on(self, vm: str, start: float) -> FenceResult:
        since = time.monotonic()
        views = self._evidence.views(vm)
        while True:
            decision = verdict.decide_on(vm, list(views.values()), known=self._known(vm))
            if decision.step is Step.ON and decision.target is not None:
                return self._done(vm, "on", "already_on", decision.target, start)
            if decision.step is Step.POWER_ON and decision.registration is not None:
                return await self._start(vm, decision.hosts[0], decision.registration, start)
            await self._gather(vm, views, decision, since)

    async def _start(self, vm: str, name: str, reg: RegisteredVM, start: float) -> FenceResult:
        host = self.hosts[name]
        try:
            await host.power_on(reg)
        except LinkError as exc:
            raise FenceFailed(vm, exc.reason, host=name) from None
        self._refresh(name)
        views = self._evidence.views(vm)
        await self._evidence.list(vm, views, (name,), {name: time.monotonic()})
        running = views[name].fresh or ()
        if not running:
            raise FenceFailed(vm, "power-on reported success but the VM is not running", name)
        return self._done(vm, "on", "powered_on", Located(name, running[0]), start)

    async def _reboot(self, vm: str, start: float) -> FenceResult:
        # No HA hold-off: the on half starts the VM again (through the HA stack if it has one).
        off = await self._bounded_off(vm, start, hold=False)
        try:
            on = await self._on(vm, start)
        except FenceFailed as exc:
            # Like fence-agents' fencing.py: the node is fenced once off is confirmed.
            return FenceResult(
                vm,
                "reboot",
                "off_only",
                off.host,
                off.cartel,
                _ms(start),
                warning=f"off confirmed in {off.elapsed_ms:g} ms, power-on failed: {exc.reason}",
            )
        return FenceResult(vm, "reboot", "rebooted", on.host, on.cartel, on.elapsed_ms)

    def _done(
        self, vm: str, action: str, outcome: str, loc: Located | None, start: float
    ) -> FenceResult:
        return FenceResult(
            vm=vm,
            action=action,
            outcome=outcome,
            host=loc.host if loc else None,
            cartel=loc.vm.cartel if loc else None,
            elapsed_ms=_ms(start),
        )


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def _raise(vm: str, decision: Decision) -> None:
    if decision.unknown:
        raise UnknownVM(vm)
    raise FenceFailed(vm, decision.reason or f"cannot decide ({decision.step})", decision.host)
