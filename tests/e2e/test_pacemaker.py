"""Pacemaker end to end: a real corosync 3 + Pacemaker 2.1 cluster fences its nodes' VMs
through fence_vmfenced and the real vmfenced daemon.

Each node of the cluster lives exactly as long as one process of its VM (see vmflab.cluster):
a fenced VM takes its node down at once, a rebooted VM brings the node back. Every death is
checked on the VM's process itself, through a pidfd the test holds.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import pytest

from tests.e2e.conftest import AGENT_LOG, DEVICE, Report
from vmflab.cluster import Cluster
from vmflab.cluster.node import Life
from vmflab.cluster.vm import NodeVm
from vmflab.daemon import LabDaemon

pytestmark = pytest.mark.e2e

T = TypeVar("T")
FENCE_TIMEOUT_S = 60
REJOIN_TIMEOUT_S = 60
OP_PENDING = -1  # op-status of an operation in flight (its rc-code is then 193)


class VmWatch:
    """A pidfd on the VM's current process: tells whether *that* process has died, whatever
    PID reuse may happen meanwhile."""

    def __init__(self, vm: NodeVm) -> None:
        pid = vm.process()
        assert pid is not None, f"{vm.name} is not running"
        self.pid = pid
        self.fd = os.pidfd_open(pid)

    def dead(self) -> bool:
        return bool(select.select([self.fd], [], [], 0)[0])


@contextmanager
def watch(vm: NodeVm) -> Iterator[VmWatch]:
    watcher = VmWatch(vm)
    try:
        yield watcher
    finally:
        os.close(watcher.fd)


def poll(probe: Callable[[], T | None], *, timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not the case after {timeout} s")
        time.sleep(0.2)


def life_of(lives: list[Life], pid: int) -> Life:
    return next(life for life in lives if life.vm_pid == pid)


def death_of(cluster: Cluster, node: str, pid: int, timeout: float) -> float:
    """When (time.monotonic()) the node's supervisor saw VM process ``pid`` die."""
    return cluster.wait_life(node, lambda lives: life_of(lives, pid).died, timeout=timeout)


def next_life(cluster: Cluster, node: str, old_pid: int) -> Life:
    """The node's life on a new process of its VM, once booted."""
    return cluster.wait_life(
        node,
        lambda lives: next((x for x in lives if x.vm_pid != old_pid and x.booted), None),
        timeout=REJOIN_TIMEOUT_S,
    )


def agent_requests(cluster: Cluster, action: str, vm: str) -> int:
    """How many times fence_vmfenced, on any node, sent this fence to the daemon."""
    mark = f"request: fence {action} {vm} via"
    count = 0
    for node in cluster.specs:
        path = cluster.supervisor(node).dirs.log / AGENT_LOG
        if path.exists():
            count += path.read_text(errors="replace").count(mark)
    return count


def successful_reboot(cluster: Cluster, node: str) -> str | None:
    """The last successful fence of ``node`` as stonith_admin shows it, if it is a reboot."""
    history = cluster.run("node1", ["stonith_admin", "--history", node]).stdout
    return history if f"reboot of {node} successful" in history else None


def test_cluster_starts(healthy: Cluster, report: Report) -> None:
    assert healthy.start_seconds is not None
    report(f"cluster of 3 nodes online {healthy.start_seconds:.2f} s after the first boot")


def test_device_monitor_succeeds_and_list_shows_the_vms(
    healthy: Cluster, node_vms: dict[str, NodeVm]
) -> None:
    cluster = healthy
    # The recurring monitor the cluster itself runs on the device, as recorded in the CIB once
    # it has completed (the CIB records an operation in flight as pending first).
    monitors = poll(
        lambda: [
            op
            for op in cluster.op_history("node1")
            if op.resource == DEVICE
            and op.operation == "monitor"
            and op.interval_ms > 0
            and op.status != OP_PENDING
        ],
        timeout=60,
        what="a recurring monitor result of the device in the CIB",
    )
    assert all((op.rc, op.status) == (0, 0) for op in monitors), monitors
    # And on request: --query runs the agent's monitor action.
    cluster.run("node1", ["stonith_admin", "--query", DEVICE, "--timeout", "30"])
    # The agent's list action: every VM the daemon knows.
    listed = cluster.run("node1", ["stonith_admin", "--list-targets", DEVICE, "--timeout", "30"])
    targets = {line.strip() for line in listed.stdout.splitlines()}
    assert {vm.name for vm in node_vms.values()} <= targets, listed.stdout
    # Which devices can fence node2 (from pcmk_host_map).
    devices = cluster.run("node1", ["stonith_admin", "--list", "node2", "--timeout", "30"])
    assert DEVICE in devices.stdout.split(), devices.stdout


def test_stonith_admin_reboot_kills_the_vm_and_brings_the_node_back(
    healthy: Cluster, node_vms: dict[str, NodeVm], report: Report
) -> None:
    cluster, vm = healthy, node_vms["node3"]
    requests = agent_requests(cluster, "reboot", vm.name)
    with watch(vm) as old:
        began = time.monotonic()
        cluster.run(
            "node1",
            ["stonith_admin", "--reboot", "node3", "--timeout", str(FENCE_TIMEOUT_S)],
            timeout=FENCE_TIMEOUT_S + 30,
        )
        done = time.monotonic()
        # Success was reported: the VM's process must be dead, checked by the kernel.
        assert old.dead()
    died = death_of(cluster, "node3", old.pid, timeout=10)
    new = next_life(cluster, "node3", old.pid)
    assert vm.process() == new.vm_pid
    # Our request went through the agent. On a loaded machine the controller may also see the
    # node leave before it learns the fencing is done and fence it once more (its own call):
    # that is Pacemaker's choice, and the daemon serves it like any other.
    assert agent_requests(cluster, "reboot", vm.name) >= requests + 1
    cluster.wait_online(["node3"], via="node1", timeout=REJOIN_TIMEOUT_S)
    online = time.monotonic()
    report(
        f"stonith_admin --reboot node3: VM {vm.name} dead after {died - began:.2f} s, "
        f"command done after {done - began:.2f} s, VM running again after "
        f"{new.seen - began:.2f} s, node3 online again after {online - began:.2f} s"
    )


def test_node_whose_corosync_dies_is_fenced_by_the_cluster(
    healthy: Cluster, node_vms: dict[str, NodeVm], report: Report
) -> None:
    cluster, vm = healthy, node_vms["node2"]
    requests = agent_requests(cluster, "reboot", vm.name)
    with watch(vm) as old:
        killed = cluster.kill_corosync("node2")
        died = death_of(cluster, "node2", old.pid, timeout=FENCE_TIMEOUT_S + 30)
        assert old.dead()
    report(
        f"corosync of node2 killed: VM {vm.name} confirmed dead {died - killed:.2f} s later "
        "(fenced by the cluster through fence_vmfenced)"
    )
    # The cluster's controller asked for it, and our agent carried it out. The operation ends
    # (and enters the history) once the VM is back on and corosync has seen node2 go.
    history = poll(
        lambda: successful_reboot(cluster, "node2"),
        timeout=FENCE_TIMEOUT_S,
        what="a successful reboot of node2 in the fencing history",
    )
    assert "pacemaker-controld" in history, history
    assert agent_requests(cluster, "reboot", vm.name) == requests + 1
    # stonith-action is reboot: the VM comes back and the node rejoins.
    new = next_life(cluster, "node2", old.pid)
    cluster.wait_online(["node2"], via="node1", timeout=REJOIN_TIMEOUT_S)
    report(
        f"node2 online again {time.monotonic() - killed:.2f} s after the kill "
        f"(VM running again after {new.seen - killed:.2f} s)"
    )


def test_stonith_admin_fence_powers_the_vm_off(
    healthy: Cluster, node_vms: dict[str, NodeVm], daemon: LabDaemon, report: Report
) -> None:
    cluster, vm = healthy, node_vms["node3"]
    requests = agent_requests(cluster, "off", vm.name)
    with watch(vm) as old:
        began = time.monotonic()
        cluster.run(
            "node1",
            ["stonith_admin", "--fence", "node3", "--timeout", str(FENCE_TIMEOUT_S)],
            timeout=FENCE_TIMEOUT_S + 30,
        )
        done = time.monotonic()
        assert old.dead()
    died = death_of(cluster, "node3", old.pid, timeout=10)
    report(
        f"stonith_admin --fence node3: VM {vm.name} dead after {died - began:.2f} s, "
        f"command done after {done - began:.2f} s"
    )
    assert agent_requests(cluster, "off", vm.name) == requests + 1
    # Off means off: no process of the VM runs anywhere, as the daemon checks live.
    assert vm.process() is None
    status = daemon.request({"op": "vm_status", "vm": vm.name})
    assert status["ok"] and status["result"]["state"] == "off", status
    view = cluster.wait_view(
        "node1",
        lambda v: not v.nodes["node3"].online and not v.nodes["node3"].unclean,
        timeout=30,
        what="node3 offline and clean",
    )
    assert view.online() == {"node1", "node2"}
    # Leave the cluster as the next test expects it.
    vm.power_on()
    cluster.wait_online(["node3"], via="node1", timeout=REJOIN_TIMEOUT_S)
