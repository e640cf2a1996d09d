"""The host set's part for vsphere entries, on fake sessions: which hosts an entry puts into
the fencer's dict before and after its first map, and across a reload."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from tests.unit.test_vsphere_host import CONFIG, H1, H2, FakeSession, vm
from vmfenced.daemon.hostset import HostSet
from vmfenced.daemon.reload_plan import ReloadPlan
from vmfenced.daemon.vsphere import VSphereSession
from vmfenced.daemon.vsphere_host import ApiHost, PendingHost, VSphereEntry
from vmfenced.daemon.vsphere_views import HostRecord
from vmfenced.model import VMMap


def host_set() -> HostSet:
    def spawn(coro: Any, name: str) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(coro, name=name)

    return HostSet(VMMap(), {}, spawn, lambda _h, _l: None, 1.0)


def install(hosts: HostSet, session: FakeSession) -> VSphereEntry:
    """What start_vsphere does, with a fake session."""
    entry = VSphereEntry(cast(VSphereSession, session))
    hosts._entries[entry.name] = entry
    hosts._vsphere_changed(cast(VSphereSession, session))
    return entry


def replace_session(hosts: HostSet, session: FakeSession) -> None:
    """The reload's new session for the entry is this fake."""

    def make(_config: object, _name: str) -> VSphereEntry:
        return VSphereEntry(cast(VSphereSession, session))

    vars(hosts)["_session"] = make


def unmapped() -> FakeSession:
    session = FakeSession()
    session.inventory = None
    return session


def test_an_entry_without_a_map_is_its_pending_host_until_the_first_map() -> None:
    hosts = host_set()
    session = unmapped()
    install(hosts, session)
    live: dict[str, object] = dict(hosts.hosts)
    assert list(live) == ["vc1"] and isinstance(live["vc1"], PendingHost)
    session.set(vm("vm-1"))
    hosts._vsphere_changed(cast(VSphereSession, session))
    assert set(hosts.hosts) == {"vc1/esx-01", "vc1/esx-02"}


def test_a_host_added_again_under_its_name_is_a_new_host() -> None:
    hosts = host_set()
    session = FakeSession(vm("vm-1"))
    install(hosts, session)
    before = hosts.hosts["vc1/esx-01"]
    assert cast(ApiHost, before).moref == "host-1"
    # Removed and added again within one update: another moref under the same name.
    again = HostRecord("host-9", "esx-01", "connected")
    session.set(vm("vm-1", host="host-9"), hosts=(again, H2))
    hosts._vsphere_changed(cast(VSphereSession, session))
    after = cast(ApiHost, hosts.hosts["vc1/esx-01"])
    assert after is not cast(object, before) and after.moref == "host-9"
    assert [loc.host for loc in hosts._map.where_running("node1")] == ["vc1/esx-01"]


def test_a_replaced_entry_keeps_its_hosts_until_the_replacement_has_mapped() -> None:
    async def scenario() -> None:
        hosts = host_set()
        old = FakeSession(vm("vm-1"), hosts=(H1, H2))
        install(hosts, old)
        new = unmapped()
        replace_session(hosts, new)

        async def drained() -> None:
            return None

        plan = ReloadPlan(config=CONFIG, keys={}, replaced=("vc1",))
        assert await hosts.reload(plan, drained) == []
        assert set(hosts.hosts) == {"vc1/esx-01", "vc1/esx-02"}
        assert cast(ApiHost, hosts.hosts["vc1/esx-01"]).entry.session is cast(Any, old)
        assert not old.closed
        # The replacement's login fails meanwhile: nothing changes.
        hosts._vsphere_changed(cast(VSphereSession, new))
        assert cast(ApiHost, hosts.hosts["vc1/esx-01"]).entry.session is cast(Any, old)
        new.set(vm("vm-1", host="host-2"), hosts=(H2,))
        hosts._vsphere_changed(cast(VSphereSession, new))
        assert set(hosts.hosts) == {"vc1/esx-02"}
        assert cast(ApiHost, hosts.hosts["vc1/esx-02"]).entry.session is cast(Any, new)
        await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not asyncio.current_task()))
        assert old.closed

    asyncio.run(scenario())


def test_a_replacement_that_has_mapped_takes_over_in_the_reload() -> None:
    async def scenario() -> None:
        hosts = host_set()
        old = FakeSession(vm("vm-1"))
        install(hosts, old)
        new = FakeSession(vm("vm-1"), hosts=(H1,))
        replace_session(hosts, new)

        async def drained() -> None:
            return None

        plan = ReloadPlan(config=CONFIG, keys={}, replaced=("vc1",))
        await hosts.reload(plan, drained)
        assert set(hosts.hosts) == {"vc1/esx-01"}
        assert cast(ApiHost, hosts.hosts["vc1/esx-01"]).entry.session is cast(Any, new)

    asyncio.run(scenario())
