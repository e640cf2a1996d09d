"""Keeps the live map fresh: every host listed every interval, at link-up and after every fence.

After a fence only the running VMs are listed again (a native, millisecond command): the
registration listing goes through hostd (slow, seconds on a busy host) and a kill does not change
it, so it waits for the interval or a link-up.
"""

from __future__ import annotations

import asyncio
import random
import time

import structlog

from vmfenced.daemon.host import Host, Spawn
from vmfenced.errors import LinkError
from vmfenced.model import HostInventory, LinkState, VMMap

# esxcli and vim-cmd go through hostd: seconds on a busy host, never on the fence path.
INVENTORY_TIMEOUT = 60.0
# Fractions of the interval drawn off the wait after a host's first round (its phase), and
# off every later wait (keeps the phases apart when something lined them up again).
FIRST_SPREAD = 0.5
JITTER = 0.1


class InventoryService:
    def __init__(self, hosts: dict[str, Host], vmmap: VMMap, interval: float) -> None:
        self._hosts = hosts
        self._map = vmmap
        self._interval = interval
        self._wake = {name: asyncio.Event() for name in hosts}
        self._first = {name: asyncio.Event() for name in hosts}
        self._full = dict.fromkeys(hosts, True)
        self._log = structlog.get_logger("vmfenced.inventory")

    def start(self, spawn: Spawn) -> None:
        for host in self._hosts.values():
            spawn(self._loop(host), f"{host.name}-inventory-loop")

    def set_interval(self, seconds: float) -> None:
        """Read by each loop before its next wait: a reload's new interval applies from then."""
        self._interval = seconds

    def request(self, host: str, *, full: bool = True) -> None:
        """Refresh that host soon (after a fence: full=False, at link-up); never waits."""
        event = self._wake.get(host)
        if event is not None:
            self._full[host] |= full
            event.set()

    async def first_round(self, timeout: float) -> bool:
        """True once every host had one inventory attempt (for READY)."""
        try:
            async with asyncio.timeout(timeout):
                for event in self._first.values():
                    await event.wait()
        except TimeoutError:
            return False
        return True

    async def _loop(self, host: Host) -> None:
        wake = self._wake[host.name]
        spread = FIRST_SPREAD
        while True:
            wake.clear()
            full, self._full[host.name] = self._full[host.name], False
            await self.refresh(host, full=full)
            self._first[host.name].set()
            # Hosts started together would list together every interval for ever: one burst
            # of N listings to parse at once (fences queue behind it) instead of a trickle.
            # Shorter waits only, so no host is listed less often than every interval.
            wait = self._interval * (1 - random.uniform(0, spread))
            spread = JITTER
            try:
                async with asyncio.timeout(wait):
                    await wake.wait()
            except TimeoutError:
                self._full[host.name] = True

    async def refresh(self, host: Host, *, full: bool = True) -> None:
        timeout = INVENTORY_TIMEOUT
        lane = host.inventory
        # Both lanes' first attempts end before the first round does: READY=1 and the first
        # round trip then describe the host, not a lane still connecting.
        for first in (lane, host.fence):
            if first.state is LinkState.CONNECTING:
                await first.wait_settled(timeout)
        if full and host.fence.state is LinkState.UP:
            try:
                await host.probe(5)
            except LinkError as exc:
                self._log.warning("probe failed", host=host.name, reason=exc.reason)
        if lane.state is not LinkState.UP:
            return
        started = time.time()
        try:
            running = await host.list_running(lane, timeout)
        except LinkError as exc:
            self._log.warning("inventory failed", host=host.name, reason=exc.reason)
            return
        # The slow registration listing must not hold back the running-VM map.
        self._map.update_running(host.name, running, started)
        if not full:
            return
        try:
            registered = await host.list_registered(timeout)
        except LinkError as exc:
            self._log.warning("registration listing failed", host=host.name, reason=exc.reason)
            registered = None
        current = self._map.hosts.get(host.name)
        # A fence may have refreshed the running list meanwhile; keep the newer one.
        running_now = current.running if current is not None else running
        at = current.at if current is not None else started
        if registered is None and current is not None:
            registered = current.registered
        self._map.update(host.name, HostInventory(running_now, registered, at))
        self._log.debug("inventory", host=host.name, running=len(running_now))
