"""Fencing: locate the VM, guarded kill, confirm death. Any doubt is a failure, never a success.

`off` succeeds only when (a) a guarded kill reported the VM's process gone, or (b) every host
answered a live listing and none runs the VM, and the VM is known to exist. An unreachable host
that might hold the VM, a timeout, a VM seen on two hosts at once: FenceFailed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from vmfenced.errors import FenceFailed, LinkError, UnknownVM
from vmfenced.host import Host
from vmfenced.model import KillOutcome, Located, RunningVM, VMMap, resolve

# A VM that moves between our listing and our kill (migration, HA restart) is chased this often.
SEARCH_ROUNDS = 3


@dataclass(frozen=True, slots=True)
class FenceResult:
    vm: str
    action: str
    outcome: str
    host: str | None
    cartel: int | None
    elapsed_ms: float
    warning: str | None = None


@dataclass(frozen=True, slots=True)
class VMState:
    vm: str
    state: str
    host: str | None
    cartel: int | None


class Fencer:
    def __init__(
        self,
        hosts: dict[str, Host],
        vmmap: VMMap,
        aliases: dict[str, str],
        fence_timeout: float,
        refresh: Callable[[str], None],
    ) -> None:
        self.hosts = hosts
        self.aliases = aliases
        self.fence_timeout = fence_timeout
        self._map = vmmap
        self._refresh = refresh
        self._inflight: dict[tuple[str, str], asyncio.Task[FenceResult]] = {}
        self._per_vm: dict[str, asyncio.Lock] = {}
        self._seen: set[str] = set()
        self._log = structlog.get_logger("vmfenced.fence")

    def target(self, name: str) -> str:
        return resolve(name, self.aliases)[0]

    def inflight(self) -> list[asyncio.Task[FenceResult]]:
        return list(self._inflight.values())

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
                )
                return result
        finally:
            # Requests may name any string: keep a lock only while someone uses it.
            me = asyncio.current_task()
            if not any(name == vm and t is not me for (name, _), t in self._inflight.items()):
                self._per_vm.pop(vm, None)

    async def _timed(self, vm: str, action: str, start: float) -> FenceResult:
        run: Callable[[str, float], Awaitable[FenceResult]] = {
            "off": self._off,
            "on": self._on,
            "reboot": self._reboot,
        }[action]
        if action == "off":
            try:
                async with asyncio.timeout(self.fence_timeout):
                    return await run(vm, start)
            except TimeoutError:
                raise FenceFailed(
                    vm, f"not confirmed within fence_timeout ({self.fence_timeout:g} s)"
                ) from None
        return await run(vm, start)

    async def vm_status(self, name: str) -> VMState:
        vm = self.target(name)
        try:
            async with asyncio.timeout(self.fence_timeout):
                for loc in self._map.where_running(vm):
                    host = self.hosts[loc.host]
                    try:
                        listing = await host.list_running(host.fence, self.fence_timeout)
                    except LinkError:
                        break
                    self._map.update_running(loc.host, listing, time.time())
                    found = [v for v in listing if v.name == vm]
                    if found:
                        return VMState(vm, "on", loc.host, found[0].cartel)
                located = await self._search(vm)
        except TimeoutError:
            raise FenceFailed(vm, "no answer from the hosts within fence_timeout") from None
        if located:
            return VMState(vm, "on", located[0].host, located[0].vm.cartel)
        return VMState(vm, "off", None, None)

    # -- off -----------------------------------------------------------------------------------

    async def _off(self, vm: str, start: float) -> FenceResult:
        located = self._map.where_running(vm)
        if len(located) == 1:
            result = await self._try_kill(vm, located[0], start)
            if result is not None:
                return result
        for _ in range(SEARCH_ROUNDS):
            found = await self._search(vm)
            if not found:
                return self._done(vm, "off", "already_off", None, start)
            result = await self._try_kill(vm, found[0], start)
            if result is not None:
                return result
        raise FenceFailed(vm, f"kept moving between hosts over {SEARCH_ROUNDS} searches")

    async def _try_kill(self, vm: str, loc: Located, start: float) -> FenceResult | None:
        """Kill where `loc` says; None when the VM is not (or no longer) there."""
        host = self.hosts[loc.host]
        remaining = self.fence_timeout - (time.perf_counter() - start)
        if remaining <= 0:
            raise FenceFailed(vm, f"not confirmed within fence_timeout ({self.fence_timeout:g} s)")
        try:
            outcome = await host.guarded_kill(loc.vm, remaining)
        except LinkError as exc:
            self._log.warning("guarded kill failed", vm=vm, host=loc.host, reason=exc.reason)
            return None  # the search decides: it fails if this host stays unreachable
        self._seen.add(vm)
        if outcome is KillOutcome.KILLED:
            self._map.drop_running(loc.host, vm)
            self._refresh(loc.host)
            return self._done(vm, "off", "killed", loc, start)
        if outcome is KillOutcome.ALIVE:
            raise FenceFailed(
                vm, f"cartel {loc.vm.cartel} still running after kill -9", host=loc.host
            )
        self._log.info("not where the map says", vm=vm, host=loc.host, outcome=outcome.value)
        return None

    async def _search(self, vm: str) -> list[Located]:
        """Live listing on every host's fence lane at once; raise unless the answer is certain."""
        names = list(self.hosts)
        remaining = self.fence_timeout
        answers = await asyncio.gather(
            *(self._list(self.hosts[n], remaining) for n in names), return_exceptions=True
        )
        found: list[Located] = []
        unreachable: list[str] = []
        for name, answer in zip(names, answers, strict=True):
            if isinstance(answer, LinkError):
                unreachable.append(f"{name} ({answer.reason})")
            elif isinstance(answer, BaseException):
                raise answer
            else:
                found.extend(Located(name, v) for v in answer if v.name == vm)
        if len({loc.host for loc in found}) > 1:
            hosts = ", ".join(sorted({loc.host for loc in found}))
            raise FenceFailed(vm, f"ambiguous: running on several hosts at once ({hosts})")
        if found:
            self._seen.add(vm)
            return found
        if unreachable:
            raise FenceFailed(vm, "cannot confirm it is off: unreachable " + "; ".join(unreachable))
        if not (vm in self._seen or self._map.is_known(vm)):
            raise UnknownVM(vm)
        return []

    async def _list(self, host: Host, timeout: float) -> tuple[RunningVM, ...]:
        listing = await host.list_running(host.fence, timeout)
        self._map.update_running(host.name, listing, time.time())
        self._seen.update(v.name for v in listing)
        return listing

    # -- on, reboot ----------------------------------------------------------------------------

    async def _on(self, vm: str, start: float) -> FenceResult:
        located = await self._search(vm)
        if located:
            return self._done(vm, "on", "already_on", located[0], start)
        registered = self._map.where_registered(vm)
        hosts = sorted({host for host, _ in registered})
        if not hosts:
            raise FenceFailed(vm, "not registered on any reachable host: cannot power it on")
        if len(hosts) > 1:
            raise FenceFailed(vm, f"registered on several hosts ({', '.join(hosts)})")
        host = self.hosts[hosts[0]]
        try:
            await host.power_on(registered[0][1])
            listing = await self._list(host, self.fence_timeout)
        except LinkError as exc:
            raise FenceFailed(vm, exc.reason, host=host.name) from None
        self._refresh(host.name)
        running = [v for v in listing if v.name == vm]
        if not running:
            raise FenceFailed(vm, "power-on reported success but the VM is not running", host.name)
        return self._done(vm, "on", "powered_on", Located(host.name, running[0]), start)

    async def _reboot(self, vm: str, start: float) -> FenceResult:
        try:
            async with asyncio.timeout(self.fence_timeout):
                off = await self._off(vm, start)
        except TimeoutError:
            raise FenceFailed(
                vm, f"off not confirmed within fence_timeout ({self.fence_timeout:g} s)"
            ) from None
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
                off.elapsed_ms,
                warning=f"off confirmed, power-on failed: {exc.reason}",
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
            elapsed_ms=round((time.perf_counter() - start) * 1000, 3),
        )
