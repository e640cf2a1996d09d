"""The lab's own reading of its hosts' VM listings: strict, lines ended by "\n" only."""

from __future__ import annotations

import re
from dataclasses import dataclass

from vmflab.control import LabError
from vmflab.vmfs import vmx_unescape

VMDUMPER_LINE = re.compile(
    r'^vmid=(?P<world>[0-9]+) pid=-1 cfgFile="(?P<cfg>/vmfs/volumes/[^"]*\.vmx)" '
    r'uuid="(?P<uuid>[0-9a-f -]*)" displayName="(?P<name>.*)" vmxCartelID=(?P<cartel>[0-9]+)$'
)
# Characters no vmdumper line can carry unambiguously (str.splitlines() breaks on most).
UNREADABLE_IN_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass(frozen=True)
class RunningVm:
    """A running VM as ``vmdumper -l`` reports it."""

    name: str
    cartel: int
    world: int
    uuid: str
    config_file: str


def lines_of(text: str) -> list[str]:
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def parse_vmdumper(text: str, host: str) -> list[RunningVm]:
    """``vmdumper -l``, as strictly as the daemon reads it: every line must be read, a name
    holding a control or line-separator character or a cartel listed twice is a LabError
    (``parse_vm_list`` tells such VMs apart exactly)."""
    vms = []
    for line in lines_of(text):
        match = VMDUMPER_LINE.match(line)
        if match is None or UNREADABLE_IN_LINE.search(line):
            raise LabError(f"unexpected vmdumper line {line!r}", host=host)
        vms.append(
            RunningVm(
                name=match["name"],
                cartel=int(match["cartel"]),
                world=int(match["world"]),
                uuid=match["uuid"],
                config_file=match["cfg"],
            )
        )
    if len({vm.cartel for vm in vms}) != len(vms):
        raise LabError(f"vmdumper lists a cartel twice: {vms}", host=host)
    return vms


def parse_vm_list(text: str, host: str) -> list[RunningVm]:
    """``vmflab-vm list``: tab-separated, display names |XX-escaped (so of any text)."""
    vms = []
    for line in lines_of(text):
        fields = line.split("\t")
        if len(fields) != 5 or not fields[0].isdigit() or not fields[1].isdigit():
            raise LabError(f"unexpected vmflab-vm list line {line!r}", host=host)
        cartel, world, uuid, name, cfg = fields
        vms.append(RunningVm(vmx_unescape(name), int(cartel), int(world), uuid, cfg))
    return vms


def vm_name_of(path: str) -> str:
    """``/vmfs/volumes/ds1/dir/node1.vmx`` -> ``node1``."""
    return path.rsplit("/", 1)[-1].removesuffix(".vmx")
