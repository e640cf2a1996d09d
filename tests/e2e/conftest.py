"""Fixtures of the end-to-end tests: the ESXi lab, a VM per cluster node, a real vmfenced
daemon, and a real corosync + Pacemaker cluster whose nodes are tied to those VMs.

The VM side is one fixture (``node_vms``): switching the cluster to other VMs (libvirt) means
giving it other ``vmflab.cluster.vm.NodeVm`` objects and a daemon configured for them.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import vmfenced
from vmflab import Lab
from vmflab.cluster import Cluster
from vmflab.cluster.config import agent_wrapper, host_map
from vmflab.cluster.vm import EsxiLabVm, NodeVm
from vmflab.daemon import LabDaemon

REPORT = pytest.StashKey[list[str]]()
NODES = {
    "node1": ("esx1", "gfs-node1"),
    "node2": ("esx2", "gfs-node2"),
    "node3": ("esx3", "gfs-node3"),
}
DEVICE = "vmfenced"
AGENT = "fence_vmfenced"
AGENT_LOG = "fence_vmfenced.log"  # in each node's /var/log/pacemaker
TOOLS = (
    *("unshare", "nsenter", "ip", "sshd", "ssh", "ssh-keygen", "gcc"),
    *("corosync", "corosync-cfgtool", "pacemakerd", "stonith_admin", "cibadmin", "crm_mon"),
)
SBIN = ("/usr/sbin", "/sbin")

Report = Callable[[str], None]


def e2e_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the cluster needs root"
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    missing = [tool for tool in TOOLS if not shutil.which(tool, path=path)]
    if missing:
        return f"the cluster needs {', '.join(missing)}"
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.stash[REPORT] = []


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    lines = config.stash.get(REPORT, [])
    if lines:
        terminalreporter.section("Pacemaker end to end: timings")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Report:
    """Adds a line to the timings printed at the end of the run (and prints it for ``-s``)."""

    def add(line: str) -> None:
        print(line)
        request.config.stash[REPORT].append(line)

    return add


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = e2e_unavailable()
    if reason:
        # In CI a missing prerequisite is a broken setup, not a reason to run nothing.
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with Lab(tmp_path_factory.mktemp("e2e") / "lab") as started:
        yield started


@pytest.fixture(scope="module")
def node_vms(lab: Lab) -> dict[str, NodeVm]:
    """A running VM per cluster node (gfs-nodeN on esxN for nodeN)."""
    vms: dict[str, NodeVm] = {}
    for node, (host, vm) in NODES.items():
        lab.hosts[host].start_vm(vm)
        vms[node] = EsxiLabVm(lab.hosts[host], vm)
    return vms


@pytest.fixture(scope="module")
def daemon(lab: Lab) -> Iterator[LabDaemon]:
    # No [aliases]: the node -> VM mapping must come from pcmk_host_map alone.
    with LabDaemon(lab) as running:
        yield running


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    node_vms: dict[str, NodeVm],
    daemon: LabDaemon,
) -> Iterator[Cluster]:
    """The running cluster with a fence_vmfenced device for every node's VM."""
    agent_path = Path("/usr/sbin") / AGENT
    agent_before = agent_path.exists()
    # The agent reaches /usr/sbin through a per-node overlay: the real /usr/sbin is untouched.
    wrapper = agent_wrapper("vmfenced.clients.agent", [sys.executable, "/usr/bin/python3"])
    with Cluster(
        tmp_path_factory.mktemp("e2e") / "cluster",
        node_vms,
        agents={AGENT: wrapper},
        python_dir=Path(vmfenced.__file__).resolve().parents[1],
    ) as running:
        running.add_stonith_device(
            DEVICE,
            AGENT,
            {
                "pcmk_host_map": host_map({node: vm.name for node, vm in node_vms.items()}),
                "socket": str(daemon.socket),
                "verbose": "1",
                "debug_file": f"/var/log/pacemaker/{AGENT_LOG}",
            },
            via="node1",
        )
        yield running
    assert agent_path.exists() == agent_before, f"{agent_path} changed on the host"


@pytest.fixture
def healthy(cluster: Cluster, node_vms: dict[str, NodeVm]) -> Cluster:
    """The cluster with every VM running and every node online (what each test starts from)."""
    for vm in node_vms.values():
        if vm.process() is None:
            vm.power_on()
    cluster.wait_online(node_vms, via="node1", timeout=60)
    return cluster
