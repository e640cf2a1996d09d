"""A vSphere inventory read, as the verdict's host views. Pure: no I/O, no pyvmomi.

vCenter answers for every host of its inventory in one read, so one property read is a fresh
complete "listing" of each connected host at once. The verdict module decides as for the SSH
kinds (docs/safety.md); this module only says what vCenter's answer means:

- A VM runs on a connected host when vCenter shows it there poweredOn or suspended (a suspended
  VM resumes with its memory: it is not off, and PowerOffVM_Task powers it off).
- A host vCenter shows disconnected or not responding answers nothing: its `latest` is its
  listing from when it was last connected (below), never a fresh listing, so a VM it ran then
  fails the fence.
- Every VM vCenter knows on a connected host is registered there (the evidence `already off`
  needs); a VM vCenter does not know fails, like a VM no configured host registers.
- Anything the read cannot vouch for (an unknown power state, a VM without a host or an
  instance UUID, a VM on a host outside the read) makes its views doubtful: the fence fails.
  A running VM the read cannot place (`unplaced`) makes every host's listing doubtful, whatever
  its name: it runs somewhere no listing shows (`host_listing`, for the views, the daemon's
  ApiHosts and the map alike).
- A host's latest listing is the one it had while vCenter last showed it connected: once it is
  disconnected, vCenter's belief of it changes (vSphere HA moves its VM objects away) while
  the VMs may still run there, isolated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vmfenced.daemon.verdict import HostView
from vmfenced.errors import ListingDoubt
from vmfenced.model import KillOutcome, RegisteredVM, RunningVM

RUNNING_STATES = frozenset({"poweredOn", "suspended"})
POWER_STATES = RUNNING_STATES | {"poweredOff"}


@dataclass(frozen=True, slots=True)
class VMRecord:
    """One VM as vCenter reports it. `host` is its HostSystem's moref (None: vCenter has none)."""

    moref: str
    name: str
    instance_uuid: str | None
    power_state: str
    host: str | None
    config_file: str = ""


@dataclass(frozen=True, slots=True)
class HostRecord:
    moref: str
    name: str
    connection_state: str  # connected, disconnected, notResponding


@dataclass(frozen=True, slots=True)
class Inventory:
    """One complete read (or the live map's current state) of a vSphere entry's inventory."""

    vms: Mapping[str, VMRecord]
    hosts: Mapping[str, HostRecord]

    def named(self, name: str) -> list[VMRecord]:
        return sorted((v for v in self.vms.values() if v.name == name), key=lambda v: v.moref)

    def by_uuid(self, instance_uuid: str) -> list[VMRecord]:
        return [v for v in self.vms.values() if v.instance_uuid == instance_uuid]


def view_name(entry: str, host: HostRecord) -> str:
    """How the verdict and its messages name a host of a vSphere entry: "vc1/esx-03"."""
    return f"{entry}/{host.name}"


def running(vm: VMRecord) -> RunningVM:
    # cartel 0: vSphere has no process to name; the instance UUID identifies this VM.
    return RunningVM(
        name=vm.name, config_file=vm.config_file or vm.moref, cartel=0, uuid=vm.instance_uuid
    )


def registered(vm: VMRecord) -> RegisteredVM:
    return RegisteredVM(vmid=vm.moref, name=vm.name, config_file=vm.config_file)


def unplaced(inventory: Inventory) -> str | None:
    """Why the read cannot place every VM that may run on exactly one host of the read (None:
    it can). Whatever the VM's name: a VM that runs where no host's listing shows it makes
    every listing of the entry incomplete."""
    for vm in sorted(inventory.vms.values(), key=lambda v: v.moref):
        if vm.power_state not in POWER_STATES:
            return f"{vm.moref} has power state {vm.power_state!r}, which says neither on nor off"
        if vm.power_state not in RUNNING_STATES:
            continue
        if vm.host is None:
            return f"{vm.moref} ({vm.name!r}) runs, with no host in vCenter's inventory"
        if vm.host not in inventory.hosts:
            return f"{vm.moref} ({vm.name!r}) runs on {vm.host}, a host outside the inventory read"
        if not vm.instance_uuid:
            return f"{vm.moref} ({vm.name!r}) runs with no instance UUID: it cannot be told apart"
        if len(inventory.by_uuid(vm.instance_uuid)) > 1:
            return f"instance UUID {vm.instance_uuid} is shared by more than one VM"
    return None


def host_listing(entry: str, inventory: Inventory, moref: str) -> tuple[VMRecord, ...]:
    """Every VM the read places on host `moref` (any power state), or ListingDoubt while a VM
    that may run cannot be placed (`unplaced`). The host's connection state is the caller's."""
    doubt = unplaced(inventory)
    if doubt is not None:
        host = inventory.hosts.get(moref)
        label = moref if host is None else view_name(entry, host)
        raise ListingDoubt(label, "api", doubt)
    return tuple(
        sorted((v for v in inventory.vms.values() if v.host == moref), key=lambda v: v.moref)
    )


def views(
    entry: str,
    inventory: Inventory,
    name: str,
    connected_listings: Mapping[str, tuple[RunningVM, ...]] | None = None,
) -> list[HostView]:
    """One view per host of the inventory, from a read taken for this request.

    A host vCenter does not show connected answers nothing; its `latest` is its listing from
    when it last was connected (`connected_listings`, by host moref: every VM it ran), never
    vCenter's current belief of it (None: no such listing, the fence fails)."""
    mine = inventory.named(name)
    doubt = _doubt(inventory, mine) or unplaced(inventory)
    out = []
    for host in sorted(inventory.hosts.values(), key=lambda h: h.moref):
        label = view_name(entry, host)
        if doubt is not None:
            out.append(HostView(label, problem=doubt, doubt=True))
            continue
        here = [v for v in host_listing(entry, inventory, host.moref) if v.name == name]
        if host.connection_state != "connected":
            problem = f"vCenter shows the host {host.connection_state}"
            before = None if connected_listings is None else connected_listings.get(host.moref)
            # Its listing from when it was last connected: a belief, not an answer.
            latest = None if before is None else tuple(v for v in before if v.name == name)
            out.append(HostView(label, problem=problem, latest=latest, reg_problem=problem))
        else:
            out.append(
                HostView(
                    label,
                    fresh=tuple(running(v) for v in here if v.power_state in RUNNING_STATES),
                    registered=tuple(registered(v) for v in here),
                )
            )
    return out


def _doubt(inventory: Inventory, mine: list[VMRecord]) -> str | None:
    for vm in mine:
        if vm.power_state not in POWER_STATES:
            return f"{vm.moref} has power state {vm.power_state!r}, which says neither on nor off"
        if vm.host is None:
            return f"{vm.moref} ({vm.name!r}) has no host in vCenter's inventory"
        if vm.host not in inventory.hosts:
            return f"{vm.moref} ({vm.name!r}) is on {vm.host}, a host outside the inventory read"
        if not vm.instance_uuid:
            return f"{vm.moref} ({vm.name!r}) has no instance UUID: it cannot be told apart"
        if len(inventory.by_uuid(vm.instance_uuid)) > 1:
            return f"instance UUID {vm.instance_uuid} is shared by more than one VM"
    return None


def find(inventory: Inventory, vm: RunningVM) -> VMRecord | None:
    """The VM a verdict's target names, by instance UUID and name (None: not exactly one)."""
    if vm.uuid is None:
        return None
    found = [v for v in inventory.by_uuid(vm.uuid) if v.name == vm.name]
    return found[0] if len(found) == 1 else None


def kill_outcome(power_state: str | None) -> KillOutcome | None:
    """What a fresh read of powerState after PowerOffVM_Task says of the power-off. None: the
    read cannot vouch for anything (no answer, or a state outside the API's three)."""
    if power_state == "poweredOff":
        return KillOutcome.KILLED
    if power_state in RUNNING_STATES:
        return KillOutcome.ALIVE
    return None
