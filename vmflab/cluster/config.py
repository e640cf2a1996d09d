"""Text of a lab cluster's files: corosync.conf, the pre-seeded cib.xml, CIB fragments, and the
wrapper that installs ``fence_vmfenced`` for Pacemaker."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from vmflab.control import LabError

NODE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
XML_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,60}$")
# corosync.conf has no quoting: a value must be one plain token.
CONF_TOKEN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
CIB_SCHEMA = "pacemaker-3.9"  # the newest schema Pacemaker 2.1.5 ships
AGENT_MARK = "# vmflab cluster: fence agent wrapper"
# Where each node sees the Python package directory given to the cluster (read-only bind).
NODE_PYTHON_DIR = "/run/vmflab/python"


@dataclass(frozen=True)
class NodeSpec:
    """One cluster node: its name (also its hostname), corosync node ID and ring0 address."""

    name: str
    nodeid: int
    address: str

    def __post_init__(self) -> None:
        if not NODE_NAME.match(self.name):
            raise LabError(f"invalid node name {self.name!r} (lowercase letters, digits, '-')")
        if not 1 <= self.nodeid <= 2**31 - 1:
            raise LabError(f"invalid corosync node ID {self.nodeid}")
        if not CONF_TOKEN.match(self.address):
            raise LabError(f"invalid node address {self.address!r}")


def corosync_conf(cluster_name: str, nodes: Sequence[NodeSpec], *, token_ms: int) -> str:
    """knet without crypto (the ring only exists inside the lab's namespaces)."""
    if not CONF_TOKEN.match(cluster_name):
        raise LabError(f"invalid cluster name {cluster_name!r}")
    # One key per line: corosync rejects text after "{" on the same line.
    lines = [
        "totem {",
        "    version: 2",
        f"    cluster_name: {cluster_name}",
        "    transport: knet",
        "    crypto_cipher: none",
        "    crypto_hash: none",
        f"    token: {int(token_ms)}",
        "}",
        "nodelist {",
    ]
    for node in nodes:
        lines += [
            "    node {",
            f"        ring0_addr: {node.address}",
            f"        name: {node.name}",
            f"        nodeid: {node.nodeid}",
            "    }",
        ]
    lines += [
        "}",
        "quorum {",
        "    provider: corosync_votequorum",
        "}",
        "logging {",
        "    to_logfile: yes",
        "    logfile: /var/log/pacemaker/corosync.log",
        "    to_syslog: no",
        "    to_stderr: no",
        "    timestamp: on",
        "}",
        # Pacemaker's daemons run as hacluster and must be allowed on corosync's IPC.
        "uidgid {",
        "    uid: hacluster",
        "    gid: haclient",
        "}",
    ]
    return "\n".join(lines) + "\n"


def nvpairs(prefix: str, values: Mapping[str, str]) -> str:
    pairs = []
    for name, value in values.items():
        if not XML_ID.match(name):
            raise LabError(f"invalid CIB attribute name {name!r}")
        pairs.append(
            f"<nvpair id={quoteattr(f'{prefix}-{name}')} name={quoteattr(name)}"
            f" value={quoteattr(value)}/>"
        )
    return "".join(pairs)


def cib_xml(properties: Mapping[str, str]) -> str:
    """A CIB to pre-seed: cluster properties only.

    Without a ``crm_feature_set`` attribute (2.1.5 refuses the 3.16.2 a newer tool would write);
    with ``dc-deadtime`` among ``properties`` the first DC election does not wait 20 s.
    """
    return (
        f'<cib admin_epoch="0" epoch="1" num_updates="0" validate-with="{CIB_SCHEMA}">'
        "<configuration><crm_config>"
        '<cluster_property_set id="cib-bootstrap-options">'
        f"{nvpairs('cib-bootstrap-options', properties)}"
        "</cluster_property_set></crm_config>"
        "<nodes/><resources/><constraints/></configuration><status/></cib>\n"
    )


def stonith_primitive(
    device_id: str, agent: str, params: Mapping[str, str], *, monitor_interval_s: int
) -> str:
    """A ``<primitive class="stonith">`` for ``cibadmin --create -o resources``."""
    for value in (device_id, agent):
        if not XML_ID.match(value):
            raise LabError(f"invalid device or agent name {value!r}")
    return (
        f'<primitive id="{device_id}" class="stonith" type="{agent}">'
        f'<instance_attributes id="{device_id}-ia">{nvpairs(device_id, params)}'
        "</instance_attributes>"
        f'<operations><op id="{device_id}-monitor" name="monitor"'
        f' interval="{int(monitor_interval_s)}s"/></operations>'
        "</primitive>"
    )


def host_map(vm_by_node: Mapping[str, str]) -> str:
    """``pcmk_host_map``: ``node1:vm1;node2:vm2``."""
    for node, vm in vm_by_node.items():
        if not NODE_NAME.match(node) or not vm or any(c in vm for c in ":; \t\n"):
            raise LabError(f"cannot put {node!r} -> {vm!r} in pcmk_host_map")
    return ";".join(f"{node}:{vm}" for node, vm in vm_by_node.items())


def agent_wrapper(module: str, pythons: Sequence[str]) -> str:
    """A tiny executable running ``python -m module`` from the node's ``NODE_PYTHON_DIR``.

    It takes the first of ``pythons`` the calling user may execute: Pacemaker's fencer runs
    agents as root, but its controller runs them as hacluster for their metadata, and that
    user cannot run an interpreter under /root (pyenv, a venv); list a system python3 after.
    """
    if not pythons:
        raise LabError("agent_wrapper needs at least one python")
    candidates = " ".join(shlex.quote(p) for p in pythons)
    return (
        "#!/bin/sh\n"
        f"{AGENT_MARK}\n"
        f"PYTHONPATH={NODE_PYTHON_DIR}\n"
        "export PYTHONPATH\n"
        f"for python in {candidates}; do\n"
        f'    if [ -x "$python" ]; then exec "$python" -m {module} "$@"; fi\n'
        "done\n"
        f'echo "$0: none of {candidates} can be run by $(id -un)" >&2\n'
        "exit 1\n"
    )
