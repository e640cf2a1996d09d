"""The configured hosts: their lanes, their inventory loops, and how a reload changes them.

`hosts` is the one dict the fencer, the API and the metrics hold: it is changed in place, and
only in one synchronous step, so no coroutine ever sees half a reload. Each host has its own
inventory loop, so adding, replacing or removing one host never disturbs another's links.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import asyncssh

from vmfenced.backends import Backend
from vmfenced.config import Config
from vmfenced.daemon.host import Host, HostListener
from vmfenced.daemon.inventory import InventoryService
from vmfenced.daemon.knownhosts import KnownHosts
from vmfenced.daemon.reload_plan import ReloadPlan
from vmfenced.model import VMMap

Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]

# Hosts whose first connections are in flight at once at startup. Each SSH handshake costs the
# daemon's one thread milliseconds of CPU (key exchange, host key check): with hundreds in
# flight together every one of them outlives connect_timeout, all fail, and all retry together
# (200 hosts on the lab: 400 lanes timed out, 30 s to all up). Admitted a few at a time, each
# lane connects at once and the whole set is up in about the CPU time it costs (11 s, none down).
STARTUP_HOSTS_AT_ONCE = 32


class HostSet:
    def __init__(
        self,
        vmmap: VMMap,
        backends: dict[str, Backend],
        spawn: Spawn,
        on_change: HostListener,
        interval: float,
    ) -> None:
        self.hosts: dict[str, Host] = {}
        self._map = vmmap
        self._backends = backends
        self._spawn = spawn
        self._on_change = on_change
        self._interval = interval
        self._tasks: dict[Host, list[asyncio.Task[None]]] = {}
        self._inventories: dict[str, InventoryService] = {}
        self._known_hosts = KnownHosts()

    # -- building and running ------------------------------------------------------------------

    def build(
        self, config: Config, keys: dict[Path, asyncssh.SSHKey], names: Sequence[str]
    ) -> list[Host]:
        built = []
        for name in names:
            host = config.host(name)
            ssh = config.ssh_for(host)
            built.append(
                Host(
                    host,
                    ssh,
                    self._backends[host.kind],
                    [keys[p] for p in ssh.client_keys],
                    self._on_change,
                    known_hosts=self._known_hosts,
                )
            )
        return built

    def start(self, host: Host) -> None:
        """Connect its lanes (in the background); it serves nothing until activated."""
        host.start(lambda coro, name: self._track(host, coro, name))

    def start_all(self, hosts: Sequence[Host]) -> None:
        """`start` every host, at most STARTUP_HOSTS_AT_ONCE hosts still connecting at a time.

        A host waiting for its turn has its lanes in CONNECTING: a fence or an inventory
        round waits for them as for any lane still connecting."""
        gate = asyncio.Semaphore(STARTUP_HOSTS_AT_ONCE)
        for host in hosts:
            self._track(host, self._admit(host, gate), f"{host.name}-admit")

    async def _admit(self, host: Host, gate: asyncio.Semaphore) -> None:
        async with gate:
            self.start(host)
            # A lane's first attempt ends within its connect budget, success or not.
            settle = host.fence.ssh.connect_timeout * 2 * len(host.config.addresses()) + 1
            await asyncio.gather(
                host.fence.wait_settled(settle), host.inventory.wait_settled(settle)
            )

    def activate(self, host: Host) -> None:
        """Make it the host of its name, with a fresh inventory loop."""
        self.hosts[host.name] = host
        inventory = InventoryService({host.name: host}, self._map, self._interval)
        inventory.start(lambda coro, name: self._track(host, coro, name))
        self._inventories[host.name] = inventory

    def _track(self, host: Host, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.setdefault(host, []).append(self._spawn(coro, name))

    def is_active(self, host: Host) -> bool:
        return self.hosts.get(host.name) is host

    def request(self, name: str, *, full: bool = True) -> None:
        """Refresh that host's inventory soon; a name no longer configured is ignored."""
        inventory = self._inventories.get(name)
        if inventory is not None:
            inventory.request(name, full=full)

    def request_running(self, name: str) -> None:
        """After a fence: list that host's running VMs again, not its registrations."""
        self.request(name, full=False)

    async def first_round(self, timeout: float) -> bool:
        """True once every host had one inventory attempt (for READY)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        complete = True
        for inventory in list(self._inventories.values()):
            complete &= await inventory.first_round(max(0.0, deadline - loop.time()))
        return complete

    def set_interval(self, seconds: float) -> None:
        self._interval = seconds
        for inventory in self._inventories.values():
            inventory.set_interval(seconds)

    async def retire(self, host: Host) -> None:
        """Stop its loops and close its connections."""
        tasks = self._stop(host)
        await asyncio.gather(*tasks, return_exceptions=True)
        await host.close()

    def _stop(self, host: Host) -> list[asyncio.Task[None]]:
        # Cancelled at once: a cancelled loop never writes to the map again.
        tasks = self._tasks.pop(host, [])
        for task in tasks:
            task.cancel()
        return tasks

    async def close(self) -> None:
        hosts = list(self._tasks)
        await asyncio.gather(*(self.retire(h) for h in hosts), return_exceptions=True)

    # -- reload --------------------------------------------------------------------------------

    async def reload(
        self,
        plan: ReloadPlan,
        drained: Callable[[], Awaitable[None]],
    ) -> list[Host]:
        """Apply the host part of a plan; return the hosts it took out (the caller retires them).

        New and replacing hosts connect first, while the old ones serve; then, once no fence
        is in flight, one synchronous swap. An unchanged host is never touched.
        """
        config = plan.config
        fresh = self.build(config, plan.keys, [*plan.added, *plan.replaced])
        self.start_all(fresh)
        try:
            if fresh:
                waves = -(-len(fresh) // STARTUP_HOSTS_AT_ONCE)
                settle = (max(h.fence.ssh.connect_timeout for h in fresh) * 2 + 1) * waves
                await asyncio.gather(
                    *(lane.wait_settled(settle) for h in fresh for lane in (h.fence, h.inventory))
                )
            await drained()
        except BaseException:
            await asyncio.gather(*(self.retire(h) for h in fresh), return_exceptions=True)
            raise
        # From here to the return: no await, so nothing runs between the old and new set.
        out = [self.hosts[name] for name in (*plan.replaced, *plan.removed)]
        for host in out:
            self._tasks[host] = self._stop(host)
        for name in plan.removed:
            del self.hosts[name]
            self._inventories.pop(name, None)
        # A replaced host may be another machine now: what the old one listed (its vmids
        # above all) must never serve the new one. Its map fills again from its new links.
        for name in (*plan.removed, *plan.replaced):
            self._map.forget(name)
        self.set_interval(config.daemon.inventory_interval)
        for host in fresh:
            self.activate(host)
        return out
