"""What the fencer asks of each host, counted on stand-in hosts: when the map is right, `off` is
one round trip to every host (the kill with the listing after it on the VM's host, a listing on
each other host, all at once) and never waits for a registration listing."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from vmfenced.config import HostConfig
from vmfenced.daemon.fence import Fencer
from vmfenced.daemon.host import Host
from vmfenced.errors import FenceFailed
from vmfenced.model import KillOutcome, RegisteredVM, RunningVM, VMMap

HOSTS = ("esx1", "esx2", "esx3")


def running(name: str, cartel: int) -> RunningVM:
    return RunningVM(name, f"/vmfs/volumes/ds1/{name}/{name}.vmx", cartel)


class StandInHost:
    """The part of Host the fencer uses; every call is written to the shared `calls`."""

    def __init__(self, name: str, vms: list[RunningVM], calls: list[tuple[str, str]]) -> None:
        self.name = name
        self.vms = vms
        self.calls = calls
        self.listing_problem: str | None = None
        self.fence = object()
        # The evidence reads which Proxmox node a host is (None: another kind).
        self.config = HostConfig(name=name, address=name)

    async def list_running(self, _lane: object, _timeout: float) -> tuple[RunningVM, ...]:
        self.calls.append(("list", self.name))
        await asyncio.sleep(0)
        return tuple(self.vms)

    async def kill_and_list(
        self, vm: RunningVM, _timeout: float
    ) -> tuple[KillOutcome, tuple[RunningVM, ...]]:
        self.calls.append(("kill+list", self.name))
        await asyncio.sleep(0)
        self.vms.remove(vm)
        return KillOutcome.KILLED, tuple(self.vms)

    async def list_registered(
        self, _timeout: float, *, urgent: bool = False
    ) -> tuple[RegisteredVM, ...]:
        self.calls.append(("registrations", self.name))
        await asyncio.sleep(0)
        return tuple(RegisteredVM(str(vm.cartel), vm.name, vm.config_file) for vm in self.vms)


def lab(vms: dict[str, list[RunningVM]]) -> tuple[Fencer, list[tuple[str, str]]]:
    calls: list[tuple[str, str]] = []
    vmmap = VMMap()
    hosts = {}
    for name in HOSTS:
        mine = list(vms.get(name, []))
        vmmap.update_running(name, tuple(mine), 0.0)
        hosts[name] = cast(Host, StandInHost(name, mine, calls))
    return Fencer(hosts, vmmap, {"node9": "gone-vm"}, 5.0, lambda _host: None), calls


@pytest.mark.asyncio
async def test_off_with_the_map_right_is_one_round_trip_to_each_host() -> None:
    fencer, calls = lab({"esx1": [running("node1", 101)], "esx2": [running("node2", 201)]})
    result, joined = await fencer.fence("node1", "off")
    assert (result.outcome, result.host, result.cartel, joined) == ("killed", "esx1", 101, False)
    assert sorted(calls) == [("kill+list", "esx1"), ("list", "esx2"), ("list", "esx3")]


@pytest.mark.asyncio
async def test_status_of_a_running_vm_asks_only_its_host() -> None:
    # ON needs one fresh sighting; a copy elsewhere would not make it less ON.
    fencer, calls = lab({"esx2": [running("node2", 201)]})
    state = await fencer.vm_status("node2")
    assert (state.state, state.host, state.cartel) == ("on", "esx2", 201)
    assert calls == [("list", "esx2")]


@pytest.mark.asyncio
async def test_off_of_a_vm_running_nowhere_asks_every_host_for_both_listings() -> None:
    fencer, calls = lab({"esx1": [running("node1", 101)]})
    # An alias names the VM, so it exists somewhere; no configured host runs or registers it.
    with pytest.raises(FenceFailed, match="missing from the config"):
        await fencer.fence("node9", "off")
    assert sorted(set(calls)) == sorted(
        {("list", h) for h in HOSTS} | {("registrations", h) for h in HOSTS}
    )
