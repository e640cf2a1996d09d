"""libvirt/KVM: commands of a Linux host running libvirtd (qemu driver) and their parsers.

The fence path (running-VM listing, guarded kill) reads `/run/libvirt/qemu/*.pid` and `/proc`
with sh builtins and one awk: one round trip of a few ms that does not need libvirtd, so a host
whose libvirtd hangs or restarts can still be fenced. `virsh` serves the fallback listing, the
registered-VM listing and power-on.

A qemu started by libvirt carries `-name guest=NAME,debug-threads=on`, NAME escaped the qemu
keyval way (`,,` is a literal comma), and `-uuid UUID`. The guard decodes that argument exactly,
so `vm1` never matches the qemu of `vm10` or of `vm1,x`. Its pid file is `RUN_DIR/FILE.pid`,
FILE being NAME with `&`, `'`, `"`, `<`, `>` written as XML entities (`a&b` -> `a&amp;b.pid`,
libvirt 9.0): a VM is identified by names the host reports, decoded (qemu's own guest=, the
decoded file name, virsh's output), never by comparing one encoding of a name with another.

A name holding a control or line-separator character (libvirt accepts tab, CR, U+0085, U+2028)
fails the listing that reports it, with that reason: no listing can carry it unambiguously, so
the host's answer is a doubt rather than a guess.
"""

from __future__ import annotations

import re
import shlex

from vmfenced.backends import Arg, Backend, Listing, ShFunction, parse_kill_marker, procfs
from vmfenced.backends.text import check_name, split_lines
from vmfenced.config import HostConfig
from vmfenced.errors import ParseError
from vmfenced.model import RegisteredVM, RunningVM

RUN_DIR = "/run/libvirt/qemu"
SYSTEM_URI = "qemu:///system"
REGISTERED = "virsh list --all --uuid --name"
# Older virsh may refuse --uuid with --name: then names alone, power-on by name.
REGISTERED_FUNCTION = ShFunction(
    "vmf_registered",
    (),
    f"""vmf_registered() {{
  if vmf_o=$({REGISTERED} 2>&1); then
    printf 'vmf:uuid-name\\n%s\\n' "$vmf_o"
  else
    vmf_o=$(virsh list --all --name) && printf 'vmf:name\\n%s\\n' "$vmf_o"
  fi
}}""",
)
REGISTERED_COMMAND = REGISTERED_FUNCTION.call()

_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_VM_LINE = re.compile(rf"^vmf:vm (?P<pid>[1-9][0-9]*) (?P<uuid>{_UUID}|-) (?P<name>.+)$")
_UUID_NAME = re.compile(rf"^(?P<uuid>{_UUID}) (?P<name>.+)$")

# vmf_guest decodes a qemu `-name` argument (guest=NAME, `,,` a literal comma); vmf_unxml decodes
# a pid file's name (libvirt names it NAME.pid with &, ', ", <, > written as XML entities, so a
# name never equals its file name when it holds one of them); both return "\n" for what they
# cannot decode, and a name holding "\n" (libvirt refuses it) is never decoded. vmf_qemu_comm: the
# comm of a process that could be a qemu (qemu-system-*, qemu-kvm, the old `kvm` wrapper's).
# The /proc helpers (vmf_args, vmf_stat, vmf_dead, vmf_kthread, vmf_opt) are shared with the
# other Linux backends.
_AWK_LIB = (
    procfs.AWK_LIB
    + r"""
function vmf_guest(v,   n, i, c, e, el) {
  if (index(v, "\n")) return "\n"
  n = 0; e = ""
  for (i = 1; i <= length(v) + 1; i++) {
    c = substr(v, i, 1)
    if (c == "," && substr(v, i + 1, 1) == ",") { e = e ","; i++; continue }
    if (c != "," && i <= length(v)) { e = e c; continue }
    el[++n] = e; e = ""
  }
  for (i = 1; i <= n; i++) {
    if (substr(el[i], 1, 6) == "guest=") return substr(el[i], 7)
    if (i == 1 && index(el[1], "=") == 0) return el[1]
  }
  return "\n"
}
function vmf_unxml(f,   d, i, t) {
  if (index(f, "\n")) return "\n"
  d = ""
  while ((i = index(f, "&")) > 0) {
    d = d substr(f, 1, i - 1); t = substr(f, i)
    if (substr(t, 1, 5) == "&amp;") { d = d "&"; f = substr(t, 6) }
    else if (substr(t, 1, 6) == "&apos;") { d = d "'"; f = substr(t, 7) }
    else if (substr(t, 1, 6) == "&quot;") { d = d "\""; f = substr(t, 7) }
    else if (substr(t, 1, 4) == "&lt;") { d = d "<"; f = substr(t, 5) }
    else if (substr(t, 1, 4) == "&gt;") { d = d ">"; f = substr(t, 5) }
    else return "\n"
  }
  return d f
}
function vmf_qemu_comm() { return C ~ /^qemu/ || C == "kvm" }
"""
)

# Argument pairs "PID FILE" (FILE: the pid file's name without .pid); prints one
# `vmf:vm PID UUID NAME` per domain whose qemu still runs under that PID, NAME as qemu's own
# `-name guest=` says it, then `vmf:end`. Exit 3 on any doubt: a pid file name we cannot decode,
# a live process we cannot judge, or the qemu of another domain under that PID.
_AWK_PIDFILES = (
    _AWK_LIB
    + r"""
BEGIN {
  RS = "\0"
  for (i = 1; i + 1 < ARGC; i += 2) {
    p = ARGV[i]; name = vmf_unxml(ARGV[i + 1])
    if (name == "\n") { print "vmf:doubt pid file name not understood: " ARGV[i + 1]; exit 3 }
    if (!vmf_stat(p) || vmf_dead()) continue
    # A kernel thread reused the PID after this domain's qemu died.
    if (vmf_kthread()) continue
    vmf_n = vmf_args(p)
    if (vmf_n <= 0) {
      if (!vmf_stat(p) || vmf_dead()) continue
      if (S[1] == "Z") { print "vmf:doubt " p " (" name ") is exiting, threads still run"; exit 3 }
      print "vmf:doubt cannot read the command line of " p " (" name ")"; exit 3
    }
    # A program without -name reused the PID after this domain's qemu died.
    o = vmf_opt("-name")
    if (o == "\n") continue
    g = vmf_guest(o)
    if (g != name) {
      print "vmf:doubt pid file of " name " holds " p ", a qemu -name " o; exit 3
    }
    u = vmf_opt("-uuid")
    print "vmf:vm " p " " (u == "\n" ? "-" : u) " " g
  }
  print "vmf:end"
}
"""
)

# Running domain names on stdin (from virsh); argv = every /proc/PID/cmdline. Each name must
# match exactly one live qemu process naming it. A live process whose command line reads empty
# or not at all is a doubt when its comm could be a qemu: skipping it could hide a running VM.
# Any other such process is skipped: every process reads empty for a moment while it exits, and
# failing the listing for each would fail it at random on a busy host.
_AWK_SCAN = (
    _AWK_LIB
    + r"""
BEGIN {
  while ((r = (getline line < "-")) > 0) if (line != "") want[line] = 1
  if (r < 0) { print "vmf:doubt cannot read the domain names"; exit 3 }
  RS = "\0"
  for (i = 1; i < ARGC; i++) {
    f = ARGV[i]; p = f
    sub(/^\/proc\//, "", p); sub(/\/cmdline$/, "", p)
    if (!vmf_stat(p) || vmf_dead() || vmf_kthread()) continue
    vmf_n = vmf_args(p)
    if (vmf_n <= 0) {
      if (!vmf_stat(p) || vmf_dead() || !vmf_qemu_comm()) continue
      print "vmf:doubt cannot judge " p " (" C ", state " S[1] "): its command line reads empty"
      exit 3
    }
    # Names no domain virsh listed (or none at all): a running domain without its
    # process is a doubt below.
    name = vmf_guest(vmf_opt("-name"))
    if (!(name in want)) continue
    if (name in pid) { print "vmf:doubt two processes name " name; exit 3 }
    u = vmf_opt("-uuid")
    pid[name] = p; uuid[name] = (u == "\n" ? "-" : u)
  }
  for (name in want) {
    if (!(name in pid)) { print "vmf:doubt no process for running domain " name; exit 3 }
    print "vmf:vm " pid[name] " " uuid[name] " " name
  }
  print "vmf:end"
}
"""
)

# One process (PID in ARGV[1], name in ENVIRON["VMF_NAME"]): prints its starttime and exits
# 10 when it is that domain's qemu, 11 gone or dead, 12 something else, 13 no verdict.
# The comm must be a qemu's too: through the host helper the requester chooses the PID, and
# other programs take `-name X` (an Erlang node's beam.smp, `find -name`).
_AWK_CHECK = procfs.check_awk(
    _AWK_LIB, 'vmf_qemu_comm() && vmf_guest(vmf_opt("-name")) == ENVIRON["VMF_NAME"]'
)


def setup(libvirt_uri: str) -> str:
    """virsh talks to the host's configured libvirtd; C locale for byte-exact name matching."""
    return (
        f"LIBVIRT_DEFAULT_URI={shlex.quote(libvirt_uri)}; export LIBVIRT_DEFAULT_URI; "
        'LC_ALL=C; export LC_ALL; PATH="$PATH:/usr/sbin:/sbin"; export PATH'
    )


def session_setup(host: HostConfig) -> str:
    return setup(host.libvirt_uri)


def pidfile_listing(run_dir: str = RUN_DIR) -> str:
    return pidfile_function(run_dir).call()


def pidfile_function(run_dir: str = RUN_DIR) -> ShFunction:
    """Running domains from libvirt's pid files, each checked against /proc (no libvirtd).

    Only for qemu:///system, whose pid files live in `run_dir`; other URIs fall back to virsh.
    A pid file that cannot be read, or a /proc that hides processes, is a doubt (exit 3).
    """
    run = shlex.quote(run_dir)
    body = f"""vmf_ls() {{
  [ "${{LIBVIRT_DEFAULT_URI:-{SYSTEM_URI}}}" = {SYSTEM_URI} ] || {{
    echo "vmf:doubt not {SYSTEM_URI}"; return 3; }}
  [ -r /proc/1/stat ] || {{ echo "vmf:doubt /proc hides processes"; return 3; }}
  [ -d {run} ] || {{ echo "vmf:doubt no {run}"; return 3; }}
  set --
  for vmf_f in {run}/*.pid; do
    [ -e "$vmf_f" ] || continue
{procfs.READ_PID_FILE}    vmf_n=${{vmf_f##*/}}
    set -- "$@" "$vmf_v" "${{vmf_n%.pid}}"
  done
  awk {shlex.quote(_AWK_PIDFILES)} "$@"
}}"""
    return ShFunction("vmf_ls", (), body)


def virsh_listing() -> str:
    return VIRSH_LISTING.call()


VIRSH_LISTING = ShFunction(
    "vmf_vl",
    (),
    # Fallback: `virsh list --name`, each running domain matched to its qemu in /proc.
    f"""vmf_vl() {{
  [ -r /proc/1/stat ] || {{ echo "vmf:doubt /proc hides processes"; return 3; }}
  vmf_o=$(virsh list --name 2>&1) || {{ printf '%s\\n' "$vmf_o"; return 3; }}
  printf '%s\\n' "$vmf_o" | awk {shlex.quote(_AWK_SCAN)} /proc/[0-9]*/cmdline
}}""",
)


def pid_file(name: str) -> str:
    """Where libvirt writes the qemu PID of domain `name` (its XML-escaped name, libvirt 9.0)."""
    escaped = name.replace("&", "&amp;").replace("'", "&apos;").replace('"', "&quot;")
    return f"{RUN_DIR}/{escaped.replace('<', '&lt;').replace('>', '&gt;')}.pid"


def parse_vm_lines(text: str) -> tuple[RunningVM, ...]:
    """`vmf:vm PID UUID NAME` lines ended by `vmf:end`; anything else is an error."""
    what = "libvirt listing"
    vms = [
        RunningVM(
            name=check_name(what, match["name"]),
            config_file=pid_file(match["name"]),
            cartel=int(match["pid"]),
            uuid=None if match["uuid"] == "-" else match["uuid"].lower(),
        )
        for match in procfs.marked_lines(text, what, _VM_LINE)
    ]
    names = [vm.name for vm in vms]
    if len(set(names)) != len(names):
        raise ParseError(what, "a domain is listed twice")
    return tuple(vms)


def parse_registered(text: str) -> tuple[RegisteredVM, ...]:
    """`vmf:uuid-name` then `virsh list --all --uuid --name` (`UUID NAME` lines), or
    `vmf:name` then `virsh list --all --name`; virsh ends both with a blank line."""
    lines = split_lines(text)
    if not lines or lines[0] not in ("vmf:uuid-name", "vmf:name"):
        raise ParseError(REGISTERED, f"unexpected answer: {text.strip()[:300]!r}")
    vms = []
    for number, line in enumerate(lines[1:], 2):
        if not line:
            continue
        if lines[0] == "vmf:name":
            name = check_name(REGISTERED, line)
            vms.append(RegisteredVM(vmid=name, name=name, config_file=""))
            continue
        match = _UUID_NAME.match(line)
        if match is None:
            raise ParseError(REGISTERED, f"line {number} not understood: {line[:200]!r}")
        uuid = match["uuid"].lower()
        # The UUID is the power-on handle: virsh would read a name like "5" as a domain ID.
        name = check_name(REGISTERED, match["name"])
        vms.append(RegisteredVM(vmid=uuid, name=name, config_file=f"uuid {uuid}"))
    return tuple(vms)


def kill_command(vm: RunningVM, budget: float) -> str:
    """One round trip: check the PID runs this domain's qemu, kill -9 it, wait until it is dead.

    Dead means: /proc/PID gone, or a zombie whose last thread has exited (a zombie leader with
    threads still in the kernel may still have I/O in flight), or the PID now belongs to a
    process started later (starttime differs: reused after our kill was reaped).
    A check that cannot conclude is `vmf:error`, never "not running".
    """
    return KILL.call(*kill_args(vm, budget))


KILL = procfs.kill_function("VMF_NAME", _AWK_CHECK)


def kill_args(vm: RunningVM, budget: float) -> tuple[Arg, ...]:
    return (vm.name, vm.cartel, procfs.kill_tries(budget))


def power_on_args(vm: RegisteredVM) -> tuple[Arg, ...]:
    return (vm.vmid, vm.name)


def power_on_command(vm: RegisteredVM) -> str:
    return POWER_ON.call(*power_on_args(vm))


# `vmf_on HANDLE NAME`: `virsh start`, once libvirtd has seen the previous qemu die (it lags a
# kill -9 ~0.2 s), and only if the handle (the UUID) still names this domain: it may have been
# undefined and its UUID given to another domain since the inventory was taken. The name is
# compared as data, in the same command as the start. From an older virsh without --uuid the
# handle is the name itself: nothing to re-check.
POWER_ON = ShFunction(
    "vmf_on",
    ("str", "str"),
    """vmf_on() {
  vmf_d=$1; VMF_NAME=$2
  vmf_i=0
  while vmf_s=$(virsh domstate --domain "$vmf_d" 2>&1); do
    case $vmf_s in "shut off"*|crashed*) break;; esac
    vmf_i=$((vmf_i + 1)); [ "$vmf_i" -ge 300 ] && break
    sleep 0.05 2>/dev/null || sleep 1
  done
  if [ "$vmf_d" != "$VMF_NAME" ]; then
    vmf_n=$(virsh domname --domain "$vmf_d" 2>&1) || {
      printf 'vmf:refused cannot name %s: %s\\n' "$vmf_d" "$vmf_n"; return 1; }
    [ "$vmf_n" = "$VMF_NAME" ] || {
      printf 'vmf:refused %s now names another domain: %s\\n' "$vmf_d" "$vmf_n"; return 1; }
  fi
  virsh start --domain "$vmf_d"
}""",
)


BACKEND = Backend(
    kind="libvirt",
    setup=setup,
    listings=(
        Listing(pidfile_function(), parse_vm_lines),
        Listing(VIRSH_LISTING, parse_vm_lines),
    ),
    registered=REGISTERED_FUNCTION,
    parse_registered=parse_registered,
    kill=KILL,
    kill_args=kill_args,
    parse_kill=parse_kill_marker,
    power_on=POWER_ON,
    power_on_args=power_on_args,
    power_on_timeout=60,
    ident="libvirt-uri",
)
