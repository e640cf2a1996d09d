"""The fencer with Proxmox hosts (stand-ins for Host): a VM by name or VMID, the HA stack asked
to keep it stopped after `off` (never before the kill, never for a reboot's off), owner rules,
and vmfencectl's report of nodes missing from the config and of the HA answer."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Literal, cast

import pytest

from vmfenced.backends.registry import BACKENDS
from vmfenced.clients.ctl import render_fence, render_status
from vmfenced.config import HostConfig, SSHConfig
from vmfenced.daemon.api import Api
from vmfenced.daemon.fence import Fencer
from vmfenced.daemon.host import Host
from vmfenced.daemon.link import CommandResult
from vmfenced.errors import FenceFailed
from vmfenced.model import HostInventory, KillOutcome, LinkState, RegisteredVM, RunningVM, VMMap

NODES = ("pve1", "pve2", "pve3")


class PveHost:
    """The part of Host the fencer uses, on a shared cluster: `calls` records every step."""

    def __init__(self, name: str, cluster: Cluster) -> None:
        self.name = name
        self.cluster = cluster
        self.listing_problem: str | None = None
        self.config = HostConfig(name=name, address=name, kind="proxmox")
        self.backend = BACKENDS["proxmox"]
        self.fence = self  # the lane the fencer lists and kills on
        self.state = LinkState.UP

    def snapshot(self, _at: float | None, vm_count: int) -> dict[str, object]:
        return {"name": self.name, "vm_count": vm_count}

    @property
    def vms(self) -> list[RunningVM]:
        return self.cluster.running.setdefault(self.name, [])

    async def list_running(self, _lane: object, _timeout: float) -> tuple[RunningVM, ...]:
        self.cluster.calls.append(("list", self.name))
        await asyncio.sleep(0)
        return tuple(self.vms)

    async def kill_and_list(
        self, vm: RunningVM, _timeout: float
    ) -> tuple[KillOutcome, tuple[RunningVM, ...]]:
        self.cluster.calls.append(("kill+list", self.name))
        await asyncio.sleep(0)
        self.vms.remove(vm)
        return KillOutcome.KILLED, tuple(self.vms)

    async def list_registered(
        self, _timeout: float, *, urgent: bool = False
    ) -> tuple[RegisteredVM, ...]:
        self.cluster.calls.append(("registrations", self.name))
        await asyncio.sleep(0)
        return self.cluster.registered  # the whole cluster's, from any node

    async def hold_off(self, vmid: str, _timeout: float) -> str:
        assert vmid.isdigit()
        self.cluster.calls.append(("hold-off", self.name))
        await asyncio.sleep(0)
        return self.cluster.ha_answer

    async def power_on(self, reg: RegisteredVM) -> None:
        self.cluster.calls.append(("power-on " + reg.vmid, self.name))
        self.vms.append(RunningVM(reg.name, reg.config_file, 777, vmid=reg.vmid))


@dataclass
class Cluster:
    running: dict[str, list[RunningVM]]
    registered: tuple[RegisteredVM, ...]
    ha_answer: str = "vmf:ha stop-accepted\n"

    def __post_init__(self) -> None:
        self.calls: list[tuple[str, str]] = []


def web(owner: str = "pve1") -> RegisteredVM:
    return RegisteredVM("100", "web", f"/etc/pve/nodes/{owner}/qemu-server/100.conf", owner=owner)


def fencer(cluster: Cluster, nodes: tuple[str, ...] = NODES) -> Fencer:
    vmmap = VMMap()
    hosts = {}
    for name in nodes:
        vmmap.update_running(name, tuple(cluster.running.get(name, ())), time.time())
        hosts[name] = cast(Host, PveHost(name, cluster))
    return Fencer(hosts, vmmap, {"node1": "100"}, 5.0, lambda _host: None)


def running_web(pid: int = 4242) -> RunningVM:
    return RunningVM("web", "/etc/pve/nodes/pve1/qemu-server/100.conf", pid, vmid="100")


@pytest.mark.asyncio
@pytest.mark.parametrize("name", ["web", "100", "node1"])
async def test_off_kills_first_then_asks_ha_to_keep_it_stopped(name: str) -> None:
    cluster = Cluster({"pve1": [running_web()]}, (web(),))
    result, _ = await fencer(cluster).fence(name, "off")
    assert (result.outcome, result.host, result.cartel) == ("killed", "pve1", 4242)
    # The stop is only queued: the HA stack may start the VM once before the CRM's round.
    assert result.ha == "stop-accepted" and result.warning is not None
    assert "queued: the HA stack may start it once before its next round" in result.warning
    assert "keep Pacemaker's node VMs out of Proxmox HA" in result.warning
    # The kill never waits for the HA command: it comes last, on the VM's host.
    assert cluster.calls.index(("kill+list", "pve1")) < cluster.calls.index(("hold-off", "pve1"))
    assert cluster.calls[-1] == ("hold-off", "pve1")


@pytest.mark.asyncio
async def test_a_refused_ha_stop_is_a_warning_on_a_confirmed_off() -> None:
    answer = "vmf:ha stop-refused exit 255: cluster not ready - no quorum?\n"
    cluster = Cluster({"pve1": [running_web()]}, (web(),), ha_answer=answer)
    result, _ = await fencer(cluster).fence("web", "off")
    assert result.outcome == "killed" and result.ha == "stop-refused"
    assert result.warning is not None and "no quorum" in result.warning
    assert "ha-manager crm-command stop vm:100 0" in result.warning
    text = render_fence(
        {
            "vm": "web",
            "action": "off",
            "outcome": "killed",
            "host": "pve1",
            "cartel": 4242,
            "elapsed_ms": 3.2,
            "ha": result.ha,
            "warning": result.warning,
        }
    )
    assert "HA: stop-refused" in text and "warning: off confirmed" in text


@pytest.mark.asyncio
async def test_an_unreadable_ha_answer_is_unknown_never_a_failure() -> None:
    cluster = Cluster({"pve1": [running_web()]}, (web(),), ha_answer="Segmentation fault\n")
    result, _ = await fencer(cluster).fence("web", "off")
    assert result.outcome == "killed" and result.ha == "unknown" and result.warning


@pytest.mark.asyncio
async def test_already_off_asks_ha_on_the_owner() -> None:
    cluster = Cluster({}, (web("pve2"),), ha_answer="vmf:ha not-managed\n")
    result, _ = await fencer(cluster).fence("web", "off")
    assert result.outcome == "already_off" and result.ha == "not-managed"
    assert result.warning is None
    assert cluster.calls[-1] == ("hold-off", "pve2")


@pytest.mark.asyncio
async def test_a_vm_owned_by_a_node_missing_from_the_config_fails() -> None:
    cluster = Cluster({}, (web("pve9"),))
    fence = fencer(cluster)
    for action in ("off", "on"):
        with pytest.raises(FenceFailed, match="Proxmox node pve9"):
            await fence.fence("web", action)
    with pytest.raises(FenceFailed, match="Proxmox node pve9"):
        await fence.vm_status("100")
    assert not [c for c in cluster.calls if c[0] in ("hold-off", "power-on 100")]


@pytest.mark.asyncio
async def test_reboot_does_not_hold_it_off_and_starts_it_on_its_owner() -> None:
    cluster = Cluster({"pve1": [running_web()]}, (web("pve1"),))
    result, _ = await fencer(cluster).fence("web", "reboot")
    assert result.outcome == "rebooted" and result.host == "pve1"
    assert ("hold-off", "pve1") not in cluster.calls
    assert ("power-on 100", "pve1") in cluster.calls


def test_status_names_nodes_missing_from_the_config() -> None:
    result: dict[str, object] = {
        "daemon": {"version": "1", "pid": 1, "uptime_s": 5},
        "hosts": [],
        "vms": [{"name": "web", "alias": None, "host": "pve9", "state": "unknown"}],
        "missing_nodes": [{"node": "pve9", "vms": [str(v) for v in range(100, 112)]}],
    }
    text = render_status(result, time.time())
    assert "Proxmox nodes missing from the configuration" in text
    assert "pve9: VMID 100, 101" in text and "and 2 more" in text
    # A daemon from before Proxmox sends no such list.
    del result["missing_nodes"]
    assert "missing" not in render_status(result, time.time())


def test_status_shows_each_cluster_vm_once_at_its_owner_and_the_missing_nodes() -> None:
    db = RegisteredVM("101", "db", "/etc/pve/nodes/pve2/qemu-server/101.conf", owner="pve2")
    lost = RegisteredVM("102", "lost", "/etc/pve/nodes/pve9/qemu-server/102.conf", owner="pve9")
    cluster = Cluster({"pve1": [running_web()]}, (web(), db, lost))
    fence = fencer(cluster)
    vmmap = VMMap()
    for name in NODES:  # every node lists the whole cluster's registrations
        vmmap.update(
            name, HostInventory(tuple(cluster.running.get(name, ())), cluster.registered, 0)
        )
    status = Api(fence, fence.hosts, vmmap).status()
    rows = sorted((v["name"], v["host"], v["state"]) for v in status["vms"])
    assert rows == [("db", "pve2", "off"), ("lost", "pve9", "unknown"), ("web", "pve1", "on")]
    assert status["missing_nodes"] == [{"node": "pve9", "vms": ["102"]}]


class RecordingLane:
    def __init__(self, name: str, runs: list[tuple[str, str]]) -> None:
        self.name, self.runs = name, runs

    async def run(self, command: str, _timeout: float) -> CommandResult:
        self.runs.append((self.name, command))
        return CommandResult(0, "vmf:ha not-managed\n", 0.0)


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["shell", "helper"])
async def test_the_hold_off_runs_on_the_inventory_lane(mode: Literal["shell", "helper"]) -> None:
    """ha-manager may hang for its whole bound without quorum: never on the fence lane, where
    it would hold up the other fences that need this node's listing."""
    config = HostConfig(name="pve1", address="192.0.2.1", kind="proxmox")
    host = Host(config, SSHConfig(mode=mode), BACKENDS["proxmox"], [], lambda _h, _l: None)
    runs: list[tuple[str, str]] = []
    host.fence = cast(Any, RecordingLane("fence", runs))
    host.inventory = cast(Any, RecordingLane("inventory", runs))
    assert await host.hold_off("100", 10.0) == "vmf:ha not-managed\n"
    assert [lane for lane, _ in runs] == ["inventory"]
    assert "100" in runs[0][1]
