"""Proxmox VE: the HA stack around a fence, and power-on.

pve-ha-manager starts a killed VM whose HA state is `started` again within a round or two
(about 10 s each): after the kill of an `off`, it is asked to keep the VM stopped. The kill
never waits for it (HA commands need a quorate cluster filesystem). Power-on of an HA-managed
VM goes through the HA stack too (`qm start` of an HA VM only asks HA, asynchronously, and
returns): the command then waits on the node for the VM to run (docs/proxmox.md).
"""

from __future__ import annotations

import shlex

from vmfenced.backends import Arg, ShFunction
from vmfenced.backends.proxmox_cluster import AWK_LIB, PVE_DIR, RUN_DIR, VMID_RE, check_program
from vmfenced.backends.text import split_lines
from vmfenced.errors import ParseError
from vmfenced.model import HOLD_OUTCOMES, HoldOff, RegisteredVM

# Host-side bound of an HA command (`ha-manager` is Perl and needs a quorate cluster
# filesystem: it may hang while the cluster has no quorum).
HA_TIMEOUT = 8.0
# How long the power-on of an HA-managed VM waits on the host for the HA stack to start it
# (it acts in rounds of about 10 s).
HA_START_WAIT = 60.0

# One config's name (ARGV[1], VMID in ENVIRON): for the power-on's re-check.
_AWK_NAME = (
    AWK_LIB
    + r"""
BEGIN {
  n = vmf_conf_name(ARGV[1], ENVIRON["VMF_VMID"])
  if (n == "\n") exit 3
  print n
}
"""
)

# /etc/pve/ha/resources.cfg (section config: `vm: 100` headers, indented `state started`
# lines, state `started` when unset): `none`, `ignored`, or `managed STATE` for vm:VMF_VMID
# (HA's vm_is_ha_managed: any state but ignored). Exit 3 when it cannot be read.
_AWK_HA = r"""
BEGIN {
  RS = "\n"; want = "vm:" ENVIRON["VMF_VMID"]; f = ARGV[1]; found = 0; cur = 0
  while ((r = (getline l < f)) > 0) {
    if (l ~ /^[A-Za-z]+:/) {
      t = l; sub(/:.*/, "", t); id = l; sub(/^[^:]*:[ \t]*/, "", id); sub(/[ \t]+$/, "", id)
      cur = (t ":" id == want)
      if (cur) { found = 1; st = "started" }
      continue
    }
    if (cur && l ~ /^[ \t]+state[ \t]/) {
      st = l; sub(/^[ \t]+state[ \t]+/, "", st); sub(/[ \t]+$/, "", st)
    }
  }
  if (r < 0) exit 3
  if (!found) print "none"
  else if (st == "ignored") print "ignored"
  else print "managed " st
}
"""


def hold_off_command(vmid: str, pve_dir: str = PVE_DIR, timeout: float = HA_TIMEOUT) -> str:
    if not VMID_RE.fullmatch(vmid):
        raise ParseError("proxmox HA stop", f"not a VMID: {vmid!r}")
    return hold_off_function(pve_dir, timeout).call(vmid)


def hold_off_function(pve_dir: str = PVE_DIR, timeout: float = HA_TIMEOUT) -> ShFunction:
    """`vmf_hold VMID`, after the kill: an HA-managed VM (`started`) would be started again by
    the HA stack within a round or two, so ask it to keep the VM stopped: `crm-command stop
    vm:ID 0`, the hard stop Proxmox's own stop requests for an HA VM (docs/proxmox.md says why
    not `set --state stopped`). One line `vmf:ha OUTCOME [DETAIL]`, whatever happens. The VMID
    is a number by the helper's grammar; the body checks it again for shell mode's callers."""
    cfg = shlex.quote(f"{pve_dir}/ha/resources.cfg")
    body = f"""vmf_hold() {{
  case $1 in ''|*[!0-9]*|0*) echo "vmf:ha unknown not a VMID"; return 0;; esac
  VMF_VMID=$1; export VMF_VMID
  [ -e {cfg} ] || {{ echo "vmf:ha not-managed"; return 0; }}
  vmf_s=$(LC_ALL=C awk {shlex.quote(_AWK_HA)} {cfg} 2>&1) || {{
    vmf_s=$(printf '%s' "$vmf_s" | tr '\\n' ' ' | cut -c1-200)
    echo "vmf:ha unknown cannot read the HA resources: $vmf_s"; return 0; }}
  case $vmf_s in
    none|ignored) echo "vmf:ha not-managed"; return 0;;
    "managed "*) ;;
    *) echo "vmf:ha unknown HA resources not understood"; return 0;;
  esac
  vmf_o=$(timeout -k 1 {timeout:g} ha-manager crm-command stop "vm:$VMF_VMID" 0 2>&1)
  vmf_r=$?
  vmf_o=$(printf '%s' "$vmf_o" | tr '\\n' ' ' | cut -c1-300)
  if [ "$vmf_r" -eq 0 ]; then echo "vmf:ha stop-accepted $vmf_o"
  else echo "vmf:ha stop-refused exit $vmf_r: $vmf_o"; fi
}}"""
    return ShFunction("vmf_hold", ("num",), body)


HOLD_OFF = hold_off_function()


def parse_hold_off(text: str) -> HoldOff:
    """The last line must be `vmf:ha OUTCOME [DETAIL]`; anything else is an error."""
    lines = split_lines(text)
    last = lines[-1] if lines else ""
    word, _, detail = last.removeprefix("vmf:ha ").partition(" ")
    if not last.startswith("vmf:ha ") or word not in HOLD_OUTCOMES:
        raise ParseError("proxmox HA stop", f"unexpected answer: {text.strip()[:300]!r}")
    return HoldOff(word, detail.strip())


def power_on_args(vm: RegisteredVM) -> tuple[Arg, ...]:
    if not VMID_RE.fullmatch(vm.vmid):
        raise ParseError("proxmox power-on", f"not a VMID: {vm.vmid!r}")
    return (vm.vmid, vm.name)


def power_on_command(
    vm: RegisteredVM, pve_dir: str = PVE_DIR, run_dir: str = RUN_DIR, wait: float = HA_START_WAIT
) -> str:
    return power_on_function(pve_dir, run_dir, wait).call(*power_on_args(vm))


def power_on_function(
    pve_dir: str = PVE_DIR, run_dir: str = RUN_DIR, wait: float = HA_START_WAIT
) -> ShFunction:
    """`vmf_on VMID NAME` on the owner node: `qm start VMID`, or for an HA-managed VM
    `ha-manager set vm:VMID --state started` (HA would refuse a start behind its back) and a
    wait until its pid file names its kvm (the listing's check: a stale pid file whose PID now
    runs another program does not end the wait).

    In the same command, the config must still be on this node and name this VM: a VMID can
    be destroyed and reused, or the VM moved, since the registrations were read."""
    pve, run = shlex.quote(pve_dir), shlex.quote(run_dir)
    check = shlex.quote(check_program(run_dir, pve_dir))
    tries = max(1, int(wait / 0.1))
    body = f"""vmf_on() {{
  VMF_VMID=$1; VMF_NAME=$2; export VMF_VMID
  case $VMF_VMID in ''|*[!0-9]*|0*) echo "vmf:refused not a VMID"; return 1;; esac
  case ${{VMF_PVE_NODE:-}} in ''|*/*|.*)
    echo "vmf:refused no Proxmox node name${{VMF_PVE_WHY:+: $VMF_PVE_WHY}}"; return 1;; esac
  vmf_c={pve}/nodes/"$VMF_PVE_NODE"/qemu-server/"$VMF_VMID".conf
  [ -f "$vmf_c" ] || {{
    echo "vmf:refused VMID $VMF_VMID has no config on $VMF_PVE_NODE (moved or destroyed)"
    return 1; }}
  vmf_n=$(LC_ALL=C awk {shlex.quote(_AWK_NAME)} "$vmf_c") || {{
    echo "vmf:refused cannot read $vmf_c"; return 1; }}
  [ "$vmf_n" = "$VMF_NAME" ] || {{
    printf 'vmf:refused VMID %s now names another VM: %s\\n' "$VMF_VMID" "$vmf_n"; return 1; }}
  vmf_s=none
  if [ -e {pve}/ha/resources.cfg ]; then
    vmf_s=$(LC_ALL=C awk {shlex.quote(_AWK_HA)} {pve}/ha/resources.cfg) || {{
      echo "vmf:refused cannot read the HA resources"; return 1; }}
  fi
  case $vmf_s in
    none|ignored) qm start "$VMF_VMID"; return;;
    "managed "*) ;;
    *) echo "vmf:refused HA resources not understood"; return 1;;
  esac
  ha-manager set "vm:$VMF_VMID" --state started || return 1
  vmf_i=0
  while [ "$vmf_i" -lt {tries} ]; do
    vmf_p=
    {{ read -r vmf_p < {run}/"$VMF_VMID".pid; }} 2>/dev/null
    case $vmf_p in
      ''|*[!0-9]*|0*) ;;
      *) LC_ALL=C awk {check} "$vmf_p" >/dev/null 2>&1; [ "$?" -eq 10 ] && return 0;;
    esac
    vmf_i=$((vmf_i + 1))
    sleep 0.1 2>/dev/null || sleep 1
  done
  echo "vmf:refused the HA stack did not start VMID $VMF_VMID within {wait:g} s"
  return 1
}}"""
    return ShFunction("vmf_on", ("num", "str"), body)


POWER_ON = power_on_function()
