"""The hybrid path: an ESXi host with an SSH entry that vCenter also manages. vCenter is the
map, the kill goes over the host's warm SSH lane, PowerOffVM_Task when the lane is down.

The lab's ESXi host esx1 (real sshd, VM processes) plays vcsim's host DC0_C0_H0
(`vsphere_name`): the VM runs as a process on esx1, and vcsim places it on DC0_C0_H0."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import asyncssh
import pytest
import pytest_asyncio

from tests.integration.test_vsphere import host_config, until
from tests.integration.vcsim_fixtures import Actor, actor, vcsim, vcsim_build
from vmfenced.backends.registry import BACKENDS
from vmfenced.config import HostConfig, SSHConfig
from vmfenced.daemon.fence import Fencer
from vmfenced.daemon.host import Host
from vmfenced.daemon.vsphere import VSphereSession
from vmfenced.daemon.vsphere_host import HybridHost, VSphereEntry, wire
from vmfenced.model import LinkState, VMMap
from vmflab import Lab
from vmflab.procs import stopped as frozen
from vmflab.vcsim import Vcsim

pytestmark = pytest.mark.integration
__all__ = ["actor", "vcsim", "vcsim_build"]

VM = "DC0_C0_RP0_VM0"
MAPPED = "DC0_C0_H0"


def ssh_host(lab: Lab, name: str) -> Host:
    lab_host = lab.hosts[name]
    config = HostConfig(
        name=name, address=lab_host.address, port=lab_host.port, vsphere_name=MAPPED
    )
    settings = SSHConfig(
        username=lab.username,
        client_keys=(lab.client_key,),
        known_hosts=lab.known_hosts,
        connect_timeout=3,
        # Down within about 1.5 s of silence: the fallback test freezes the host.
        keepalive_interval=0.5,
        keepalive_count_max=2,
    )
    key = asyncssh.read_private_key(lab.client_key)
    return Host(config, settings, BACKENDS["esxi"], [key], lambda _h, _l: None)


class Hybrid:
    def __init__(self, session: VSphereSession, esx1: Host) -> None:
        self.entry = VSphereEntry(session)
        self.esx1 = esx1
        self.vmmap = VMMap()
        self.hosts: dict[str, Any] = {}
        self.fencer = Fencer(cast(dict[str, Host], self.hosts), self.vmmap, {}, 10, lambda _: None)

    def changed(self, session: VSphereSession) -> None:
        """What the host set will do on each update: the hosts in one synchronous step."""
        if session.inventory is None:
            return
        wanted = wire(self.entry, {MAPPED: self.esx1})
        if set(wanted) != set(self.hosts):
            self.hosts.clear()
            self.hosts.update(wanted)
        self.entry.feed(self.vmmap, session.inventory, time.time(), skip={MAPPED})


@pytest_asyncio.fixture
async def hybrid(esx_lab: Lab, vcsim: Vcsim, actor: Actor, tmp_path: Path) -> AsyncIterator[Hybrid]:
    actor.relocate(VM, MAPPED)
    esx1 = ssh_host(esx_lab, "esx1")
    tasks: list[asyncio.Task[None]] = []
    esx1.start(lambda coro, name: tasks.append(asyncio.create_task(coro, name=name)))
    holder: list[Hybrid] = []
    session = VSphereSession(
        host_config(vcsim.port, tmp_path),
        "pass",
        call_timeout=5,
        on_change=lambda s: holder[0].changed(s) if holder else None,
    )
    holder.append(Hybrid(session, esx1))
    tasks.append(asyncio.create_task(session.supervise()))
    try:
        await until(lambda: "esx1" in holder[0].hosts and esx1.fence.state is LinkState.UP)
        yield holder[0]
    finally:
        await session.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await esx1.close()


@pytest.mark.asyncio
async def test_the_kill_goes_over_ssh(hybrid: Hybrid, esx_lab: Lab, actor: Actor) -> None:
    esx1 = esx_lab.hosts["esx1"]
    cartel = await asyncio.to_thread(esx1.start_vm, VM)
    host = hybrid.hosts["esx1"]
    assert isinstance(host, HybridHost) and host.path() == "ssh:esx1"
    result, _ = await hybrid.fencer.fence(VM, "off")
    assert (result.outcome, result.host, result.cartel) == ("killed", "esx1", cartel)
    assert not esx1.pid_alive(cartel)
    # vcsim has no process to lose: its VM still shows on, so the power-off was not the API's.
    assert actor.vm(VM).runtime.powerState == "poweredOn"


@pytest.mark.asyncio
async def test_the_api_is_the_fallback_when_the_lane_is_down(
    hybrid: Hybrid, esx_lab: Lab, actor: Actor
) -> None:
    esx1 = esx_lab.hosts["esx1"]
    await asyncio.to_thread(esx1.start_vm, VM)
    if actor.vm(VM).runtime.powerState != "poweredOn":
        actor.power(VM, on=True)
    host = hybrid.hosts["esx1"]
    assert isinstance(host, HybridHost)
    with frozen(esx1):
        await until(lambda: hybrid.esx1.fence.state is not LinkState.UP)
        assert host.path() == "api:vc1"
        result, _ = await hybrid.fencer.fence(VM, "off")
        assert (result.outcome, result.host) == ("killed", "esx1")
        assert actor.vm(VM).runtime.powerState == "poweredOff"
    actor.power(VM, on=True)


@pytest.mark.asyncio
async def test_a_vm_on_an_unmapped_host_goes_through_the_api(hybrid: Hybrid, actor: Actor) -> None:
    vm = "DC0_C0_RP0_VM1"
    actor.relocate(vm, "DC0_C0_H1")
    result, _ = await hybrid.fencer.fence(vm, "off")
    assert (result.outcome, result.host) == ("killed", "vc1/DC0_C0_H1")
    assert actor.vm(vm).runtime.powerState == "poweredOff"
    actor.power(vm, on=True)
