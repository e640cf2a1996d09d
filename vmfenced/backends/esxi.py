"""ESXi: commands a real ESXi shell has (busybox ash) and parsers of their real outputs.

Only `vmdumper -l`, `esxcli --formatter=xml vm process list`, `ps -c`, `kill`,
`vim-cmd vmsvc/getallvms`, `vim-cmd vmsvc/power.on` and POSIX sh builtins are used.
"""

from __future__ import annotations

import re
import shlex
import xml.etree.ElementTree as ET

from vmfenced.backends import Arg, Backend, Listing, ShFunction, parse_kill_marker
from vmfenced.backends.text import check_name, split_lines
from vmfenced.config import HostConfig
from vmfenced.errors import ParseError
from vmfenced.model import RegisteredVM, RunningVM

ESXCLI_NS = "{http://www.vmware.com/Products/ESX/5.0/esxcli}"

# vmdumper lives outside ESXi's default PATH; appended so a host's own PATH still wins.
SESSION_SETUP = 'PATH="$PATH:/usr/lib/vmware/bin"; export PATH; LC_ALL=C; export LC_ALL'
VMDUMPER = "vmdumper -l"
ESXCLI_XML = "esxcli --formatter=xml vm process list"
GETALLVMS = "vim-cmd vmsvc/getallvms"

# One record per line. The cartel ID is the last thing vmdumper prints: the name runs from
# `displayName="` to the line's final `" vmxCartelID=<digits>`, so a name holding `"` or
# `vmxCartelID=` text stays whole and the cartel stays the one vmdumper wrote. Where the path
# ends and the name starts is read twice, with the shortest and with the longest path: a name
# holding `" uuid="..." displayName="`, or a path holding `" uuid="` text, makes the two
# readings disagree, and the line is a doubt. ASCII digits and spaces only (Python's \d and \s
# would take other scripts' digits and Unicode spaces).
_VMDUMPER_FIELDS = (
    r'" +uuid="(?P<uuid>[0-9A-Fa-f \-]*)" +displayName="(?P<name>.*)" +'
    r"vmxCartelID=(?P<cartel>[0-9]+)$"
)
_VMDUMPER_LINE = re.compile(
    r'^vmid=(?P<world>[0-9]+) +pid=-?[0-9]+ +cfgFile="(?P<cfg>.*?)' + _VMDUMPER_FIELDS
)
_VMDUMPER_LONGEST = re.compile(
    r'^vmid=(?P<world>[0-9]+) +pid=-?[0-9]+ +cfgFile="(?P<cfg>.*)' + _VMDUMPER_FIELDS
)
# The File column is the anchor: names contain spaces, and "[datastore] dir/x.vmx" starts the
# File column. A name may itself hold text of that shape ("a [ds1] b.vmx c"): the row is then
# also read with the longest name that leaves a File, Guest OS and Version after it (or, in a
# row without those columns, just a File), and a row the readings disagree on is a doubt, never
# read as a VM called "a" with another VM's file. An annotation mentioning a .vmx rarely has a
# Guest OS and a `vmx-NN` after it, so it does not make its row a doubt.
_GETALLVMS_FILE = r"(?P<file>\[[^\]]+\] *\S.*?\.vmx)(?=[ \t]|$)"
_GETALLVMS_LINE = re.compile(r"^(?P<vmid>[0-9]+)[ \t]+(?P<name>.+?)[ \t]+" + _GETALLVMS_FILE)
_GETALLVMS_LONGEST = (
    re.compile(
        r"^(?P<vmid>[0-9]+)[ \t]+(?P<name>.*\S)[ \t]+"
        + _GETALLVMS_FILE
        + r"[ \t]+\S+[ \t]+vmx-[0-9]+(?=[ \t]|$)"
    ),
    re.compile(r"^(?P<vmid>[0-9]+)[ \t]+(?P<name>.*\S)[ \t]+" + _GETALLVMS_FILE),
)
# A row starts with its Vmid; anything else continues the previous row's annotation.
_GETALLVMS_ROW_START = re.compile(r"^[0-9]+[ \t]")


def _line_text(raw: str) -> str:
    """A line without the spaces and tabs that pad it (never other whitespace: str.strip()
    would also remove \x85, U+2028 and the like, turning "victim\u2028" into "victim")."""
    return raw.strip(" \t")


def _distinct(what: str, vms: list[RunningVM]) -> tuple[RunningVM, ...]:
    """One cartel, one world and one .vmx per running VM: a listing that names one twice was
    forged or garbled. Two VMs may share a display name (they then differ in all three)."""
    for label in ("cartel", "world", ".vmx"):
        seen: dict[object, RunningVM] = {}
        for vm in vms:
            value = {"cartel": vm.cartel, "world": vm.world, ".vmx": vm.config_file}[label]
            if value is None:
                continue
            if value in seen:
                raise ParseError(
                    what, f"{label} {value!r} listed twice ({seen[value].name!r}, {vm.name!r})"
                )
            seen[value] = vm
    return tuple(vms)


def parse_vmdumper(text: str) -> tuple[RunningVM, ...]:
    """`vmdumper -l`. Strict: a line we cannot read could hide a running VM, and a name or
    path holding a control or line-separator character makes the whole listing a doubt."""
    vms = []
    for number, raw in enumerate(split_lines(text), 1):
        line = _line_text(raw)
        if not line:
            continue
        match = _VMDUMPER_LINE.match(line)
        if match is None:
            raise ParseError(VMDUMPER, f"line {number} not understood: {line[:200]!r}")
        longest = _VMDUMPER_LONGEST.match(line)
        if longest is None or longest["cfg"] != match["cfg"]:
            raise ParseError(
                VMDUMPER, f"line {number}: the path and name cannot be told apart: {line[:200]!r}"
            )
        vms.append(
            RunningVM(
                name=check_name(VMDUMPER, match["name"]),
                config_file=check_name(VMDUMPER, match["cfg"]),
                cartel=int(match["cartel"]),
                world=int(match["world"]),
                uuid=match["uuid"] or None,
            )
        )
    return _distinct(VMDUMPER, vms)


def _field(structure: ET.Element, name: str) -> str:
    """The text of one field, as the host wrote it (names are never stripped); a field missing
    or given twice is a doubt."""
    fields = [f for f in structure.iter(f"{ESXCLI_NS}field") if f.get("name") == name]
    if len(fields) != 1:
        raise ParseError(ESXCLI_XML, f"a VirtualMachine has {len(fields)} {name} fields")
    values = list(fields[0])
    if len(values) != 1 or len(values[0]):
        # `.text` would be the text before a nested element: part of a name, read as a name.
        raise ParseError(ESXCLI_XML, f"a {name} field is not one plain value")
    return values[0].text or ""


def _number(structure: ET.Element, name: str) -> int:
    text = _field(structure, name).strip(" \t\n")
    if not text.isascii() or not text.isdigit():
        raise ParseError(ESXCLI_XML, f"non-numeric {name}: {text[:50]!r}")
    return int(text)


def parse_esxcli_xml(text: str) -> tuple[RunningVM, ...]:
    """`esxcli --formatter=xml vm process list`. Names are XML text: a control character in
    one (raw, or as a character reference) is a doubt, as in the other listings."""
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
        vms.append(
            RunningVM(
                name=check_name(ESXCLI_XML, _field(structure, "DisplayName")),
                config_file=check_name(ESXCLI_XML, _field(structure, "ConfigFile")),
                cartel=_number(structure, "VMXCartelID"),
                world=_number(structure, "WorldID"),
                uuid=_field(structure, "UUID").strip(" ") or None,
            )
        )
    return _distinct(ESXCLI_XML, vms)


def parse_getallvms(text: str) -> tuple[RegisteredVM, ...]:
    """`vim-cmd vmsvc/getallvms`: a header, then one row per registered VM.

    A row may be followed by lines continuing its multi-line annotation. Rows start with a
    Vmid and a space, so a line that does not is a continuation, and a real row never hides
    among them; a line that starts like a row must read as one. So a line that starts like a
    row but cannot be read, a Vmid listed twice, or a name or file holding a control or
    line-separator character fails the listing: a registered VM never vanishes silently.

    What vim-cmd's text cannot tell apart: an annotation line shaped like a whole row reads
    as a row. Its Vmid must then be one no real row has, and the power-on re-check on the host
    reads the same text: `vim-cmd vmsvc/power.on` of a Vmid no VM has fails (NotFound).
    """
    lines = split_lines(text)
    if not lines or lines[0].split()[:2] != ["Vmid", "Name"]:
        raise ParseError(GETALLVMS, "missing the 'Vmid Name File' header")
    vms: list[RegisteredVM] = []
    seen: set[str] = set()
    for number, line in enumerate(lines[1:], 2):
        if not _GETALLVMS_ROW_START.match(line):
            if not vms and line.strip(" \t"):
                raise ParseError(GETALLVMS, f"line {number} is not a VM row: {line[:200]!r}")
            continue  # the previous row's annotation goes on
        match = _GETALLVMS_LINE.match(line)
        if match is None:
            raise ParseError(GETALLVMS, f"line {number} not understood: {line[:200]!r}")
        longest = next(filter(None, (r.match(line) for r in _GETALLVMS_LONGEST)), None)
        if longest is None or (longest["name"], longest["file"]) != (match["name"], match["file"]):
            raise ParseError(
                GETALLVMS, f"line {number}: the name and file cannot be told apart: {line[:200]!r}"
            )
        if match["vmid"] in seen:
            raise ParseError(GETALLVMS, f"Vmid {match['vmid']} listed twice")
        seen.add(match["vmid"])
        vms.append(
            RegisteredVM(
                match["vmid"],
                check_name(GETALLVMS, match["name"]),
                check_name(GETALLVMS, match["file"]),
            )
        )
    return tuple(vms)


def vmx_tail(config_file: str) -> str:
    """`/dir/name.vmx`: the part of a .vmx path that survives datastore naming.

    The same file may appear as /vmfs/volumes/<uuid>/dir/x.vmx in one listing and
    /vmfs/volumes/<label>/dir/x.vmx in another, or `[label] dir/x.vmx` in vim-cmd.
    """
    parts = config_file.replace("] ", "]/").rsplit("/", 2)
    return "/" + "/".join(parts[-2:]) if len(parts) >= 2 else config_file


def _kill_function() -> ShFunction:
    """`vmf_kill VMX_TAIL CARTEL TRIES`, one round trip: check the cartel runs this VM's .vmx,
    kill -9 it, wait until it is gone (TRIES checks 5 ms apart).

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
    body = r"""vmf_chk() {
  { ps -c 2>&1; echo "vmf:ps=$?"; } |
  awk -v c="$vmf_c" 'BEGIN { v = ENVIRON["VMF_VMX"] " "; r = 1 }
    NR == 1 && /CID/ { h = 1; next }
    !h { exit }
    /^vmf:ps=/ { s = substr($0, 8); next }
    $2 == c { if (index($0 " ", v)) { r = 0; exit } r = 2 }
    END { if (!h) exit 3; if (r == 0) exit 0; if (s != "0") exit 3; exit r }'
}
vmf_kill() {
  VMF_VMX=$1; export VMF_VMX; vmf_c=$2; vmf_tries=$3
  # Only a VM's cartel: the text looked for in its `ps -c` rows is a /dir/name.vmx tail (a
  # helper request could otherwise name any text, and so any cartel).
  case $VMF_VMX in
    /*.vmx) ;;
    *) printf 'not a .vmx path: %s\n' "$VMF_VMX"; echo vmf:error; return 0;;
  esac
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
      vmf_i=$((vmf_i + 1)); [ "$vmf_i" -ge "$vmf_tries" ] && break
      sleep 0.005 2>/dev/null || sleep 1
    done
    case $vmf_r in 0) echo vmf:alive;; 1|2) echo vmf:killed;; *) echo vmf:error;; esac
  else
    case $vmf_r in 1) echo vmf:not-running;; 2) echo vmf:not-that-vm;; *) echo vmf:error;; esac
  fi
}"""
    return ShFunction("vmf_kill", ("str", "num", "num"), body)


KILL = _kill_function()


def kill_args(vm: RunningVM, budget: float) -> tuple[Arg, ...]:
    return (vmx_tail(vm.config_file), vm.cartel, max(1, int(budget / 0.01)))


def kill_command(vm: RunningVM, budget: float) -> str:
    return KILL.call(*kill_args(vm, budget))


def session_setup(_host: HostConfig) -> str:
    return SESSION_SETUP


def setup(_libvirt_uri: str) -> str:
    return SESSION_SETUP


# Reads `vim-cmd vmsvc/getallvms` on stdin; exits 0 when exactly one row (a line starting with
# the Vmid and a space, as parse_getallvms reads rows) has Vmid ENVIRON["VMF_ID"] and that
# row's Name and File are ENVIRON["VMF_NAME"] and ENVIRON["VMF_FILE"] (whole, between column
# gaps), 1 when no row has that Vmid, 2 when it names something else or is listed twice, 3
# without the header. Names are compared as strings, never parsed as awk text.
_POWER_ON_CHECK = r"""
function gap(s) { return match(s, /^[ \t]+/) ? substr(s, RLENGTH + 1) : "\n" }
NR == 1 { h = ($1 == "Vmid"); next }
{ id = ENVIRON["VMF_ID"]; name = ENVIRON["VMF_NAME"]; file = ENVIRON["VMF_FILE"] }
substr($0, 1, length(id)) == id "" && substr($0, length(id) + 1, 1) ~ /^[ \t]$/ {
  n++
  r = gap(substr($0, length(id) + 1))
  if (substr(r, 1, length(name)) != name) next
  r = gap(substr(r, length(name) + 1))
  if (substr(r, 1, length(file)) != file) next
  r = substr(r, length(file) + 1)
  if (r == "" || r ~ /^[ \t]/) same++
}
END { if (!h) exit 3; if (n == 0) exit 1; if (n == 1 && same == 1) exit 0; exit 2 }
"""


def _power_on_function() -> ShFunction:
    """`vmf_on VMID NAME FILE`: power on Vmid VMID, after checking on the host, in the same
    command, that this Vmid still names that VM (same Name and File in
    `vim-cmd vmsvc/getallvms`).

    A Vmid is only a handle of one host's inventory: after a reload points a host name at
    another machine, or the VM was unregistered and another took its Vmid, the same number
    starts an unrelated VM. On a mismatch the command prints one `vmf:refused ...` line and
    returns non-zero, starting nothing. A function, not a subshell `exit`: the command runs in
    the lane's long-lived shell.
    """
    body = f"""vmf_on() {{
  VMF_ID=$1; VMF_NAME=$2; VMF_FILE=$3; export VMF_ID VMF_NAME VMF_FILE
  if ! vmf_l=$(vim-cmd vmsvc/getallvms 2>&1); then
    printf '%s\\n' "$vmf_l" | tail -n 3
    printf 'vmf:refused vim-cmd vmsvc/getallvms failed: cannot check what Vmid %s is\\n' "$VMF_ID"
    return 1
  fi
  printf '%s\\n' "$vmf_l" | awk {shlex.quote(_POWER_ON_CHECK)}
  case $? in
    0) vim-cmd vmsvc/power.on "$VMF_ID"; return;;
    1) printf 'vmf:refused no Vmid %s on this host: nothing powered on\\n' "$VMF_ID";;
    2) printf 'vmf:refused Vmid %s is no longer %s (%s) here: not powered on\\n' \\
         "$VMF_ID" "$VMF_NAME" "$VMF_FILE";;
    *) printf 'vmf:refused no getallvms table: cannot check what Vmid %s is\\n' "$VMF_ID";;
  esac
  return 1
}}"""
    return ShFunction("vmf_on", ("str", "str", "str"), body)


POWER_ON = _power_on_function()


def power_on_args(vm: RegisteredVM) -> tuple[Arg, ...]:
    return (vm.vmid, vm.name, vm.config_file)


def power_on_command(vm: RegisteredVM) -> str:
    return POWER_ON.call(*power_on_args(vm))


LISTINGS = (
    Listing(ShFunction("vmf_vmdumper", (), f"vmf_vmdumper() {{\n  {VMDUMPER}\n}}"), parse_vmdumper),
    Listing(ShFunction("vmf_esxcli", (), f"vmf_esxcli() {{\n  {ESXCLI_XML}\n}}"), parse_esxcli_xml),
)
REGISTERED = ShFunction("vmf_getallvms", (), f"vmf_getallvms() {{\n  {GETALLVMS}\n}}")


BACKEND = Backend(
    kind="esxi",
    setup=setup,
    listings=LISTINGS,
    registered=REGISTERED,
    parse_registered=parse_getallvms,
    kill=KILL,
    kill_args=kill_args,
    parse_kill=parse_kill_marker,
    power_on=POWER_ON,
    power_on_args=power_on_args,
    power_on_timeout=60,
)
