"""Proxmox VE: commands of a Proxmox node (qemu-server VMs, no libvirt) and their parsers.

Identity is the VMID. A VM's name is the `name:` of the current section of its config
(`/etc/pve/nodes/<node>/qemu-server/<vmid>.conf`, the part before the first `[`), `vm<vmid>`
when unset: a rename changes that at once, while the running kvm keeps the `-name` it was
started with, so the kvm's `-name` is never read. A request may name a VM by its name or by
its VMID (docs/proxmox.md).

The fence path (running-VM listing, guarded kill) reads `/var/run/qemu-server/<vmid>.pid` and
/proc with sh builtins and one awk, as Proxmox's own running check does (qemu-server
`instance_running_locally`): the pid file's process is that VM's when its argv[0] ends in `kvm`
or is `.../qemu-*`, its `-pidfile` is that very file and its `-id` (when present: upstream qemu
has no such option) is the VMID. A zombie is gone; any other live process under that PID is a
doubt that fails the listing, never "not running".

Registrations (the whole cluster's, from any node) are read in `proxmox_cluster`; the HA stack
and power-on in `proxmox_ha`.
"""

from __future__ import annotations

import re
import shlex

from vmfenced.backends import Arg, Backend, Listing, ShFunction, parse_kill_marker, procfs
from vmfenced.backends.proxmox_cluster import (
    AWK_LIB,
    NODE,
    PVE_DIR,
    RUN_DIR,
    VMID,
    VMID_RE,
    awk,
    check_program,
    conf_path,
    parse_registered,
    registered_function,
)
from vmfenced.backends.proxmox_ha import (
    HA_START_WAIT,
    HOLD_OFF,
    POWER_ON,
    parse_hold_off,
    power_on_args,
)
from vmfenced.backends.text import check_name
from vmfenced.config import HostConfig
from vmfenced.errors import ParseError
from vmfenced.model import RunningVM

_VM_LINE = re.compile(
    rf"^vmf:vm (?P<pid>[1-9][0-9]*) (?P<vmid>{VMID}) (?P<node>{NODE}) (?P<name>.+)$"
)

# Argument triples "PID VMID NODE" (NODE: where the VM's config lives, "-" for none); prints one
# `vmf:vm PID VMID NODE NAME` per VM whose kvm still runs under that PID, then `vmf:end`.
# Exit 3 on any doubt. A running VMID with no config on any node is one: at the end of a live
# migration the config moves between the glob's per-node checks, and a VM listed without its
# name would be unseen by a request that names it.
_AWK_PIDFILES = (
    AWK_LIB
    + r"""
BEGIN {
  RS = "\0"
  for (i = 1; i + 2 < ARGC; i += 3) {
    p = ARGV[i]; v = ARGV[i + 1]; o = ARGV[i + 2]
    if (!vmf_stat(p) || vmf_dead()) continue
    vmf_n = vmf_args(p)
    if (vmf_n <= 0) {
      if (!vmf_stat(p) || vmf_dead()) continue
      if (S[1] == "Z") { print "vmf:doubt " p " (VMID " v ") is exiting"; exit 3 }
      print "vmf:doubt cannot read the command line of " p " (VMID " v ")"; exit 3
    }
    if (!vmf_pve_vm(v, RUN)) {
      print "vmf:doubt pid file of VMID " v " holds " p ", which is not its kvm: " A[1]; exit 3
    }
    if (o == "-") {
      print "vmf:doubt VMID " v " runs but has no config on any node (moving?)"; exit 3
    }
    n = vmf_conf_name(PVE "/nodes/" o "/qemu-server/" v ".conf", v)
    if (n == "\n") { print "vmf:doubt cannot read the config of VMID " v " on " o; exit 3 }
    print "vmf:vm " p " " v " " o " " n
  }
  print "vmf:end"
}
"""
)


_ENV = 'LC_ALL=C; export LC_ALL; PATH="$PATH:/usr/sbin:/sbin"; export PATH'


def _short_hostname(var: str) -> str:
    """Sets `var` to the host's node name: its hostname up to the first dot, as Proxmox's
    `PVE::INotify::nodename` has it."""
    return f"{var}=$(uname -n 2>/dev/null); {var}=${{{var}%%.*}}"


def setup(libvirt_uri: str) -> str:
    """The helper's setup (the URI is not used): the node name is the host's own, its hostname
    up to the first dot as Proxmox's `PVE::INotify::nodename` has it, never a requester's
    word. One program then serves every node of a cluster (the key line, in the cluster-wide
    authorized_keys, names one path), and the daemon checks the name in the hello handshake
    against the entry's `pve_node` (docs/host-helper.md). C locale: byte-exact names."""
    del libvirt_uri
    return f"{_short_hostname('VMF_PVE_NODE')}; export VMF_PVE_NODE; {_ENV}"


def session_setup(host: HostConfig) -> str:
    """Shell mode: the node name selects this node's configs, once per session. It must be the
    host's own (`/etc/pve/nodes/<node>` exists on every node of the cluster): otherwise it is
    cleared, with the reason in VMF_PVE_WHY, and the listing and power-on fail. C locale: byte
    lengths, byte-exact names."""
    node = shlex.quote(host.node or "")
    return (
        f"VMF_PVE_NODE={node}; {_short_hostname('VMF_PVE_HOST')}; VMF_PVE_WHY=; "
        '[ "$VMF_PVE_HOST" = "$VMF_PVE_NODE" ] || { '
        'VMF_PVE_WHY="pve_node $VMF_PVE_NODE does not match the host (uname -n: $VMF_PVE_HOST)"; '
        "VMF_PVE_NODE=; }; export VMF_PVE_NODE VMF_PVE_WHY; "
        f"{_ENV}"
    )


def pidfile_listing(run_dir: str = RUN_DIR, pve_dir: str = PVE_DIR) -> str:
    return pidfile_function(run_dir, pve_dir).call()


def pidfile_function(run_dir: str = RUN_DIR, pve_dir: str = PVE_DIR) -> ShFunction:
    """Running VMs of this node from its pid files, each checked against /proc.

    The config of a running VMID is looked for under every node: during a live migration the
    target runs the VM while its config still lives on the source.
    """
    run, pve = shlex.quote(run_dir), shlex.quote(pve_dir)
    program = shlex.quote(awk(_AWK_PIDFILES, run_dir, pve_dir))
    body = f"""vmf_pl() {{
  [ -r /proc/1/stat ] || {{ echo "vmf:doubt /proc hides processes"; return 3; }}
  case ${{VMF_PVE_NODE:-}} in ''|*/*|.*)
    echo "vmf:doubt no Proxmox node name${{VMF_PVE_WHY:+: $VMF_PVE_WHY}}"; return 3;; esac
  [ -d {pve}/nodes/"$VMF_PVE_NODE" ] || {{
    echo "vmf:doubt no {pve_dir}/nodes/$VMF_PVE_NODE: /etc/pve not mounted or not that node"
    return 3; }}
  [ -d {run} ] || {{ echo "vmf:doubt no {run_dir}"; return 3; }}
  set --
  for vmf_f in {run}/*.pid; do
    [ -e "$vmf_f" ] || continue
{procfs.READ_PID_FILE}    vmf_i=${{vmf_f##*/}}; vmf_i=${{vmf_i%.pid}}
    case $vmf_i in
      ''|*[!0-9]*|0*) echo "vmf:doubt a pid file not named after a VMID: $vmf_f"; return 3;;
    esac
    vmf_o=-
    for vmf_c in {pve}/nodes/*/qemu-server/"$vmf_i".conf; do
      [ -e "$vmf_c" ] || continue
      [ "$vmf_o" = - ] || {{ echo "vmf:doubt VMID $vmf_i has a config on two nodes"; return 3; }}
      vmf_o=${{vmf_c%/qemu-server/*}}; vmf_o=${{vmf_o##*/}}
    done
    set -- "$@" "$vmf_v" "$vmf_i" "$vmf_o"
  done
  LC_ALL=C awk {program} "$@"
}}"""
    return ShFunction("vmf_pl", (), body)


def parse_vm_lines(text: str) -> tuple[RunningVM, ...]:
    """`vmf:vm PID VMID NODE NAME` lines ended by `vmf:end`; anything else is an error."""
    what = "proxmox listing"
    vms = []
    for match in procfs.marked_lines(text, what, _VM_LINE):
        vmid = match["vmid"]
        vms.append(
            RunningVM(
                name=check_name(what, match["name"]),
                config_file=conf_path(match["node"], vmid),
                cartel=int(match["pid"]),
                vmid=vmid,
            )
        )
    vmids = [vm.vmid for vm in vms]
    if len(set(vmids)) != len(vmids):
        raise ParseError(what, "a VMID is listed twice")
    return tuple(vms)


def kill_function(run_dir: str = RUN_DIR, pve_dir: str = PVE_DIR) -> ShFunction:
    """`vmf_pk VMID PID TRIES`: the guarded kill of the VMID's kvm. The VMID is a number by
    the helper's grammar (no leading zero, at most 9 digits: a VMID), so a request cannot aim
    the guard at another pid file than `RUN/VMID.pid`."""
    kill = procfs.kill_function("VMF_VMID", check_program(run_dir, pve_dir))
    body = f"""{kill.body}
vmf_pk() {{
  vmf_kill "$1" "$2" "$3"
}}"""
    return ShFunction("vmf_pk", ("num", "num", "num"), body)


KILL = kill_function()


def kill_args(vm: RunningVM, budget: float) -> tuple[Arg, ...]:
    if vm.vmid is None or not VMID_RE.fullmatch(vm.vmid):
        raise ParseError("proxmox kill", f"{vm.name!r} has no VMID")
    return (vm.vmid, vm.cartel, procfs.kill_tries(budget))


def kill_command(vm: RunningVM, budget: float) -> str:
    """One round trip: check the PID runs this VMID's kvm, kill -9 it, wait until it is dead."""
    return KILL.call(*kill_args(vm, budget))


BACKEND = Backend(
    kind="proxmox",
    setup=setup,
    host_setup=session_setup,
    ident="pve-node",
    listings=(Listing(pidfile_function(), parse_vm_lines),),
    registered=registered_function(),
    parse_registered=parse_registered,
    kill=KILL,
    kill_args=kill_args,
    parse_kill=parse_kill_marker,
    power_on=POWER_ON,
    power_on_args=power_on_args,
    power_on_timeout=HA_START_WAIT + 30,
    hold_off=HOLD_OFF,
    parse_hold_off=parse_hold_off,
)
