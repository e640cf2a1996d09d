"""vmfencectl's Proxmox lines (standard library only): nodes that own VMs but are missing
from the configuration, and the HA stack's answer after a fence."""

from __future__ import annotations

from vmfenced.clients.records import MissingNode
from vmfenced.clients.text import printable

# How many VMIDs a missing node's line names before it says "and N more".
SHOWN_VMIDS = 10


def render_missing_nodes(nodes: tuple[MissingNode, ...]) -> str:
    """A warning block, or "" when every owner node is configured."""
    if not nodes:
        return ""
    lines = [
        "\nProxmox nodes missing from the configuration own VMs; those VMs may run there "
        "unseen, so off, status and on of them fail until the node is added as a host:"
    ]
    for node in nodes:
        shown = ", ".join(printable(v) for v in node.vms[:SHOWN_VMIDS])
        more = len(node.vms) - SHOWN_VMIDS
        if more > 0:
            shown += f" and {more} more"
        lines.append(f"  {printable(node.node)}: VMID {shown}")
    return "\n".join(lines) + "\n"
