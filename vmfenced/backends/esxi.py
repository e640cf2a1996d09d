"""ESXi: commands a real ESXi shell has (busybox ash) and parsers of their real outputs.

Only `vmdumper -l`, `esxcli --formatter=xml vm process list`, `ps -c`, `kill`,
`vim-cmd vmsvc/getallvms`, `vim-cmd vmsvc/power.on` and POSIX sh builtins are used.
"""

from __future__ import annotations

import re
import shlex
import xml.etree.ElementTree as ET

from vmfenced.backends import Backend, Listing, parse_kill_marker
from vmfenced.config import HostConfig
from vmfenced.errors import ParseError
from vmfenced.model import RegisteredVM, RunningVM

ESXCLI_NS = "{http://www.vmware.com/Products/ESX/5.0/esxcli}"

# vmdumper lives outside ESXi's default PATH; appended so a host's own PATH still wins.
SESSION_SETUP = 'PATH="$PATH:/usr/lib/vmware/bin"; export PATH; LC_ALL=C; export LC_ALL'
VMDUMPER = "vmdumper -l"
ESXCLI_XML = "esxcli --formatter=xml vm process list"
GETALLVMS = "vim-cmd vmsvc/getallvms"

# Anchored on the field names, so a display name holding quotes or spaces stays whole: the
# name runs to the last `" vmxCartelID=`.
_VMDUMPER_LINE = re.compile(
    r'^vmid=(?P<world>\d+)\s+pid=-?\d+\s+cfgFile="(?P<cfg>.*?)"\s+'
    r'uuid="(?P<uuid>[0-9A-Fa-f \-]*)"\s+displayName="(?P<name>.*)"\s+'
    r"vmxCartelID=(?P<cartel>\d+)\s*$"
)
# The File column is the anchor: names contain spaces, "[datastore] path.vmx" does not start
# inside a name in practice.
_GETALLVMS_LINE = re.compile(
    r"^(?P<vmid>\d+)\s+(?P<name>.+?)\s+(?P<file>\[[^\]]+\]\s*\S.*?\.vmx)\b"
)


def parse_vmdumper(text: str) -> tuple[RunningVM, ...]:
    """`vmdumper -l`. Strict: a line we cannot read could hide a running VM."""
    vms = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        match = _VMDUMPER_LINE.match(line)
        if match is None:
            raise ParseError(VMDUMPER, f"line {number} not understood: {line[:200]!r}")
        vms.append(
            RunningVM(
                name=match["name"],
                config_file=match["cfg"],
                cartel=int(match["cartel"]),
                world=int(match["world"]),
                uuid=match["uuid"] or None,
            )
        )
    return tuple(vms)


def _field(structure: ET.Element, name: str) -> str:
    for field in structure.iter(f"{ESXCLI_NS}field"):
        if field.get("name") == name:
            for child in field:
                return (child.text or "").strip()
    raise ParseError(ESXCLI_XML, f"a VirtualMachine has no {name} field")


def parse_esxcli_xml(text: str) -> tuple[RunningVM, ...]:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ParseError(ESXCLI_XML, f"not valid XML: {exc}") from None
    if root.tag != f"{ESXCLI_NS}output" and root.find(f".//{ESXCLI_NS}list") is None:
        raise ParseError(ESXCLI_XML, f"unexpected document root {root.tag!r}")
    vms = []
    for structure in root.iter(f"{ESXCLI_NS}structure"):
        if structure.get("typeName") != "VirtualMachine":
            continue
        try:
            world = int(_field(structure, "WorldID"))
            cartel = int(_field(structure, "VMXCartelID"))
        except ValueError as exc:
            raise ParseError(ESXCLI_XML, f"non-numeric ID: {exc}") from None
        vms.append(
            RunningVM(
                name=_field(structure, "DisplayName"),
                config_file=_field(structure, "ConfigFile"),
                cartel=cartel,
                world=world,
                uuid=_field(structure, "UUID") or None,
            )
        )
    return tuple(vms)


def parse_getallvms(text: str) -> tuple[RegisteredVM, ...]:
    lines = text.splitlines()
    if not lines or not lines[0].split()[:2] == ["Vmid", "Name"]:
        raise ParseError(GETALLVMS, "missing the 'Vmid Name File' header")
    vms = []
    for line in lines[1:]:
        match = _GETALLVMS_LINE.match(line)
        # Lines that do not start with a Vmid continue a multi-line annotation.
        if match is not None:
            vms.append(RegisteredVM(match["vmid"], match["name"], match["file"]))
    return tuple(vms)


def vmx_tail(config_file: str) -> str:
    """`/dir/name.vmx`: the part of a .vmx path that survives datastore naming.

    The same file may appear as /vmfs/volumes/<uuid>/dir/x.vmx in one listing and
    /vmfs/volumes/<label>/dir/x.vmx in another, or `[label] dir/x.vmx` in vim-cmd.
    """
    parts = config_file.replace("] ", "]/").rsplit("/", 2)
    return "/" + "/".join(parts[-2:]) if len(parts) >= 2 else config_file


def kill_command(vm: RunningVM, budget: float) -> str:
    """One round trip: check the cartel runs this VM's .vmx, kill -9 it, wait until it is gone.

    Exit statuses of vmf_chk: 0 this VM runs there, 1 nothing under that cartel, 2 that cartel
    runs something else (reused: never killed), 3 `ps -c` failed (no verdict possible).
    `ps -c` is piped straight into awk (one process fewer than capturing it first), followed by
    its exit status: only a sighting of the VM counts from a listing that failed part-way.
    "Not there" needs the whole listing, because after the kill it means "confirmed gone".

    Fast path: once `kill -9` has succeeded, `kill -0` failing proves the process is gone and
    reaped (a zombie still answers `kill -0`, and only the PID's owner could have been
    signalled). The builtin spins briefly so the host's reaper can collect the corpse before
    the slower `ps -c` is asked; a zombie that ps -c no longer lists also counts as dead.
    """
    tries = max(1, int(budget / 0.01))
    return f"""VMF_VMX={shlex.quote(vmx_tail(vm.config_file))}; export VMF_VMX; vmf_c={vm.cartel}
vmf_chk() {{
  {{ ps -c 2>&1; echo "vmf:ps=$?"; }} |
  awk -v c="$vmf_c" 'BEGIN {{ v = ENVIRON["VMF_VMX"] " "; r = 1 }}
    NR == 1 && /CID/ {{ h = 1; next }}
    !h {{ exit }}
    /^vmf:ps=/ {{ s = substr($0, 8); next }}
    $2 == c {{ if (index($0 " ", v)) {{ r = 0; exit }} r = 2 }}
    END {{ if (!h) exit 3; if (r == 0) exit 0; if (s != "0") exit 3; exit r }}'
}}
vmf_chk; vmf_r=$?
if [ "$vmf_r" -eq 0 ]; then
  if kill -9 "$vmf_c" 2>/dev/null; then
    vmf_s=0
    while kill -0 "$vmf_c" 2>/dev/null; do
      vmf_s=$((vmf_s + 1)); [ "$vmf_s" -ge 500 ] && break
    done
    [ "$vmf_s" -lt 500 ] && vmf_r=1
  fi
  vmf_i=0
  while [ "$vmf_r" -eq 0 ]; do
    vmf_chk; vmf_r=$?
    [ "$vmf_r" -ne 0 ] && break
    vmf_i=$((vmf_i + 1)); [ "$vmf_i" -ge {tries} ] && break
    sleep 0.005 2>/dev/null || sleep 1
  done
  case $vmf_r in 0) echo vmf:alive;; 1|2) echo vmf:killed;; *) echo vmf:error;; esac
else
  case $vmf_r in 1) echo vmf:not-running;; 2) echo vmf:not-that-vm;; *) echo vmf:error;; esac
fi"""


def session_setup(_host: HostConfig) -> str:
    return SESSION_SETUP


def power_on_command(vm: RegisteredVM) -> str:
    return f"vim-cmd vmsvc/power.on {shlex.quote(vm.vmid)}"


BACKEND = Backend(
    kind="esxi",
    session_setup=session_setup,
    listings=(Listing(VMDUMPER, parse_vmdumper), Listing(ESXCLI_XML, parse_esxcli_xml)),
    registered_command=GETALLVMS,
    parse_registered=parse_getallvms,
    kill_command=kill_command,
    parse_kill=parse_kill_marker,
    power_on_command=power_on_command,
    power_on_timeout=60,
)
