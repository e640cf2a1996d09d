"""The configured hosts: their lanes, their inventory loops, and how a reload changes them.

`hosts` is the one dict the fencer, the API and the metrics hold: it is changed in place, and
only in one synchronous step, so no coroutine ever sees half a reload. Each host has its own
inventory loop, so adding, replacing or removing one host never disturbs another's links.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, cast

import asyncssh

from vmfenced.backends import Backend
from vmfenced.config import Config
from vmfenced.daemon.host import Host, HostListener
from vmfenced.daemon.inventory import InventoryService
from vmfenced.daemon.knownhosts import KnownHosts
from vmfenced.daemon.reload_plan import ReloadPlan
from vmfenced.daemon.vsphere import VSphereSession, read_password
from vmfenced.daemon.vsphere_host import ApiHost, HybridHost, PendingHost, VSphereEntry, wire
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
        # kind = "vsphere": one session per entry; its hosts (ApiHost) join `hosts` as the
        # session's map shows them (docs/vsphere.md, "Plugging in").
        self._entries: dict[str, VSphereEntry] = {}
        self._api_names: dict[str, set[str]] = {}
        self._api_tasks: dict[VSphereEntry, asyncio.Task[None]] = {}
        # A reload's replacement of an entry whose session had no map yet: the old entry
        # serves until it has (then `_vsphere_changed` swaps them).
        self._pending: dict[str, VSphereEntry] = {}

    # -- building and running ------------------------------------------------------------------

    def build(
        self, config: Config, keys: dict[Path, asyncssh.SSHKey], names: Sequence[str]
    ) -> list[Host]:
        built = []
        for name in names:
            host = config.host(name)
            if host.kind == "vsphere":
                continue  # start_vsphere
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

    def start_vsphere(self, config: Config) -> None:
        """A session per vsphere entry, supervised like a lane (it logs in again by itself)."""
        for host in config.hosts:
            if host.kind == "vsphere" and host.name not in self._entries:
                entry = self._session(config, host.name)
                self._entries[host.name] = entry
                self._vsphere_changed(entry.session)  # its PendingHost until the first map

    def _session(self, config: Config, name: str) -> VSphereEntry:
        """A started session for that entry; it serves once it is in `_entries`."""
        host = config.host(name)
        password_file = host.password_file
        assert password_file is not None  # the config requires it
        session = VSphereSession(
            host,
            lambda: read_password(password_file),
            on_change=self._vsphere_changed,
            call_timeout=config.daemon.fence_timeout,
        )
        entry = VSphereEntry(session)
        self._api_tasks[entry] = self._spawn(session.supervise(), f"{name}-vsphere")
        return entry

    async def _close_entry(self, entry: VSphereEntry) -> None:
        await entry.session.close()
        task = self._api_tasks.pop(entry, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _take_out(self, name: str) -> VSphereEntry | None:
        """Its hosts out of `hosts` (a HybridHost back to its SSH host): no await."""
        entry = self._entries.pop(name, None)
        live: dict[str, object] = dict(self.hosts)
        for host_name in self._api_names.pop(name, set()):
            current = live.get(host_name)
            if isinstance(current, HybridHost):
                self.hosts[host_name] = current.ssh
            else:
                self.hosts.pop(host_name, None)
                self._map.forget(host_name)
        return entry

    def _vsphere_changed(self, session: VSphereSession) -> None:
        """The session's map changed: its hosts in `hosts` and their VMs in the map, in one
        synchronous step. A vCenter host an SSH entry maps (vsphere_name) is one HybridHost
        under the SSH entry's name: the verdict sees one machine once."""
        pending = self._pending.get(session.name)
        if pending is not None and pending.session is session and session.inventory is not None:
            # A reload's replacement for this entry has its first map: it takes over now.
            del self._pending[session.name]
            old = self._take_out(session.name)
            if old is not None:
                self._spawn(self._close_entry(old), f"{old.name}-vsphere-close")
            self._entries[session.name] = pending
        entry = self._entries.get(session.name)
        inventory = session.inventory
        if entry is None or entry.session is not session:
            return
        # `hosts` holds HybridHosts and ApiHosts as Hosts (cast below): look at them as they are.
        live: dict[str, object] = dict(self.hosts)
        mapped = {
            ssh.config.vsphere_name: ssh
            for ssh in map(_ssh, live.values())
            if isinstance(ssh, Host) and ssh.config.vsphere_name is not None
        }
        wanted = wire(entry, mapped)
        for name in self._api_names.get(entry.name, set()) - set(wanted):
            current = live.get(name)
            if isinstance(current, HybridHost):
                self.hosts[name] = current.ssh  # vCenter no longer shows it: SSH only
            else:
                self.hosts.pop(name, None)
                self._map.forget(name)
        for name, host in wanted.items():
            current = live.get(name)
            if isinstance(host, HybridHost):
                if not (
                    isinstance(current, HybridHost)
                    and current.ssh is host.ssh
                    and current.api.moref == host.api.moref
                ):
                    self.hosts[name] = cast(Host, host)
            elif isinstance(host, PendingHost):
                if not (isinstance(current, PendingHost) and current.entry is entry):
                    self.hosts[name] = cast(Host, host)
            elif not (
                isinstance(current, ApiHost)
                and current.entry is entry
                and current.moref == host.moref
            ):
                if current is not None:
                    # Another HostSystem under that name now (removed and added again):
                    # what the old one listed is no belief of this one.
                    self._map.forget(name)
                # An ApiHost answers every call the fencer, the API and the metrics make of
                # a Host (vmfenced.daemon.vsphere_host).
                self.hosts[name] = cast(Host, host)
        self._api_names[entry.name] = set(wanted)
        if inventory is not None:
            entry.feed(self._map, inventory, time.time(), skip=set(mapped))

    def _rewire(self) -> None:
        for entry in self._entries.values():
            self._vsphere_changed(entry.session)

    def activate(self, host: Host) -> None:
        """Make it the host of its name, with a fresh inventory loop."""
        self.hosts[host.name] = host
        inventory = InventoryService({host.name: host}, self._map, self._interval)
        inventory.start(lambda coro, name: self._track(host, coro, name))
        self._inventories[host.name] = inventory

    def _track(self, host: Host, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.setdefault(host, []).append(self._spawn(coro, name))

    def is_active(self, host: Host) -> bool:
        current = self.hosts.get(host.name)
        return current is not None and _ssh(current) is host

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
        for entry in list(self._entries.values()):
            # A vsphere entry's hosts exist once its first map arrived.
            complete &= await entry.session.wait_mapped(max(0.0, deadline - loop.time()))
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
        await asyncio.gather(
            *(self._close_entry(e) for e in list(self._api_tasks)), return_exceptions=True
        )

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
        # New sessions log in while the old ones serve (a failed login still goes in: it
        # logs in again by itself, like a lane).
        sessions = {
            name: self._session(config, name)
            for name in (*plan.added, *plan.replaced)
            if config.host(name).kind == "vsphere"
        }
        try:
            for entry in sessions.values():
                await entry.session.wait_mapped(entry.session.call_timeout * 2 + 1)
            if fresh:
                waves = -(-len(fresh) // STARTUP_HOSTS_AT_ONCE)
                settle = (max(h.fence.ssh.connect_timeout for h in fresh) * 2 + 1) * waves
                await asyncio.gather(
                    *(lane.wait_settled(settle) for h in fresh for lane in (h.fence, h.inventory))
                )
            await drained()
        except BaseException:
            await asyncio.gather(*(self.retire(h) for h in fresh), return_exceptions=True)
            await asyncio.gather(*map(self._close_entry, sessions.values()), return_exceptions=True)
            raise
        # From here to the return: no await, so nothing runs between the old and new set.
        leaving = [*plan.replaced, *plan.removed]
        for name in leaving:
            # A replacement still waiting for its first map is replaced (or removed) again.
            stale = self._pending.pop(name, None)
            if stale is not None:
                self._spawn(self._close_entry(stale), f"{name}-vsphere-close")
        for name, entry in sessions.items():
            if name in self._entries and entry.session.inventory is None:
                # A replaced entry keeps its hosts until its replacement has mapped: a
                # replacement without a map knows no host (`_vsphere_changed` swaps them).
                self._pending[name] = entry
        kept = set(self._pending)
        for entry in filter(
            None, map(self._take_out, [n for n in leaving if n in self._entries and n not in kept])
        ):
            self._spawn(self._close_entry(entry), f"{entry.name}-vsphere-close")
        self._entries.update({n: e for n, e in sessions.items() if n not in kept})
        live: dict[str, object] = dict(self.hosts)
        ssh_leaving = [
            n for n in leaving if n in live and not isinstance(live[n], (ApiHost, PendingHost))
        ]
        out = [_ssh(self.hosts[name]) for name in ssh_leaving]
        for host in out:
            self._tasks[host] = self._stop(host)
        for name in ssh_leaving:
            # Removed, or an SSH host whose entry is a vsphere entry now (no host of its name).
            if name in plan.removed or config.host(name).kind == "vsphere":
                del self.hosts[name]
                self._inventories.pop(name, None)
        # A replaced host may be another machine now: what the old one listed (its vmids
        # above all) must never serve the new one. Its map fills again from its new links.
        for name in (*plan.removed, *plan.replaced):
            self._map.forget(name)
        self.set_interval(config.daemon.inventory_interval)
        for host in fresh:
            self.activate(host)
        # A new or replaced SSH host may be one vCenter manages (vsphere_name); a new session
        # puts its hosts in.
        self._rewire()
        return out


def _ssh(host: object) -> Host:
    """The SSH host itself, also when vCenter manages it (a HybridHost wraps it)."""
    return host.ssh if isinstance(host, HybridHost) else cast(Host, host)
