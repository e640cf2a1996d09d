"""What Pacemaker's tools say about the cluster, parsed: ``crm_mon --output-as=xml`` and the
operation history in the CIB's status section."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from vmflab.control import LabError


@dataclass(frozen=True)
class NodeView:
    name: str
    online: bool
    unclean: bool
    pending: bool
    is_dc: bool


@dataclass(frozen=True)
class ClusterView:
    """One ``crm_mon --one-shot --output-as=xml`` as seen from one node."""

    dc: str | None
    quorum: bool
    nodes: dict[str, NodeView]
    resources: dict[str, tuple[str, ...]]  # resource ID -> nodes where it is active

    def online(self) -> set[str]:
        return {n.name for n in self.nodes.values() if n.online and not n.pending}


@dataclass(frozen=True)
class OpResult:
    """One ``lrm_rsc_op`` of the CIB status: the last result of an operation on a node."""

    node: str
    resource: str
    operation: str
    interval_ms: int
    rc: int
    status: int


def _parse(text: str, what: str) -> ET.Element:
    try:
        return ET.fromstring(text)
    except ET.ParseError as exc:
        raise LabError(f"unreadable {what} output ({exc}): {text[:500]!r}") from exc


def _true(element: ET.Element, name: str) -> bool:
    return element.get(name) == "true"


def parse_crm_mon(text: str) -> ClusterView:
    root = _parse(text, "crm_mon")
    dc_element = root.find("summary/current_dc")
    dc = None
    quorum = False
    if dc_element is not None and _true(dc_element, "present"):
        dc = dc_element.get("name")
        quorum = _true(dc_element, "with_quorum")
    nodes = {}
    for node in root.iterfind("nodes/node"):
        name = node.get("name", "")
        nodes[name] = NodeView(
            name=name,
            online=_true(node, "online"),
            unclean=_true(node, "unclean"),
            pending=_true(node, "pending"),
            is_dc=_true(node, "is_dc"),
        )
    resources = {}
    for resource in root.iter("resource"):
        rid = resource.get("id", "")
        active = tuple(n.get("name", "") for n in resource.iterfind("node"))
        resources[rid] = active if _true(resource, "active") else ()
    return ClusterView(dc=dc, quorum=quorum, nodes=nodes, resources=resources)


def parse_op_history(text: str) -> list[OpResult]:
    """Every ``lrm_rsc_op`` of ``cibadmin --query --scope status``."""
    root = _parse(text, "cibadmin")
    results = []
    for state in root.iter("node_state"):
        node = state.get("uname", "")
        for resource in state.iter("lrm_resource"):
            for op in resource.iterfind("lrm_rsc_op"):
                try:
                    results.append(
                        OpResult(
                            node=node,
                            resource=resource.get("id", ""),
                            operation=op.get("operation", ""),
                            interval_ms=int(op.get("interval", "0")),
                            rc=int(op.get("rc-code", "-1")),
                            status=int(op.get("op-status", "-1")),
                        )
                    )
                except ValueError as exc:
                    raise LabError(f"unreadable lrm_rsc_op {op.attrib}") from exc
    return results
