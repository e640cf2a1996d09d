"""ApiHost and HybridHost on fakes: which answer a vCenter read gives as a listing, which way
a kill goes, and when the API is the fallback. No I/O: the session and the SSH host are fakes."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from vmfenced.daemon.host import Host
from vmfenced.daemon.vsphere import VSphereSession
from vmfenced.daemon.vsphere_host import ApiHost, HybridHost, VSphereEntry, wire
from vmfenced.daemon.vsphere_views import HostRecord, Inventory, VMRecord, running
from vmfenced.errors import LinkDown, LinkError, ListingDoubt
from vmfenced.model import KillOutcome, LinkState, RunningVM, VMMap

H1 = HostRecord("host-1", "esx-01", "connected")
H2 = HostRecord("host-2", "esx-02", "connected")


def vm(moref: str, state: str = "poweredOn", host: str = "host-1", name: str = "node1") -> VMRecord:
    return VMRecord(moref, name, f"uuid-{moref}", state, host, f"[ds] {name}.vmx")


class FakeSession:
    """What ApiHost uses of a VSphereSession: reads, power calls, state and the map."""

    def __init__(self, *vms: VMRecord, hosts: tuple[HostRecord, ...] = (H1, H2)) -> None:
        self.name = "vc1"
        self.state = LinkState.UP
        self.call_timeout = 5.0
        self.reads = 0
        self.powered_off: list[str] = []
        self.set(*vms, hosts=hosts)

    def set(self, *vms: VMRecord, hosts: tuple[HostRecord, ...] = (H1, H2)) -> None:
        self.inventory = Inventory({v.moref: v for v in vms}, {h.moref: h for h in hosts})

    async def read(self) -> Inventory:
        self.reads += 1
        return self.inventory

    async def power_off(self, moref: str, instance_uuid: str) -> str | None:
        self.powered_off.append(moref)
        record = self.inventory.vms[moref]
        assert record.instance_uuid == instance_uuid
        self.set(
            *(
                v
                if v.moref != moref
                else VMRecord(v.moref, v.name, v.instance_uuid, "poweredOff", v.host, v.config_file)
                for v in self.inventory.vms.values()
            ),
            hosts=tuple(self.inventory.hosts.values()),
        )
        return "poweredOff"


class FakeLane:
    def __init__(self) -> None:
        self.state = LinkState.UP


class FakeSSH:
    """What HybridHost uses of an SSH Host."""

    def __init__(self, listing: tuple[RunningVM, ...], *, kill_fails: bool = False) -> None:
        self.name = "esx1"
        self.fence = FakeLane()
        self.inventory = FakeLane()
        self.config = None
        self.listing_problem = None
        self.listing = listing
        self.kill_fails = kill_fails
        self.killed: list[int] = []

    async def list_running(self, lane: Any, timeout: float) -> tuple[RunningVM, ...]:
        return self.listing

    async def kill_and_list(
        self, target: RunningVM, timeout: float
    ) -> tuple[KillOutcome, tuple[RunningVM, ...] | None]:
        if self.kill_fails:
            raise LinkError("esx1", "fence", "connection lost")
        self.killed.append(target.cartel)
        return KillOutcome.KILLED, ()


def api_host(session: FakeSession, record: HostRecord = H1) -> ApiHost:
    return ApiHost(VSphereEntry(cast(VSphereSession, session)), record)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_listing_of_a_connected_host() -> None:
    session = FakeSession(vm("vm-1"), vm("vm-2", "poweredOff"), vm("vm-3", host="host-2"))
    listing = run(api_host(session).list_running(None, 1))
    assert [v.config_file for v in listing] == ["[ds] node1.vmx"]
    registered = run(api_host(session).list_registered(1))
    assert {r.vmid for r in registered} == {"vm-1", "vm-2"}


@pytest.mark.parametrize("state", ["disconnected", "notResponding"])
def test_a_host_vcenter_cannot_reach_answers_nothing(state: str) -> None:
    lost = HostRecord("host-1", "esx-01", state)
    session = FakeSession(vm("vm-1"), hosts=(lost, H2))
    host = api_host(session, lost)
    with pytest.raises(LinkDown, match=f"vCenter shows the host {state}"):
        run(host.list_running(None, 1))
    assert host.state is LinkState.DOWN


def test_an_unreadable_power_state_is_a_doubt() -> None:
    session = FakeSession(vm("vm-1", "weird"))
    host = api_host(session)
    with pytest.raises(ListingDoubt):
        run(host.list_running(None, 1))
    assert host.listing_problem is not None


def test_kill_powers_off_by_instance_uuid_then_lists() -> None:
    session = FakeSession(vm("vm-1"))
    outcome, after = run(api_host(session).kill_and_list(running(vm("vm-1")), 1))
    assert (outcome, after, session.powered_off) == (KillOutcome.KILLED, (), ["vm-1"])


def test_kill_of_a_vm_that_moved_powers_nothing_off() -> None:
    session = FakeSession(vm("vm-1", host="host-2"))
    outcome, after = run(api_host(session).kill_and_list(running(vm("vm-1")), 1))
    assert (outcome, after, session.powered_off) == (KillOutcome.NOT_RUNNING, None, [])


def test_feed_skips_mapped_hosts_and_keeps_disconnected_beliefs() -> None:
    lost = HostRecord("host-2", "esx-02", "disconnected")
    session = FakeSession(vm("vm-1"), vm("vm-2", host="host-2", name="node2"), hosts=(H1, lost))
    vmmap = VMMap()
    entry = VSphereEntry(cast(VSphereSession, session))
    entry.feed(vmmap, session.inventory, 1.0)
    assert [loc.host for loc in vmmap.where_running("node2")] == ["vc1/esx-02"]
    skipped = VMMap()
    entry.feed(skipped, session.inventory, 1.0, skip={"esx-01"})
    assert skipped.where_running("node1") == []


def test_wire_replaces_a_mapped_host_by_its_ssh_entry() -> None:
    session = FakeSession(vm("vm-1"))
    ssh = FakeSSH(())
    hosts = wire(VSphereEntry(cast(VSphereSession, session)), {"esx-01": cast(Host, ssh)})
    assert set(hosts) == {"esx1", "vc1/esx-02"}
    assert isinstance(hosts["esx1"], HybridHost)


def hybrid(session: FakeSession, ssh: FakeSSH) -> HybridHost:
    return HybridHost(cast(Host, ssh), api_host(session))


SSH_VM = RunningVM("node1", "/vmfs/volumes/ds/node1/node1.vmx", cartel=4242)


def test_hybrid_kills_over_ssh_while_the_lane_is_up() -> None:
    session = FakeSession(vm("vm-1"))
    ssh = FakeSSH((SSH_VM,))
    host = hybrid(session, ssh)
    assert run(host.list_running(None, 1)) == (SSH_VM,)
    assert host.path() == "ssh:esx1"
    outcome, _ = run(host.kill_and_list(SSH_VM, 1))
    assert (outcome, ssh.killed, session.powered_off) == (KillOutcome.KILLED, [4242], [])


def test_hybrid_falls_back_to_the_api_when_the_lane_is_down() -> None:
    session = FakeSession(vm("vm-1"))
    ssh = FakeSSH((SSH_VM,))
    ssh.fence.state = LinkState.DOWN
    host = hybrid(session, ssh)
    assert host.path() == "api:vc1"
    listing = run(host.list_running(None, 1))
    assert [v.uuid for v in listing] == ["uuid-vm-1"]
    outcome, _ = run(host.kill_and_list(listing[0], 1))
    assert (outcome, ssh.killed, session.powered_off) == (KillOutcome.KILLED, [], ["vm-1"])


def test_hybrid_falls_back_when_the_lane_fails_under_the_kill() -> None:
    session = FakeSession(vm("vm-1"))
    ssh = FakeSSH((SSH_VM,), kill_fails=True)
    outcome, _ = run(hybrid(session, ssh).kill_and_list(SSH_VM, 1))
    assert (outcome, session.powered_off) == (KillOutcome.KILLED, ["vm-1"])


def test_hybrid_fallback_refuses_when_vcenter_shows_twins_here() -> None:
    session = FakeSession(vm("vm-1"), vm("vm-2"))
    ssh = FakeSSH((SSH_VM,), kill_fails=True)
    with pytest.raises(LinkError, match="does not show exactly one"):
        run(hybrid(session, ssh).kill_and_list(SSH_VM, 1))
    assert session.powered_off == []
