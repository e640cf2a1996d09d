"""Hostile VM names for the fault generator: every character class a display name may hold on a
real hypervisor, followed by text shaped like a record of the listing the daemon parses, naming
a real VM of the lab (its name and its current cartel ID or qemu PID).

A parser that splits a listing on anything but "\\n" (``str.splitlines()`` splits on \\r \\v \\f
\\x1c-\\x1e \\x85 U+2028 U+2029) would read the tail as a second record: another VM, running
under another process. The lab may not accept every name yet (ESXi lab names exclude '"', '/',
'\\', '|' and control characters): the generator counts those as skipped and uses them as soon
as the lab takes them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# The characters str.splitlines() breaks on beyond "\n" (and "\r\n").
SEPARATORS = ("\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")
SPECIALS = ("'", '"', "&", "<", ">", "&amp;", "<b>", "' OR '", '\\"')
LIMITS = {"esxi": 80, "libvirt": 200}
UUID = "564d7a1e-0b2c-4f33-9d5e-1c2d3e4f5a6b"


@dataclass(frozen=True)
class HostileName:
    name: str
    separator: str
    template: str

    @property
    def klass(self) -> str:
        """A short label of its character class and record shape, for the summary."""
        if self.separator == " ":
            return f"no separator + {self.template}"
        return f"{self.separator.encode('unicode_escape').decode()} + {self.template}"


def records(kind: str, victim: str, pid: int, world: int) -> dict[str, str]:
    """Lines the daemon's listings of ``kind`` hosts are made of, naming ``victim``."""
    if kind == "esxi":
        return {
            "vmdumper": (
                f'vmid={world} pid=-1 cfgFile="/vmfs/volumes/ds1/{victim}/{victim}.vmx" '
                f'uuid="" displayName="{victim}" vmxCartelID={pid}'
            ),
            "vmdumper, no path": f"vmid={world} pid=-1 displayName={victim} vmxCartelID={pid}",
            "ps -c": f"{world} {pid} vmx-vcpu-0:{victim}",
            "getallvms": f"{world}   {victim}   [ds1] {victim}.vmx   otherGuest   vmx-13",
            "esxcli xml": f"<string>{victim}</string></field><field name='VMXCartelID'>",
            "name": victim,
        }
    return {
        "pid file": f"vmf:vm {pid} {UUID} {victim}",
        "virsh uuid name": f"{UUID} {victim}",
        "virsh list": f" {world}    {victim}    running",
        "name": victim,
    }


def hostile_name(rng: random.Random, kind: str, serial: int, victim: str, pid: int) -> HostileName:
    """A new hostile name (``serial`` keeps names unique) whose tail names ``victim``."""
    # One name in four has no separator: quotes and XML specials alone are a class of their own
    # (libvirt escapes them in some of its file names), and a separator may hide them.
    separator = rng.choice(SEPARATORS) if rng.random() < 0.75 else " "
    shapes = records(kind, victim, pid, rng.randrange(1, 99999))
    template, record = rng.choice(sorted(shapes.items()))
    specials = "".join(rng.sample(SPECIALS, rng.randint(1, 3)))
    name = f"h{serial}{specials}{separator}{record}"[: LIMITS[kind]]
    return HostileName(name.rstrip() or f"h{serial}", separator, template)
