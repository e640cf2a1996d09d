"""ESX 3.x "classic": the RHEL-based service console, where each running VM is a `vmware-vmx`
process whose last argument is the VM's .vmx path. There is no esxcli or vmdumper.

The fence path reads /proc with one awk (the helpers shared with libvirt in `procfs`): one
native round trip of a few ms. `ps -e -ww -o pid=,args=` is the fallback listing. `vmware-cmd`
(a Perl runtime, about 3.5 s per call) serves only the registered-VM listing and power-on, on
the inventory lane.

A VM's name is its .vmx file's name without `.vmx` (`/vmfs/volumes/ds1/node2/node2.vmx` ->
`node2`); cluster node names that differ are mapped with [aliases]. The guard compares the
.vmx path exactly, argument for argument, so `node1.vmx` never matches `node10.vmx`.
"""

from __future__ import annotations

import re
import shlex

from vmfenced.backends import Arg, Backend, Listing, ShFunction, parse_kill_marker, procfs
from vmfenced.backends.text import check_name, split_lines
from vmfenced.config import HostConfig
from vmfenced.errors import ParseError
from vmfenced.model import RegisteredVM, RunningVM

VMX_PROCESS = "vmware-vmx"
PS_LISTING = "ps -e -ww -o pid=,args="
REGISTERED_COMMAND = "vmware-cmd -l"

_VM_LINE = re.compile(r"^vmf:vm (?P<pid>[1-9][0-9]*) (?P<vmx>/.*\.vmx)$")
_PS_LINE = re.compile(r"^ *(?P<pid>[1-9][0-9]*) (?P<args>.*)$")

# vmf_vmx: the last argument ending in .vmx ("\n": none); vmf_is_vmx: argv[0] is vmware-vmx.
_AWK_LIB = (
    procfs.AWK_LIB
    + r"""
function vmf_vmx(   i) {
  for (i = vmf_n; i > 1; i--) if (A[i] ~ /\.vmx$/) return A[i]
  return "\n"
}
function vmf_is_vmx() { return A[1] ~ /(^|\/)vmware-vmx$/ }
"""
)

# argv = every /proc/PID/cmdline; one `vmf:vm PID PATH` per live vmware-vmx, then `vmf:end`.
# A live process whose command line reads empty or not at all (a zombie leader whose threads
# still run, an emptied argv area) is a doubt when its comm could be a vmware-vmx: skipping it
# could hide a running VM. Any other such process is skipped: every process reads empty for a
# moment while it exits, and failing the listing for each would fail it at random. (No
# PF_KTHREAD test: it exists from Linux 2.6.27, the service console runs a 2.4 kernel, and
# no kernel thread is called vmware-vmx.)
_AWK_SCAN = (
    _AWK_LIB
    + r"""
BEGIN {
  RS = "\0"
  for (i = 1; i < ARGC; i++) {
    p = ARGV[i]
    sub(/^\/proc\//, "", p); sub(/\/cmdline$/, "", p)
    if (!vmf_stat(p) || vmf_dead()) continue
    vmf_n = vmf_args(p)
    if (vmf_n <= 0) {
      if (!vmf_stat(p) || vmf_dead() || C !~ /^vmware-vmx/) continue
      print "vmf:doubt cannot judge " p " (" C ", state " S[1] "): its command line reads empty"
      exit 3
    }
    if (!vmf_is_vmx()) continue
    v = vmf_vmx()
    if (v == "\n") { print "vmf:doubt vmware-vmx " p " has no .vmx argument"; exit 3 }
    if (index(v, "\n") || substr(v, 1, 1) != "/") {
      print "vmf:doubt vmware-vmx " p " has an unusable .vmx path"; exit 3
    }
    print "vmf:vm " p " " v
  }
  print "vmf:end"
}
"""
)

# One process (PID in ARGV[1], .vmx path in ENVIRON["VMF_VMX"]): prints its starttime and exits
# 10 when it is that VM's vmware-vmx, 11 gone or dead, 12 something else, 13 no verdict.
_AWK_CHECK = procfs.check_awk(_AWK_LIB, 'vmf_is_vmx() && vmf_vmx() == ENVIRON["VMF_VMX"]')


def setup(_libvirt_uri: str) -> str:
    # vmware-cmd lives in /usr/bin on the service console; sbin for tools of root's PATH.
    return 'LC_ALL=C; export LC_ALL; PATH="$PATH:/usr/bin:/usr/sbin:/sbin"; export PATH'


def session_setup(host: HostConfig) -> str:
    return setup(host.libvirt_uri)


def vm_name(vmx: str) -> str:
    """`/vmfs/volumes/ds1/node 2/node 2.vmx` -> `node 2`."""
    return vmx.rsplit("/", 1)[-1].removesuffix(".vmx")


def proc_listing() -> str:
    return PROC_LISTING.call()


PROC_LISTING = ShFunction(
    "vmf_ls",
    (),
    f"""vmf_ls() {{
  [ -r /proc/1/stat ] || {{ echo "vmf:doubt /proc hides processes"; return 3; }}
  awk {shlex.quote(_AWK_SCAN)} /proc/[0-9]*/cmdline
}}""",
)


def _running(what: str, pid: int, vmx: str) -> RunningVM:
    """A vmware-vmx process; a path holding a control or line-separator character is a doubt."""
    check_name(what, vmx)
    return RunningVM(name=vm_name(vmx), config_file=vmx, cartel=pid)


def _unique(command: str, vms: list[RunningVM]) -> tuple[RunningVM, ...]:
    """The same .vmx twice is one VM listed twice (a garbled listing): an error. Two .vmx files
    with the same base name in different directories are two VMs with one name: both kept."""
    seen: dict[str, int] = {}
    for vm in vms:
        if vm.config_file in seen:
            raise ParseError(
                command, f"{vm.config_file!r} runs twice (PIDs {seen[vm.config_file]}, {vm.cartel})"
            )
        seen[vm.config_file] = vm.cartel
    return tuple(vms)


def parse_proc_listing(text: str) -> tuple[RunningVM, ...]:
    """`vmf:vm PID PATH` lines ended by `vmf:end`; anything else is an error."""
    what = "esx-classic listing"
    # Checked before any splitting: a path holding \r, \x85, U+2028... is one line here and
    # must fail the listing, whatever the line splitter of the shared helper does with it.
    for line in split_lines(text):
        check_name(what, line)
    vms = [
        _running(what, int(m["pid"]), m["vmx"]) for m in procfs.marked_lines(text, what, _VM_LINE)
    ]
    return _unique(what, vms)


def parse_ps(text: str) -> tuple[RunningVM, ...]:
    """`ps -e -ww -o pid=,args=`: vmware-vmx lines, the .vmx path being the last argument.

    ps joins argv with spaces, so a path with spaces is read as the text from the " /" that
    starts it to the end; vmware-vmx's options hold no " /" (`-@ pipe=/tmp/...`). A line with
    two " /" could be read as a shorter path (`/ds1/x /ds1/victim/victim.vmx` is one path):
    it is a doubt, as is a control character anywhere in it. A zombie shows as
    `[vmware-vmx] <defunct>` and is skipped. A vmware-vmx line without a readable .vmx path is
    an error: it could hide a running VM. ps shows a character it cannot print (a control
    character; any non-ASCII byte in the C locale) as `?`: a path holding `?` may not be the
    path of the process, so it is an error too, never a VM under another name.
    """
    vms = []
    for number, line in enumerate(split_lines(text), 1):
        if not line.strip(" \t"):
            continue
        match = _PS_LINE.match(line)
        if match is None:
            raise ParseError(PS_LISTING, f"line {number} not understood: {line[:200]!r}")
        args = match["args"].rstrip(" ")
        argv0 = args.split(" ", 1)[0]
        if argv0 != VMX_PROCESS and not argv0.endswith("/" + VMX_PROCESS):
            continue
        check_name(PS_LISTING, args)
        at = args.find(" /")
        if at < 0 or not args.endswith(".vmx"):
            raise ParseError(PS_LISTING, f"line {number}: no .vmx path in {args[:200]!r}")
        if args.rfind(" /") != at:
            raise ParseError(
                PS_LISTING, f"line {number}: cannot tell where the .vmx path starts: {args[:200]!r}"
            )
        vmx = args[at + 1 :]
        if "?" in vmx:
            raise ParseError(
                PS_LISTING, f"line {number}: ps replaced characters of the path: {vmx[:200]!r}"
            )
        vms.append(_running(PS_LISTING, int(match["pid"]), vmx))
    return _unique(PS_LISTING, vms)


def parse_registered(text: str) -> tuple[RegisteredVM, ...]:
    """`vmware-cmd -l`: one registered .vmx path per line; the path is the power-on handle."""
    vms = []
    for number, raw in enumerate(split_lines(text), 1):
        line = raw.strip(" \t")
        if not line:
            continue
        if not line.startswith("/") or not line.endswith(".vmx"):
            raise ParseError(REGISTERED_COMMAND, f"line {number} not a .vmx path: {line[:200]!r}")
        check_name(REGISTERED_COMMAND, line)
        vms.append(RegisteredVM(vmid=line, name=vm_name(line), config_file=line))
    return tuple(vms)


KILL = procfs.kill_function("VMF_VMX", _AWK_CHECK)


def kill_args(vm: RunningVM, budget: float) -> tuple[Arg, ...]:
    """Check /proc/PID/cmdline still runs this .vmx, kill -9, wait until gone or a dead zombie."""
    return (vm.config_file, vm.cartel, procfs.kill_tries(budget))


def kill_command(vm: RunningVM, budget: float) -> str:
    return KILL.call(*kill_args(vm, budget))


# Reads `vmware-cmd -l` on stdin; exits 0 when a line is exactly ENVIRON["VMF_VMX"].
_POWER_ON_CHECK = r"""
{ l = $0; sub(/^[ \t]+/, "", l); sub(/[ \t]+$/, "", l); if (l "" == ENVIRON["VMF_VMX"] "") n++ }
END { exit n ? 0 : 1 }
"""


def power_on_command(vm: RegisteredVM) -> str:
    """`vmware-cmd PATH start`, after checking on the host, in the same command, that
    `vmware-cmd -l` still lists that exact .vmx path (a host name reloaded to point at another
    machine must not start whatever that machine has there). On a mismatch one
    `vmf:refused ...` line and a non-zero status; a function, not `exit`: the command runs in
    the lane's long-lived shell.
    """
    return POWER_ON.call(*power_on_args(vm))


def power_on_args(vm: RegisteredVM) -> tuple[Arg, ...]:
    return (vm.vmid,)


POWER_ON = ShFunction(
    "vmf_on",
    ("str",),
    f"""vmf_on() {{
  VMF_VMX=$1; export VMF_VMX
  if ! vmf_l=$(vmware-cmd -l 2>&1); then
    printf '%s\\n' "$vmf_l" | tail -n 3
    printf 'vmf:refused vmware-cmd -l failed: cannot check that %s is registered here\\n' "$VMF_VMX"
    return 1
  fi
  if ! printf '%s\\n' "$vmf_l" | awk {shlex.quote(_POWER_ON_CHECK)}; then
    printf 'vmf:refused %s is not registered on this host: not powered on\\n' "$VMF_VMX"
    return 1
  fi
  vmware-cmd "$VMF_VMX" start
}}""",
)


BACKEND = Backend(
    kind="esx-classic",
    setup=setup,
    listings=(
        Listing(PROC_LISTING, parse_proc_listing),
        Listing(ShFunction("vmf_ps", (), f"vmf_ps() {{\n  {PS_LISTING}\n}}"), parse_ps),
    ),
    registered=ShFunction("vmf_registered", (), f"vmf_registered() {{\n  {REGISTERED_COMMAND}\n}}"),
    parse_registered=parse_registered,
    kill=KILL,
    kill_args=kill_args,
    parse_kill=parse_kill_marker,
    power_on=POWER_ON,
    power_on_args=power_on_args,
    power_on_timeout=60,
)
