"""vCenter's hosts as the fencer's hosts: how a non-SSH host plugs into the daemon.

The fencer (fence.py) and the evidence gatherer (evidence.py) call a handful of a `Host`'s
methods: `list_running`, `list_registered`, `kill_and_list`, `power_on`, and read `state`,
`listing_problem`, `name`. An `ApiHost` answers the same calls for one HostSystem of a vsphere
entry (named "vc1/esx-01") from that entry's session: listings from one property read shared by
every host of the entry (`VSphereEntry.read`, coalesced like an SSH listing), the "kill" is
PowerOffVM_Task and a fresh powerState read. The verdict module decides, unchanged.

`VSphereEntry.feed` writes the session's live map into the VMMap on every update (no inventory
loop, no polling): the fencer's fast path and its beliefs about silent hosts come from there.
docs/vsphere.md ("Plugging in") says what is left for the host set, status and reload.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from vmfenced.backends import Backend
from vmfenced.config import HostConfig
from vmfenced.daemon import vsphere_views
from vmfenced.daemon.evidence import Coalesced
from vmfenced.daemon.host import Host
from vmfenced.daemon.vsphere import VSphereSession
from vmfenced.daemon.vsphere_views import HostRecord, Inventory
from vmfenced.errors import LinkDown, LinkError, ListingDoubt
from vmfenced.model import KillOutcome, LinkState, RegisteredVM, RunningVM, VMMap


class VSphereEntry:
    """One vsphere [[hosts]] entry: its session, its shared reads, its hosts."""

    def __init__(self, session: VSphereSession) -> None:
        self.session = session
        self.name = session.name
        self._read: Coalesced[Inventory] = Coalesced(session.read)

    async def read(self, since: float, timeout: float) -> Inventory:
        """A read that started at or after `since` (monotonic), shared with other waiters."""
        try:
            return await asyncio.wait_for(self._read.get(since), timeout)
        except TimeoutError:
            raise LinkError(self.name, "api", f"no inventory read within {timeout:g} s") from None

    def hosts(self) -> dict[str, ApiHost | PendingHost]:
        """One ApiHost per HostSystem of the live map; until the first map, one PendingHost
        named after the entry: the entry's hosts are unknown, so a fence must not answer as
        if it had none (unknown_vm, which an agent may read as off)."""
        inventory = self.session.inventory
        if inventory is None:
            return {self.name: PendingHost(self)}
        made = (ApiHost(self, record) for record in inventory.hosts.values())
        return {host.name: host for host in made}

    def feed(
        self, vmmap: VMMap, inventory: Inventory, at: float, skip: Collection[str] = ()
    ) -> None:
        """vCenter's placement of every running VM, as each connected host's latest listing.
        A host vCenter does not show connected keeps its listing from when it was: vCenter's
        belief of it changes (HA moves its VM objects) while its VMs may still run there.
        While a running VM cannot be placed (vsphere_views.unplaced), no connected host has a
        latest listing: the fence lists afresh, and fails on the doubt.
        `skip`: vCenter names of hosts an SSH entry maps (their own listings are the map's)."""
        for record in inventory.hosts.values():
            if record.name in skip or record.connection_state != "connected":
                continue
            name = vsphere_views.view_name(self.name, record)
            try:
                here = vsphere_views.host_listing(self.name, inventory, record.moref)
            except ListingDoubt:
                vmmap.forget(name)
                continue
            running = tuple(
                vsphere_views.running(v)
                for v in here
                if v.power_state in vsphere_views.RUNNING_STATES
            )
            vmmap.update_running(name, running, at)
            vmmap.update_registered(name, tuple(vsphere_views.registered(v) for v in here))


class PendingHost:
    """A vsphere entry before its session's first map: one host that is DOWN and lists
    nothing (LinkDown), with no latest listing, so every fence fails "cannot confirm" until
    the map names the entry's real hosts."""

    def __init__(self, entry: VSphereEntry) -> None:
        self.entry = entry
        self.name = entry.name
        self.backend = None
        self.listing_problem: str | None = None
        self.state = LinkState.DOWN
        self.fence = ApiLane("api", lambda: LinkState.DOWN)
        self.inventory = ApiLane("map", lambda: LinkState.DOWN)

    @property
    def config(self) -> HostConfig:
        return self.entry.session.config

    def _down(self) -> LinkDown:
        session = self.entry.session
        why = f"session {session.state.value}" + (f": {session.reason}" if session.reason else "")
        return LinkDown(self.name, "api", f"no map of vCenter's hosts yet ({why})")

    async def list_running(self, lane: Any, timeout: float) -> tuple[RunningVM, ...]:
        raise self._down()

    async def list_registered(
        self, timeout: float, *, urgent: bool = False
    ) -> tuple[RegisteredVM, ...]:
        raise self._down()

    async def kill_and_list(
        self, vm: RunningVM, timeout: float
    ) -> tuple[KillOutcome, tuple[RunningVM, ...] | None]:
        raise self._down()  # never a target: it lists nothing

    async def power_on(self, vm: RegisteredVM) -> None:
        raise self._down()

    def snapshot(self, inventory_at: float | None, vm_count: int) -> dict[str, Any]:
        session = self.entry.session
        return {
            "name": self.name,
            "address": session.config.address,
            "port": session.config.port,
            "kind": "vsphere",
            "state": LinkState.DOWN.value,
            "path": f"api:{self.entry.name}",
            "since": session.since,
            "reason": self._down().reason,
            "listing_problem": None,
            "lanes": {"api": session.state.value},
            "warnings": session.warnings,
            "inventory_age_s": None,
            "vm_count": vm_count,
        }


class ApiLane:
    """A lane's name and state, for a host that has no SSH lanes (metrics, status)."""

    def __init__(self, name: str, state: Callable[[], LinkState]) -> None:
        self.name = name
        self._state = state

    @property
    def state(self) -> LinkState:
        return self._state()


class ApiHost:
    """One HostSystem of a vsphere entry, answering as a `Host` does (see the module doc)."""

    def __init__(self, entry: VSphereEntry, record: HostRecord) -> None:
        self.entry = entry
        self.moref = record.moref
        self.host_name = record.name  # vCenter's name of the host (what vsphere_name names)
        self.name = vsphere_views.view_name(entry.name, record)
        # No SSH backend: nothing to run on the host, no HA stack to hold off.
        self.backend = None
        self.listing_problem: str | None = None
        # No SSH lanes: what the metrics read of a host's two lanes, from the session and its
        # map (the evidence gatherer passes `host.fence` to list_running, unused here).
        self.fence = ApiLane("api", lambda: self.state)
        self.inventory = ApiLane("map", self._map_state)

    @property
    def config(self) -> HostConfig:
        """The vsphere entry's config (what the evidence reads of every host: no Proxmox node)."""
        return self.entry.session.config

    @property
    def state(self) -> LinkState:
        inventory = self.entry.session.inventory
        record = None if inventory is None else inventory.hosts.get(self.moref)
        if self.entry.session.state is not LinkState.UP or record is None:
            return LinkState.DOWN
        return LinkState.UP if record.connection_state == "connected" else LinkState.DOWN

    def _map_state(self) -> LinkState:
        up = self.entry.session.state is LinkState.UP and self.entry.session.inventory is not None
        return LinkState.UP if up else LinkState.DOWN

    def _mine(self, inventory: Inventory) -> tuple[vsphere_views.VMRecord, ...]:
        """Every VM the read places here; ListingDoubt while a running VM cannot be placed
        (it may run here unseen), LinkDown while vCenter cannot reach this host."""
        self._connected(inventory)
        try:
            here = vsphere_views.host_listing(self.entry.name, inventory, self.moref)
        except ListingDoubt as exc:
            self.listing_problem = exc.reason
            raise ListingDoubt(self.name, "api", exc.reason) from None
        self.listing_problem = None
        return here

    def _connected(self, inventory: Inventory) -> None:
        """LinkDown unless vCenter shows this host connected (it answers nothing then)."""
        record = inventory.hosts.get(self.moref)
        if record is None:
            raise LinkDown(self.name, "api", "no longer in vCenter's inventory")
        if record.connection_state != "connected":
            raise LinkDown(self.name, "api", f"vCenter shows the host {record.connection_state}")

    async def _fresh(self, timeout: float) -> Inventory:
        return await self.entry.read(time.monotonic(), timeout)

    def _running(self, inventory: Inventory) -> tuple[RunningVM, ...]:
        return tuple(
            vsphere_views.running(vm)
            for vm in self._mine(inventory)
            if vm.power_state in vsphere_views.RUNNING_STATES
        )

    async def list_running(self, lane: Any, timeout: float) -> tuple[RunningVM, ...]:
        return self._running(await self._fresh(timeout))

    async def list_registered(
        self, timeout: float, *, urgent: bool = False
    ) -> tuple[RegisteredVM, ...]:
        inventory = await self._fresh(timeout)
        return tuple(vsphere_views.registered(v) for v in self._mine(inventory))

    async def kill_and_list(
        self, vm: RunningVM, timeout: float
    ) -> tuple[KillOutcome, tuple[RunningVM, ...] | None]:
        """PowerOffVM_Task on the instance the verdict chose (by instance UUID, re-checked on
        its moref right before the call), its fresh powerState, then this host's listing
        from a read started after it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # A fresh read, not the map: the map may not have seen a move yet, and the power-off
        # would then be reported on the wrong host (found by test_fencer_when_the_map_is_stale).
        inventory = await self._fresh(timeout)
        # A lost host's VMs are where vCenter last believed them (HA may have moved their
        # objects while they still run there): not "not here", no answer.
        self._connected(inventory)
        record = vsphere_views.find(inventory, vm)
        if record is None or record.host != self.moref or record.instance_uuid is None:
            # Not here (moved, gone): the verdict searches again.
            return KillOutcome.NOT_RUNNING, None
        state = await asyncio.wait_for(
            self.entry.session.power_off(record.moref, record.instance_uuid),
            max(0.05, deadline - loop.time()),
        )
        outcome = vsphere_views.kill_outcome(state)
        if outcome is None:
            raise LinkError(self.name, "api", f"power state after the power-off: {state!r}")
        try:
            after = self._running(await self._fresh(max(0.05, deadline - loop.time())))
        except LinkError:
            return outcome, None
        return outcome, after

    async def power_on(self, vm: RegisteredVM) -> None:
        inventory = await self._fresh(self.entry.session.call_timeout)
        record = inventory.vms.get(vm.vmid)
        if record is None or record.host != self.moref or record.instance_uuid is None:
            raise LinkError(self.name, "api", f"{vm.vmid} is no longer registered here")
        if (record.name, record.config_file) != (vm.name, vm.config_file):
            # The moref names another VM now (renamed, or re-registered from another file):
            # not the registration the verdict chose.
            raise LinkError(
                self.name,
                "api",
                f"{vm.vmid} is now {record.name!r} ({record.config_file}), not the "
                f"registration chosen ({vm.name!r}, {vm.config_file}): not powered on",
            )
        state = await self.entry.session.power_on(record.moref, record.instance_uuid)
        if state not in vsphere_views.RUNNING_STATES:
            raise LinkError(self.name, "api", f"{vm.name} is {state} after PowerOnVM_Task")

    def snapshot(self, inventory_at: float | None, vm_count: int) -> dict[str, Any]:
        session = self.entry.session
        return {
            "name": self.name,
            "address": session.config.address,
            "port": session.config.port,
            "kind": "vsphere",
            "state": self.state.value,
            "path": f"api:{self.entry.name}",
            "since": session.since,
            "reason": session.reason,
            "listing_problem": self.listing_problem,
            "lanes": {"api": session.state.value},
            "warnings": session.warnings,
            "inventory_age_s": None
            if inventory_at is None
            else round(max(0.0, time.time() - inventory_at), 3),
            "vm_count": vm_count,
        }


class HybridHost:
    """An ESXi host with an SSH entry (`vsphere_name`) that vCenter also manages: one host to
    the verdict, named after the SSH entry (never twice, or one VM would be two instances).

    With its SSH fence lane up, its listings are the lane's (processes are the ground truth on
    ESXi) and the kill is the guarded kill over the lane (milliseconds). With the lane down,
    its listings are vCenter's for that host and the kill is PowerOffVM_Task: the fallback. An
    instance found through vCenter (cartel 0) is always powered off through vCenter.
    """

    def __init__(self, ssh: Host, api: ApiHost) -> None:
        self.ssh = ssh
        self.api = api
        self.name = ssh.name
        self.fence = ssh.fence
        self.inventory = ssh.inventory
        self.config = ssh.config

    @property
    def backend(self) -> Backend:
        """The SSH entry's backend (what the fencer reads for an HA hold-off: none on ESXi)."""
        return self.ssh.backend

    @property
    def _lane_up(self) -> bool:
        return self.ssh.fence.state is LinkState.UP

    @property
    def state(self) -> LinkState:
        return LinkState.UP if self._lane_up else self.api.state

    @property
    def listing_problem(self) -> str | None:
        return self.ssh.listing_problem if self._lane_up else self.api.listing_problem

    def snapshot(self, inventory_at: float | None, vm_count: int) -> dict[str, Any]:
        return {
            **self.ssh.snapshot(inventory_at, vm_count),
            "state": self.state.value,
            "vsphere": self.api.name,
            "path": self.path(),
        }

    def path(self) -> str:
        """Which way a fence of a VM on this host goes now (for status)."""
        return f"ssh:{self.name}" if self._lane_up else f"api:{self.api.entry.name}"

    async def list_running(self, lane: Any, timeout: float) -> tuple[RunningVM, ...]:
        if self._lane_up:
            return await self.ssh.list_running(self.ssh.fence, timeout)
        return await self.api.list_running(None, timeout)

    async def list_registered(
        self, timeout: float, *, urgent: bool = False
    ) -> tuple[RegisteredVM, ...]:
        if self._lane_up:
            return await self.ssh.list_registered(timeout, urgent=urgent)
        return await self.api.list_registered(timeout, urgent=urgent)

    async def kill_and_list(
        self, vm: RunningVM, timeout: float
    ) -> tuple[KillOutcome, tuple[RunningVM, ...] | None]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        fallback_reason = "the SSH lane is down"
        if vm.cartel != 0 and self._lane_up:
            try:
                return await self.ssh.kill_and_list(vm, timeout)
            except LinkError as exc:
                # The lane failed under the kill (which may have run): vCenter powers the VM
                # off, or finds it off; either way its fresh read decides.
                fallback_reason = exc.reason
        api_vm = vm if vm.cartel == 0 else await self._by_name(vm.name, deadline - loop.time())
        if api_vm is None:
            raise LinkError(
                self.name,
                "api",
                f"fallback after {fallback_reason}: vCenter does not show exactly one "
                f"{vm.name!r} on this host",
            )
        return await self.api.kill_and_list(api_vm, max(0.05, deadline - loop.time()))

    async def _by_name(self, name: str, timeout: float) -> RunningVM | None:
        """The instance vCenter places on this host under `name` (None: not exactly one)."""
        inventory = await self.api.entry.read(time.monotonic(), max(0.05, timeout))
        here = [
            v
            for v in inventory.named(name)
            if v.host == self.api.moref and v.power_state in vsphere_views.RUNNING_STATES
        ]
        return vsphere_views.running(here[0]) if len(here) == 1 else None

    async def power_on(self, vm: RegisteredVM) -> None:
        # The registration came from the listing that found it: ESXi's vim-cmd vmids are
        # decimal, vCenter's are morefs ("vm-42").
        if vm.vmid.isdecimal():
            await self.ssh.power_on(vm)
        else:
            await self.api.power_on(vm)


def wire(
    entry: VSphereEntry, mapped: Mapping[str, Host]
) -> dict[str, ApiHost | HybridHost | PendingHost]:
    """The fencer's hosts for one vsphere entry: an ApiHost per vCenter host, except hosts an
    SSH entry maps (`mapped`: SSH hosts by their vsphere_name), which are one HybridHost
    under the SSH entry's name; before the first map, its PendingHost."""
    out: dict[str, ApiHost | HybridHost | PendingHost] = {}
    for host in entry.hosts().values():
        if isinstance(host, PendingHost):
            out[host.name] = host
            continue
        ssh = mapped.get(host.host_name)
        if ssh is None:
            out[host.name] = host
        else:
            out[ssh.name] = HybridHost(ssh, host)
    return out
