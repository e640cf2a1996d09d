"""Pure data: VMs, host link states and the VM -> host map. No I/O here."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class LinkState(StrEnum):
    UP = "up"
    CONNECTING = "connecting"
    DOWN = "down"


class KillOutcome(StrEnum):
    KILLED = "killed"  # the guard matched, kill -9 sent, the process is gone
    NOT_RUNNING = "not-running"  # nothing runs under that cartel/PID
    NOT_THAT_VM = "not-that-vm"  # the cartel/PID runs something else: reused, never killed
    ALIVE = "alive"  # killed, but still there when the host-side wait ended


@dataclass(frozen=True, slots=True)
class HoldOff:
    """What a VM's HA stack (Proxmox) answered when asked to keep a killed VM stopped."""

    outcome: str  # one of HOLD_OUTCOMES
    detail: str = ""


HOLD_OUTCOMES = ("not-managed", "stop-accepted", "stop-refused", "unknown")


@dataclass(frozen=True, slots=True)
class RunningVM:
    """One running VM instance: cartel/world IDs belong to this power-on on this host."""

    name: str
    config_file: str
    cartel: int
    world: int | None = None
    uuid: str | None = None
    # Proxmox VE: the VMID, the VM's identity (a rename changes `name` at once, never the
    # VMID). A request may name the VM by either.
    vmid: str | None = None

    def answers_to(self, name: str) -> bool:
        return name == self.name or (self.vmid is not None and name == self.vmid)


@dataclass(frozen=True, slots=True)
class RegisteredVM:
    """A VM the host has registered (running or not); vmid is the host's handle for power-on."""

    vmid: str
    name: str
    config_file: str
    # Proxmox VE: the cluster node that owns the VM (its config lives in that node's directory
    # of /etc/pve). Any node lists the whole cluster's VMs, so a registration names its owner;
    # None for the other kinds, whose registrations are the listing host's own.
    owner: str | None = None

    def answers_to(self, name: str) -> bool:
        """A Proxmox VM answers to its VMID as well as to its name."""
        return name == self.name or (self.owner is not None and name == self.vmid)


@dataclass(frozen=True, slots=True)
class HostInventory:
    running: tuple[RunningVM, ...]
    # None when the registration listing failed: the host may register VMs we do not know of.
    registered: tuple[RegisteredVM, ...] | None
    at: float


@dataclass(frozen=True, slots=True)
class Located:
    host: str
    vm: RunningVM


class VMMap:
    """The live map VM -> host -> process, one inventory per host, replaced whole.

    Written only through these methods: they keep a name -> hosts index, so locating a VM
    costs the same with 2,000 VMs as with 20 (a fence locates before it kills).
    """

    def __init__(self) -> None:
        self.hosts: dict[str, HostInventory] = {}
        self._running: dict[str, set[str]] = {}
        self._registered: dict[str, set[str]] = {}

    def _put(self, host: str, inventory: HostInventory | None) -> None:
        old = self.hosts.get(host)
        if old is not None:
            _unindex(
                self._running, host, (k for vm in old.running for k in _keys(vm.name, vm.vmid))
            )
            _unindex(
                self._registered,
                host,
                (
                    k
                    for reg in old.registered or ()
                    for k in _keys(reg.name, reg.vmid if reg.owner is not None else None)
                ),
            )
        if inventory is None:
            self.hosts.pop(host, None)
            return
        self.hosts[host] = inventory
        for vm in inventory.running:
            for key in _keys(vm.name, vm.vmid):
                self._running.setdefault(key, set()).add(host)
        for reg in inventory.registered or ():
            for key in _keys(reg.name, reg.vmid if reg.owner is not None else None):
                self._registered.setdefault(key, set()).add(host)

    def update(self, host: str, inventory: HostInventory) -> None:
        self._put(host, inventory)

    def update_running(self, host: str, running: tuple[RunningVM, ...], at: float) -> None:
        """A fresh process listing that keeps the (slower) registration listing."""
        old = self.hosts.get(host)
        self._put(host, HostInventory(running, old.registered if old else None, at))

    def update_registered(self, host: str, registered: tuple[RegisteredVM, ...]) -> None:
        """A fresh registration listing that keeps the running VMs (and their time)."""
        old = self.hosts.get(host)
        if old is not None:
            self._put(host, HostInventory(old.running, registered, old.at))

    def forget(self, host: str) -> None:
        self._put(host, None)

    def drop_running(self, host: str, name: str) -> None:
        old = self.hosts.get(host)
        if old is not None:
            kept = tuple(vm for vm in old.running if not vm.answers_to(name))
            self._put(host, HostInventory(kept, old.registered, old.at))

    def where_running(self, name: str) -> list[Located]:
        return [
            Located(host, vm)
            for host in sorted(self._running.get(name, ()))
            for vm in self.hosts[host].running
            if vm.answers_to(name)
        ]

    def where_registered(self, name: str) -> list[tuple[str, RegisteredVM]]:
        return [
            (host, reg)
            for host in sorted(self._registered.get(name, ()))
            for reg in self.hosts[host].registered or ()
            if reg.answers_to(name)
        ]

    def is_known(self, name: str) -> bool:
        return name in self._running or name in self._registered

    def names(self) -> list[str]:
        out = {vm.name for inv in self.hosts.values() for vm in inv.running}
        out.update(reg.name for inv in self.hosts.values() for reg in inv.registered or ())
        return sorted(out)


def resolve(name: str, aliases: dict[str, str]) -> tuple[str, str | None]:
    """Alias first (a cluster node name), else the VM display name itself."""
    if name in aliases:
        return aliases[name], name
    return name, None


def alias_of(vm: str, aliases: dict[str, str]) -> str | None:
    for alias, target in aliases.items():
        if target == vm:
            return alias
    return None


def _keys(name: str, vmid: str | None) -> tuple[str, ...]:
    return (name,) if vmid is None or vmid == name else (name, vmid)


def _unindex(index: dict[str, set[str]], host: str, names: Iterable[str]) -> None:
    for name in names:
        hosts = index.get(name)
        if hosts is not None:
            hosts.discard(host)
            if not hosts:
                del index[name]
