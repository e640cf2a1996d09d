"""The daemon's own Fencer over vCenter's hosts (ApiHost): the plug-in design of
docs/vsphere.md, end to end against vcsim, with the verdict module deciding."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio

from tests.integration.test_vsphere import host_config, stopped, until
from tests.integration.vcsim_fixtures import Actor, actor, vcsim, vcsim_build
from vmfenced.config import parse
from vmfenced.daemon.fence import Fencer
from vmfenced.daemon.host import Host
from vmfenced.daemon.hostset import HostSet
from vmfenced.daemon.vsphere import VSphereSession
from vmfenced.daemon.vsphere_host import VSphereEntry
from vmfenced.errors import FenceFailed, UnknownVM
from vmfenced.model import VMMap
from vmflab.vcsim import USERNAME, Vcsim

pytestmark = pytest.mark.integration
__all__ = ["actor", "vcsim", "vcsim_build"]


class Wired:
    """What the host set will do: the entry's hosts in the fencer's dict, the map fed from
    the session's updates."""

    def __init__(self, session: VSphereSession) -> None:
        self.session = session
        self.entry = VSphereEntry(session)
        self.vmmap = VMMap()
        self.hosts: dict[str, Any] = {}
        self.fencer = Fencer(cast(dict[str, Host], self.hosts), self.vmmap, {}, 10, lambda _: None)
        self.updates = 0
        # While frozen, updates do not reach the map (a map that has not seen a move yet).
        self.frozen = False

    def changed(self, session: VSphereSession) -> None:
        inventory = session.inventory
        if inventory is None or self.frozen:
            return
        if set(self.hosts) != set(self.entry.hosts()):
            # One synchronous step: no coroutine sees half the host set.
            self.hosts.clear()
            self.hosts.update(self.entry.hosts())
        self.entry.feed(self.vmmap, inventory, time.time())
        self.updates += 1


@pytest_asyncio.fixture
async def wired(vcsim: Vcsim, tmp_path: Path) -> AsyncIterator[Wired]:
    holder: list[Wired] = []
    session = VSphereSession(
        host_config(vcsim.port, tmp_path),
        "pass",
        call_timeout=5,
        on_change=lambda s: holder[0].changed(s) if holder else None,
    )
    holder.append(Wired(session))
    task = asyncio.create_task(session.supervise())
    try:
        await until(lambda: len(holder[0].hosts) == 4)
        yield holder[0]
    finally:
        await stopped(session, task)


@pytest.mark.asyncio
async def test_fencer_off_status_on_reboot(wired: Wired, actor: Actor) -> None:
    vm = "DC0_C0_RP0_VM0"
    status = await wired.fencer.vm_status(vm)
    assert status.state == "on" and status.host is not None and status.host.startswith("vc1/")
    result, _ = await wired.fencer.fence(vm, "off")
    assert (result.outcome, result.host) == ("killed", status.host)
    assert actor.vm(vm).runtime.powerState == "poweredOff"
    assert (await wired.fencer.vm_status(vm)).state == "off"
    again, _ = await wired.fencer.fence(vm, "off")
    assert again.outcome == "already_off"
    on, _ = await wired.fencer.fence(vm, "on")
    assert on.outcome == "powered_on"
    reboot, _ = await wired.fencer.fence(vm, "reboot")
    assert reboot.outcome == "rebooted"
    assert actor.vm(vm).runtime.powerState == "poweredOn"


@pytest.mark.asyncio
async def test_fencer_unknown_vm(wired: Wired) -> None:
    with pytest.raises(UnknownVM):
        await wired.fencer.fence("no-such-vm", "off")


@pytest.mark.asyncio
async def test_fencer_twins_fail(wired: Wired, actor: Actor) -> None:
    vm = "DC0_H0_VM2"
    actor.twin(vm)
    await until(lambda: len(wired.vmmap.where_running(vm)) == 2)
    with pytest.raises(FenceFailed, match="ambiguous"):
        await wired.fencer.fence(vm, "off")


@pytest.mark.asyncio
async def test_fencer_follows_a_relocation(wired: Wired, actor: Actor) -> None:
    vm = "DC0_C0_RP0_VM1"
    before = wired.vmmap.where_running(vm)[0].host
    other = next(h for h in ("DC0_C0_H0", "DC0_C0_H1", "DC0_C0_H2") if f"vc1/{h}" != before)
    actor.relocate(vm, other)
    await until(lambda: [loc.host for loc in wired.vmmap.where_running(vm)] == [f"vc1/{other}"])
    result, _ = await wired.fencer.fence(vm, "off")
    assert (result.outcome, result.host) == ("killed", f"vc1/{other}")
    actor.power(vm, on=True)


@pytest.mark.asyncio
async def test_fencer_when_the_map_is_stale(wired: Wired, actor: Actor) -> None:
    """A move the map has not seen yet: the power-off finds the VM elsewhere and searches
    again; the fence still ends on the right host."""
    vm = "DC0_C0_RP0_VM2"
    before = wired.vmmap.where_running(vm)[0].host
    other = next(h for h in ("DC0_C0_H0", "DC0_C0_H1", "DC0_C0_H2") if f"vc1/{h}" != before)
    wired.frozen = True
    try:
        actor.relocate(vm, other)
        # The session has seen the move; the map has not: it is stale for sure.
        await until(lambda: session_places(wired.session, vm) == other)
        assert [loc.host for loc in wired.vmmap.where_running(vm)] == [before]
        result, _ = await wired.fencer.fence(vm, "off")
    finally:
        wired.frozen = False
    assert (result.outcome, result.host) == ("killed", f"vc1/{other}")
    actor.power(vm, on=True)


def session_places(session: VSphereSession, vm: str) -> str | None:
    inventory = session.inventory
    found = [] if inventory is None else inventory.named(vm)
    host = found[0].host if len(found) == 1 else None
    if inventory is None or host is None or host not in inventory.hosts:
        return None
    return inventory.hosts[host].name


@pytest.mark.asyncio
async def test_an_entry_without_a_map_fails_fences_never_unknown(
    vcsim: Vcsim, tmp_path: Path
) -> None:
    """A wrong password: the entry never maps its hosts. A fence of one of its VMs must fail
    ("cannot confirm"), not answer unknown_vm, which fence_vmfenced's missing_as_off reads
    as OFF while the VM runs."""
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    config = parse(
        {
            "hosts": [
                {
                    "name": "vc1",
                    "kind": "vsphere",
                    "address": "127.0.0.1",
                    "port": vcsim.port,
                    "username": USERNAME,
                    "password_file": str(wrong),
                    "tls_verify": False,
                }
            ],
            "daemon": {"fence_timeout": 2},
        }
    )
    vmmap = VMMap()

    def spawn(coro: Any, name: str) -> asyncio.Task[None]:
        return asyncio.create_task(coro, name=name)

    hosts = HostSet(vmmap, {}, spawn, lambda _h, _l: None, 1.0)
    hosts.start_vsphere(config)
    try:
        session = hosts._entries["vc1"].session
        await until(lambda: session.reason is not None and "InvalidLogin" in session.reason)
        assert list(hosts.hosts) == ["vc1"]
        fencer = Fencer(hosts.hosts, vmmap, {}, 2, lambda _: None)
        with pytest.raises(FenceFailed, match="cannot rule out an instance on vc1"):
            await fencer.fence("DC0_C0_RP0_VM0", "off")
        with pytest.raises(FenceFailed):
            await fencer.vm_status("DC0_C0_RP0_VM0")
    finally:
        await hosts.close()
