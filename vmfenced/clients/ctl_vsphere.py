"""vmfencectl's vSphere lines (standard library only): the way a fence of each VM would go
now, and the sessions' warnings."""

from __future__ import annotations

from collections.abc import Sequence

from vmfenced.clients.records import HostInfo, VmInfo
from vmfenced.clients.text import printable


def fence_paths(hosts: Sequence[HostInfo], vms: Sequence[VmInfo]) -> list[str] | None:
    """Per VM, the path its fence takes now (`ssh:HOST` over the host's warm lane,
    `api:ENTRY` through vCenter); None when no vSphere entry is configured (the column would
    say `ssh` on every row)."""
    paths = {h.name: h.path for h in hosts}
    if not any(p is not None for p in paths.values()):
        return None
    out = []
    for vm in vms:
        if vm.host is None:
            out.append("-")
            continue
        path = paths.get(vm.host)
        out.append(path if path is not None else f"ssh:{vm.host}")
    return out


def render_warnings(hosts: Sequence[HostInfo]) -> str:
    lines = [f"warning: {printable(h.name)}: {printable(w)}" for h in hosts for w in h.warnings]
    return "".join(f"{line}\n" for line in lines)
