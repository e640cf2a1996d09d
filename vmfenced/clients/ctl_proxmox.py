"""vmfencectl's Proxmox lines (standard library only): nodes that own VMs but are missing
from the configuration, and the HA stack's answer after a fence."""

from __future__ import annotations

from vmfenced.clients.records import MissingNode

# How many VMIDs a missing node's line names before it says "and N more".
SHOWN_VMIDS = 10


def _printable(text: str) -> str:
    # Node names and VMIDs come from the cluster filesystem: a control character must not
    # forge a line of the report.
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def render_missing_nodes(nodes: tuple[MissingNode, ...]) -> str:
    """A warning block, or "" when every owner node is configured."""
    if not nodes:
        return ""
    lines = [
        "\nProxmox nodes missing from the configuration own VMs; those VMs may run there "
        "unseen, so off, status and on of them fail until the node is added as a host:"
    ]
    for node in nodes:
        shown = ", ".join(_printable(v) for v in node.vms[:SHOWN_VMIDS])
        more = len(node.vms) - SHOWN_VMIDS
        if more > 0:
            shown += f" and {more} more"
        lines.append(f"  {_printable(node.node)}: VMID {shown}")
    return "\n".join(lines) + "\n"
