"""A real corosync 3 + Pacemaker 2.1 cluster whose nodes are namespace "machines" tied to VMs.

Each node runs on a VM (any ``NodeVm``: an ESXi lab VM now, a libvirt VM later). A node is up
exactly while one process of its VM runs: killing the VM (a fence) kills every process of the
node at once, like pulling the plug, and powering the VM on again boots the node, which rejoins
the cluster with its state directories ("disk") kept. So a fence seen by the cluster is a fence
of the VM, and a reboot is a reboot.

    with Cluster(workdir, {"node1": vm1, "node2": vm2, "node3": vm3}, agents=...) as cluster:
        cluster.run("node1", ["stonith_admin", "--reboot", "node2"])

Everything is torn down by PID on exit, even on failure; nothing outside the namespaces the
cluster creates is changed (fence agents reach ``/usr/sbin`` through a per-node overlay).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

from vmflab.cluster.config import NodeSpec, cib_xml, corosync_conf, stonith_primitive
from vmflab.cluster.machine import Machine, NodeDirs, Switch
from vmflab.cluster.node import Life, NodeSupervisor
from vmflab.cluster.view import ClusterView, OpResult, parse_crm_mon, parse_op_history
from vmflab.cluster.vm import NodeVm
from vmflab.control import LabError
from vmflab.lifecycle import Started
from vmflab.nsproc import processes_in

T = TypeVar("T")
SUBNET = "192.0.2."  # TEST-NET-1: routed nowhere, and here only inside the cluster's namespaces
START_TIMEOUT_S = 120.0
POLL_S = 0.25
DEFAULT_PROPERTIES = {
    "dc-deadtime": "2s",  # else the first election waits 20 s
    "stonith-enabled": "true",
    "stonith-timeout": "40s",
}


class Cluster(Started):
    """Context manager; ``start`` returns once every node is online and a DC is elected."""

    def __init__(
        self,
        workdir: Path,
        vms: Mapping[str, NodeVm],
        *,
        name: str = "vmflab",
        token_ms: int = 1000,
        properties: Mapping[str, str] | None = None,
        agents: Mapping[str, str] | None = None,
        python_dir: Path | None = None,
    ) -> None:
        """``vms``: node name -> its VM. ``agents``: file name -> text of executables each node
        sees in /usr/sbin. ``python_dir``: a directory every node user may import from, at
        ``vmflab.cluster.config.NODE_PYTHON_DIR`` (for agents written in Python)."""
        if not vms:
            raise LabError("a cluster needs at least one node")
        self.workdir = Path(workdir).resolve()
        self.name = name
        self.vms = dict(vms)
        self.specs = {
            node: NodeSpec(node, index, f"{SUBNET}{10 + index}")
            for index, node in enumerate(self.vms, 1)
        }
        self._token_ms = token_ms
        self._properties = {**DEFAULT_PROPERTIES, **(properties or {})}
        self._agents = dict(agents or {})
        self._python_dir = python_dir
        self._changed = threading.Condition()
        self._switch = Switch()
        self._supervisors: dict[str, NodeSupervisor] = {}
        self._started = False
        self.start_seconds: float | None = None  # from the first boot to every node online

    # --------------------------------------------------------------- lifecycle
    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Writes each node's files, starts the switch and the node supervisors, and waits
        until every node whose VM runs is online. On failure everything is torn down."""
        if self._started:
            raise LabError("cluster already started")
        self._started = True
        try:
            conf = corosync_conf(self.name, list(self.specs.values()), token_ms=self._token_ms)
            for node, spec in self.specs.items():
                dirs = NodeDirs(self.workdir / "nodes" / node)
                dirs.create()
                (dirs.corosync_etc / "corosync.conf").write_text(conf)
                if not dirs.cib.exists():
                    dirs.write_cib(cib_xml(self._properties))
                for agent, text in self._agents.items():
                    dirs.install(agent, text)
                self._supervisors[node] = NodeSupervisor(
                    spec,
                    dirs,
                    self.vms[node],
                    self._machine_factory(spec, dirs),
                    self._changed,
                    may_reboot=partial(self._left_and_fenced, node),
                )
            began = time.monotonic()
            self._switch.start()
            for supervisor in self._supervisors.values():
                supervisor.start()
            self.wait_online(self.specs, timeout=timeout)
            self.start_seconds = time.monotonic() - began
        except BaseException:
            self.close(graceful=False)
            raise

    def _machine_factory(self, spec: NodeSpec, dirs: NodeDirs) -> Callable[[int], Machine]:
        def new_machine(boot: int) -> Machine:
            return Machine(spec, dirs, self._switch, boot=boot, python_dir=self._python_dir)

        return new_machine

    def closing(self, *, ok: bool) -> None:
        self.close(graceful=ok)

    def close(self, *, graceful: bool = True) -> None:
        """Stops pacemaker and corosync cleanly if asked (bounded), then kills every machine by
        PID and checks that no process of any machine the cluster ever booted is left."""
        machines = [m for m in (s.machine for s in self._supervisors.values()) if m is not None]
        errors = []
        if graceful and machines:
            with ThreadPoolExecutor(len(machines)) as pool:
                for outcome in pool.map(_try_stop, machines):
                    if outcome:
                        errors.append(outcome)
        for supervisor in self._supervisors.values():
            supervisor.request_stop()
        for supervisor in self._supervisors.values():
            try:
                supervisor.join(timeout=60)
            except LabError as exc:
                errors.append(str(exc))
        self._switch.close()
        namespaces = set().union(*(s.namespaces for s in self._supervisors.values()))
        left = processes_in(namespaces) if namespaces else {}
        if left:
            errors.append(f"processes of the cluster survived: {left}")
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if errors:
            raise LabError(f"cluster teardown: {errors}")

    # ----------------------------------------------------------------- access
    def supervisor(self, node: str) -> NodeSupervisor:
        try:
            return self._supervisors[node]
        except KeyError:
            raise LabError(f"no node {node!r} in the cluster") from None

    def machine(self, node: str) -> Machine:
        machine = self.supervisor(node).machine
        if machine is None:
            raise LabError("node is down", host=node)
        return machine

    def run(
        self, node: str, argv: list[str], *, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``argv`` on ``node`` (inside its machine)."""
        return self.machine(node).run(argv, timeout=timeout, check=check)

    def _left_and_fenced(self, node: str) -> bool:
        """Whether ``node`` may boot again: a survivor has seen it leave and no fencing of it is
        still pending. A real VM boots for far longer than that; a lab VM is back in under a
        second, and a node that rejoins before its own fencing completes is told it was fenced
        ("We were allegedly just fenced") and stops for good."""
        for other, supervisor in self._supervisors.items():
            if other == node or supervisor.machine is None:
                continue
            try:
                if self.view(via=other).nodes[node].online:
                    return False
                history = self.run(
                    other,
                    ["stonith_admin", "--history", node, "--output-as=xml"],
                    timeout=30,
                    check=False,
                )
            except (LabError, subprocess.SubprocessError, KeyError):
                return False
            return history.returncode == 0 and 'status="pending"' not in history.stdout
        return True  # nobody left to ask: the whole cluster is booting

    def view(self, via: str) -> ClusterView:
        """``crm_mon`` as seen from node ``via``."""
        result = self.run(via, ["crm_mon", "--one-shot", "--output-as=xml"], timeout=30)
        return parse_crm_mon(result.stdout)

    def op_history(self, via: str) -> list[OpResult]:
        result = self.run(via, ["cibadmin", "--query", "--scope", "status"], timeout=30)
        return parse_op_history(result.stdout)

    def add_stonith_device(
        self,
        device_id: str,
        agent: str,
        params: Mapping[str, str],
        *,
        via: str,
        monitor_interval_s: int = 10,
    ) -> None:
        xml = stonith_primitive(device_id, agent, params, monitor_interval_s=monitor_interval_s)
        self.run(via, ["cibadmin", "--create", "--scope", "resources", "--xml-text", xml])

    def lives(self, node: str) -> list[Life]:
        return self.supervisor(node).lives

    def kill_corosync(self, node: str) -> float:
        """SIGKILL of the node's corosync; returns the time.monotonic() of the kill."""
        pids = [pid for pid, comm in self.machine(node).processes().items() if comm == "corosync"]
        if len(pids) != 1:
            raise LabError(f"expected one corosync process, found {pids}", host=node)
        killed_at = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        return killed_at

    # ---------------------------------------------------------------- waiting
    def check(self) -> None:
        """Raises if a node supervisor failed or a boot failed."""
        for node, supervisor in self._supervisors.items():
            if supervisor.failure:
                raise LabError(f"node supervisor failed: {supervisor.failure}", host=node)
            for life in supervisor.lives:
                if life.error:
                    raise LabError(f"boot failed: {life.error}", host=node)

    def wait_life(
        self, node: str, predicate: Callable[[list[Life]], T | None], *, timeout: float
    ) -> T:
        """Waits (on the supervisor's events) until ``predicate(lives)`` returns non-None."""
        supervisor = self.supervisor(node)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                self.check()
                found = predicate(supervisor.lives)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LabError(
                        f"timed out after {timeout} s; lives {supervisor.lives}", host=node
                    )
                self._changed.wait(left)

    def wait_view(
        self, via: str, predicate: Callable[[ClusterView], bool], *, timeout: float, what: str
    ) -> ClusterView:
        """Polls ``crm_mon`` on ``via`` until ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        last: ClusterView | str = "nothing yet"
        while True:
            self.check()
            if self.supervisor(via).machine is not None:
                try:
                    view = self.view(via)
                except (LabError, subprocess.SubprocessError) as exc:
                    last = str(exc)
                else:
                    if predicate(view):
                        return view
                    last = view
            if time.monotonic() > deadline:
                raise LabError(f"{what}: not after {timeout} s; last: {last}", host=via)
            time.sleep(POLL_S)

    def wait_online(self, nodes: Iterable[str], *, via: str | None = None, timeout: float) -> None:
        """Waits until ``nodes`` are all online and a DC with quorum is elected, as seen from
        ``via`` (default: each of ``nodes``)."""
        wanted = set(nodes)
        deadline = time.monotonic() + timeout
        for viewer in [via] if via else sorted(wanted):
            self.wait_view(
                viewer,
                lambda v: v.dc is not None and v.quorum and wanted <= v.online(),
                timeout=max(deadline - time.monotonic(), 1.0),
                what=f"{sorted(wanted)} online",
            )


def _try_stop(machine: Machine) -> str | None:
    try:
        machine.stop()
    except (LabError, OSError) as exc:
        return f"{machine.spec.name}: stop: {exc}"
    return None
