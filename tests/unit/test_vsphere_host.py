"""ApiHost and HybridHost on fakes: which answer a vCenter read gives as a listing, which way
a kill goes, and when the API is the fallback. No I/O: the session and the SSH host are fakes."""

from __future__ import annotations

import asyncio
import http.client
from typing import Any, cast

import pytest

from vmfenced.config import parse
from vmfenced.daemon.fence import Fencer
from vmfenced.daemon.host import Host
from vmfenced.daemon.vsphere import VSphereSession
from vmfenced.daemon.vsphere_host import ApiHost, HybridHost, PendingHost, VSphereEntry, wire
from vmfenced.daemon.vsphere_views import HostRecord, Inventory, VMRecord, running
from vmfenced.errors import FenceFailed, LinkDown, LinkError, ListingDoubt
from vmfenced.model import KillOutcome, LinkState, RegisteredVM, RunningVM, VMMap

H1 = HostRecord("host-1", "esx-01", "connected")
H2 = HostRecord("host-2", "esx-02", "connected")


def vm(moref: str, state: str = "poweredOn", host: str = "host-1", name: str = "node1") -> VMRecord:
    return VMRecord(moref, name, f"uuid-{moref}", state, host, f"[ds] {name}.vmx")


CONFIG = parse(
    {
        "hosts": [
            {
                "name": "vc1",
                "address": "vc.example.net",
                "kind": "vsphere",
                "username": "fence@vsphere.local",
                "password_file": "/etc/vmfenced/vc1.password",
            }
        ]
    }
)


class FakeSession:
    """What ApiHost uses of a VSphereSession: reads, power calls, state and the map."""

    def __init__(self, *vms: VMRecord, hosts: tuple[HostRecord, ...] = (H1, H2)) -> None:
        self.name = "vc1"
        self.config = CONFIG.hosts[0]
        self.state = LinkState.UP
        self.reason: str | None = None
        self.since = 0.0
        self.warnings: list[str] = []
        self.call_timeout = 5.0
        self.reads = 0
        self.closed = False
        self.powered_off: list[str] = []
        self.powered_on: list[str] = []
        self.inventory: Inventory | None = None
        self.set(*vms, hosts=hosts)

    def set(self, *vms: VMRecord, hosts: tuple[HostRecord, ...] = (H1, H2)) -> None:
        self.inventory = Inventory({v.moref: v for v in vms}, {h.moref: h for h in hosts})

    async def wait_mapped(self, timeout: float) -> bool:
        return self.inventory is not None

    async def close(self) -> None:
        self.closed = True

    async def power_on(self, moref: str, instance_uuid: str) -> str | None:
        self.powered_on.append(moref)
        return "poweredOn"

    async def read(self) -> Inventory:
        self.reads += 1
        if self.inventory is None:
            raise LinkDown("vc1", "api", "not logged in")
        return self.inventory

    async def power_off(self, moref: str, instance_uuid: str) -> str | None:
        self.powered_off.append(moref)
        assert self.inventory is not None
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


def test_feed_skips_mapped_hosts() -> None:
    session = FakeSession(vm("vm-1"), vm("vm-2", host="host-2", name="node2"))
    vmmap = VMMap()
    entry = VSphereEntry(cast(VSphereSession, session))
    assert session.inventory is not None
    entry.feed(vmmap, session.inventory, 1.0)
    assert [loc.host for loc in vmmap.where_running("node2")] == ["vc1/esx-02"]
    skipped = VMMap()
    entry.feed(skipped, session.inventory, 1.0, skip={"esx-01"})
    assert skipped.where_running("node1") == []


@pytest.mark.parametrize("state", ["disconnected", "notResponding"])
def test_a_lost_host_keeps_its_listing_from_when_it_was_connected(state: str) -> None:
    """vSphere HA moves the VM objects of an isolated host to another host in vCenter's
    inventory while the VMs may still run on the isolated one: its latest listing must stay
    the one it had while connected, not vCenter's new belief."""
    session = FakeSession(vm("vm-2", host="host-2", name="node2"))
    vmmap = VMMap()
    entry = VSphereEntry(cast(VSphereSession, session))
    assert session.inventory is not None
    entry.feed(vmmap, session.inventory, 1.0)
    lost = HostRecord("host-2", "esx-02", state)
    # HA restarted node2's VM object on esx-01 (registered, not running yet): vCenter no longer
    # shows it on esx-02.
    session.set(vm("vm-2", "poweredOff", host="host-1", name="node2"), hosts=(H1, lost))
    assert session.inventory is not None
    entry.feed(vmmap, session.inventory, 2.0)
    assert [loc.host for loc in vmmap.where_running("node2")] == ["vc1/esx-02"]
    # A fence cannot answer killed elsewhere, nor already off: esx-02's latest shows it.
    hosts = wire(entry, {})
    fencer = Fencer(cast(dict[str, Host], hosts), vmmap, {}, 5, lambda _: None)
    with pytest.raises(FenceFailed, match=f"vc1/esx-02.*vCenter shows the host {state}"):
        run(fencer.fence("node2", "off"))
    assert session.powered_off == []


def test_a_host_first_seen_lost_has_no_latest_listing() -> None:
    lost = HostRecord("host-2", "esx-02", "disconnected")
    session = FakeSession(vm("vm-2", host="host-2", name="node2"), hosts=(H1, lost))
    vmmap = VMMap()
    assert session.inventory is not None
    VSphereEntry(cast(VSphereSession, session)).feed(vmmap, session.inventory, 1.0)
    assert "vc1/esx-02" not in vmmap.hosts


def test_entry_without_a_map_is_one_pending_host_that_fails_every_fence() -> None:
    """No map yet (vCenter down, wrong password): the entry's hosts are unknown. A fence must
    fail "cannot confirm", never answer unknown_vm (fence_vmfenced's missing_as_off reads
    that as OFF)."""
    session = FakeSession()
    session.inventory = None
    session.state, session.reason = LinkState.DOWN, "login failed: InvalidLogin"
    entry = VSphereEntry(cast(VSphereSession, session))
    hosts = wire(entry, {})
    assert list(hosts) == ["vc1"] and isinstance(hosts["vc1"], PendingHost)
    assert hosts["vc1"].state is LinkState.DOWN
    with pytest.raises(LinkDown, match="no map of vCenter's hosts yet"):
        run(hosts["vc1"].list_running(None, 1))
    fencer = Fencer(cast(dict[str, Host], hosts), VMMap(), {}, 5, lambda _: None)
    with pytest.raises(FenceFailed, match="cannot rule out an instance on vc1"):
        run(fencer.fence("node1", "off"))
    with pytest.raises(FenceFailed):
        run(fencer.vm_status("node1"))
    assert hosts["vc1"].snapshot(None, 0)["state"] == "down"


def test_a_running_vm_without_a_host_makes_every_listing_doubtful() -> None:
    """The reviewer's case: a poweredOff twin registered on esx-01 and a running VM of the name
    that vCenter places on no host. The daemon path said already_off; it must fail."""
    twin = vm("vm-1", "poweredOff")
    lost = VMRecord("vm-2", "node1", "uuid-vm-2", "poweredOn", None, "[ds] node1.vmx")
    session = FakeSession(twin, lost)
    entry = VSphereEntry(cast(VSphereSession, session))
    hosts = wire(entry, {})
    for host in hosts.values():
        with pytest.raises(ListingDoubt, match="no host"):
            run(host.list_running(None, 1))
        with pytest.raises(ListingDoubt):
            run(host.list_registered(1))
    vmmap = VMMap()
    assert session.inventory is not None
    entry.feed(vmmap, session.inventory, 1.0)
    assert vmmap.hosts == {}
    fencer = Fencer(cast(dict[str, Host], hosts), vmmap, {}, 5, lambda _: None)
    with pytest.raises(FenceFailed, match="cannot be read"):
        run(fencer.fence("node1", "off"))
    # Another VM's name: the unplaced VM may be it under any name.
    with pytest.raises(FenceFailed):
        run(fencer.fence("node2", "off"))


@pytest.mark.parametrize(
    ("name", "config_file"), [("other", "[ds] node1.vmx"), ("node1", "[ds] other/node1.vmx")]
)
def test_power_on_refuses_a_moref_that_names_another_vm_now(name: str, config_file: str) -> None:
    now = VMRecord("vm-1", name, "uuid-vm-1", "poweredOff", "host-1", config_file)
    session = FakeSession(now)
    chosen = RegisteredVM(vmid="vm-1", name="node1", config_file="[ds] node1.vmx")
    with pytest.raises(LinkError, match="not the registration chosen"):
        run(api_host(session).power_on(chosen))
    assert session.powered_on == []
    session.set(vm("vm-1", "poweredOff"))
    run(api_host(session).power_on(chosen))
    assert session.powered_on == ["vm-1"]


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


def test_a_call_that_fails_outside_the_api_faults_is_a_link_error() -> None:
    """pyvmomi lets http.client's exceptions through (a truncated answer): a clean failure of
    the call, never an exception that ends the request."""

    def broken(_si: object) -> None:
        raise http.client.BadStatusLine("")

    def unreadable(_si: object) -> None:
        raise ValueError("malformed answer")

    async def scenario() -> list[str]:
        session = VSphereSession(CONFIG.hosts[0], "pass")
        session._si = object()
        session._up.set()
        reasons = []
        try:
            for function in (broken, unreadable):
                with pytest.raises(LinkError) as caught:
                    await session.call("inventory read", function)
                reasons.append(caught.value.reason)
        finally:
            await session.close()
        return reasons

    reasons = run(scenario())
    assert reasons[0].startswith("inventory read: BadStatusLine")
    assert reasons[1] == "inventory read: ValueError: malformed answer"
