#!/bin/sh
# vmfenced-host 1-d64e8ec399dc3a1f for proxmox hosts: the only things vmfenced's key may do
# here (list processes and registrations, the guarded kill of one VM, power-on of one
# registered VM). Printed by `vmfencectl host-helper --kind proxmox`: replace it with a
# newer vmfencectl's output rather than edit it; vmfenced checks the version at every
# connection. One request a line on stdin; anything else is refused and logged (logger).
VMF_VERSION=1-d64e8ec399dc3a1f
VMF_KIND=proxmox
VMF_PVE_NODE=$(uname -n 2>/dev/null); VMF_PVE_NODE=${VMF_PVE_NODE%%.*}; export VMF_PVE_NODE; LC_ALL=C; export LC_ALL; PATH="$PATH:/usr/sbin:/sbin"; export PATH
# Who this host is, in the hello answer: the libvirt URI, or the Proxmox node (its hostname).
VMF_IDENT="${VMF_PVE_NODE:--}"
vmf_from=${SSH_CONNECTION%% *}
[ -n "$vmf_from" ] || vmf_from=${SSH_CLIENT%% *}
[ -n "$vmf_from" ] || vmf_from=local
vmf_bad=
# The reason, printable and short (a refused request is hostile text), logged with the address.
vmf_refuse() {
  vmf_m=$(printf '%s' "$1" | tr '\000-\037\177' '?' | cut -c 1-300)
  logger -t vmfenced-host -p auth.warning "refused a request from $vmf_from: $vmf_m" \
    2>/dev/null || :
  printf 'vmf:refused %s\n' "$vmf_m"
}
vmf_nargs() {
  [ "$1" -eq "$2" ] || vmf_bad="$vmf_verb takes $1 arguments, not $2"
  [ -z "$vmf_bad" ]
}
vmf_num() {
  case $1 in
    ''|*[!0-9]*|0?*) vmf_bad="not a number: $1"; return 1;;
  esac
  [ "${#1}" -le 9 ] || { vmf_bad="number too long: $1"; return 1; }
}
# HEX or =TEXT -> vmf_txt, the text; "-" is the empty text. Control characters are refused:
# no listing can carry them, so no real request holds one. Hex costs a fork (printf), so
# plain text travels as itself.
vmf_str() {
  vmf_txt=
  [ "$1" = - ] && return 0
  case $1 in
    =*) vmf_txt=${1#=}
      case $vmf_txt in
        *[!-A-Za-z0-9._/+:@,=]*) vmf_bad="not plain text: $1"; return 1;;
      esac
      return 0;;
  esac
  case $1 in
    *[!0-9a-f]*) vmf_bad="not lowercase hex: $1"; return 1;;
  esac
  [ $((${#1} % 2)) -eq 0 ] || { vmf_bad="odd hex length: $1"; return 1; }
  vmf_h=$1; vmf_f=
  while [ -n "$vmf_h" ]; do
    vmf_t=${vmf_h#??}; vmf_b=${vmf_h%"$vmf_t"}; vmf_h=$vmf_t
    vmf_v=$((0x$vmf_b))
    if [ "$vmf_v" -lt 32 ] || [ "$vmf_v" -eq 127 ]; then
      vmf_bad="a control character in a text argument"; return 1
    fi
    vmf_f="$vmf_f\\0$((vmf_v / 64))$((vmf_v / 8 % 8))$((vmf_v % 8))"
  done
  vmf_txt=$(printf '%b.' "$vmf_f"); vmf_txt=${vmf_txt%.}
}
vmf_pl() {
  [ -r /proc/1/stat ] || { echo "vmf:doubt /proc hides processes"; return 3; }
  case ${VMF_PVE_NODE:-} in ''|*/*|.*)
    echo "vmf:doubt no Proxmox node name${VMF_PVE_WHY:+: $VMF_PVE_WHY}"; return 3;; esac
  [ -d /etc/pve/nodes/"$VMF_PVE_NODE" ] || {
    echo "vmf:doubt no /etc/pve/nodes/$VMF_PVE_NODE: /etc/pve not mounted or not that node"
    return 3; }
  [ -d /var/run/qemu-server ] || { echo "vmf:doubt no /var/run/qemu-server"; return 3; }
  set --
  for vmf_f in /var/run/qemu-server/*.pid; do
    [ -e "$vmf_f" ] || continue
    vmf_v=
    { read -r vmf_v < "$vmf_f"; } 2>/dev/null
    case $vmf_v in
      ''|*[!0-9]*|0*) [ -e "$vmf_f" ] && { echo "vmf:doubt bad pid file $vmf_f"; return 3; }
        continue;;
    esac
    vmf_i=${vmf_f##*/}; vmf_i=${vmf_i%.pid}
    case $vmf_i in
      ''|*[!0-9]*|0*) echo "vmf:doubt a pid file not named after a VMID: $vmf_f"; return 3;;
    esac
    vmf_o=-
    for vmf_c in /etc/pve/nodes/*/qemu-server/"$vmf_i".conf; do
      [ -e "$vmf_c" ] || continue
      [ "$vmf_o" = - ] || { echo "vmf:doubt VMID $vmf_i has a config on two nodes"; return 3; }
      vmf_o=${vmf_c%/qemu-server/*}; vmf_o=${vmf_o##*/}
    done
    set -- "$@" "$vmf_v" "$vmf_i" "$vmf_o"
  done
  LC_ALL=C awk 'BEGIN { RUN = "/var/run/qemu-server"; PVE = "/etc/pve" }

function vmf_args(p,   f, r, a, n) {
  f = "/proc/" p "/cmdline"; n = 0
  split("", A)
  while ((r = (getline a < f)) > 0) A[++n] = a
  close(f)
  return r < 0 ? -1 : n
}
function vmf_stat(p,   f, s, r) {
  f = "/proc/" p "/stat"; s = ""
  r = (getline s < f)
  close(f)
  if (r <= 0) return 0
  sub(/\n$/, "", s)
  # comm may hold ") " itself; the fields after it never hold ")".
  C = s
  sub(/\) [^)]*$/, "", C); sub(/^[^(]*\(/, "", C)
  sub(/.*\) /, "", s)
  split(s, S, " ")
  return 1
}
function vmf_dead() { return S[1] == "X" || (S[1] == "Z" && S[18] == 1) }
function vmf_kthread() { return int(S[7] / 2097152) % 2 == 1 }
function vmf_opt(o,   i) {
  for (i = 1; i < vmf_n; i++) if (A[i] == o) return A[i + 1]
  return "\n"
}

function vmf_pve_vm(v, run,   i) {
  if (!(A[1] ~ /kvm$/ || A[1] ~ /\/qemu-[^\/]*$/)) return 0
  if (vmf_opt("-pidfile") != run "/" v ".pid") return 0
  i = vmf_opt("-id")
  return i == "\n" || i == v
}
function vmf_conf_name(f, v,   rs, r, l, n, t) {
  rs = RS; RS = "\n"; n = ""
  while ((r = (getline l < f)) > 0) {
    if (substr(l, 1, 1) == "[") break
    if (substr(l, 1, 5) != "name:") continue
    t = substr(l, 6); sub(/^[ \t]+/, "", t); sub(/[ \t]+$/, "", t)
    if (t != "") n = t
  }
  close(f); RS = rs
  if (r < 0) return "\n"
  return n == "" ? "vm" v : n
}

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
' "$@"
}
vmf_pr() {
  [ -d /etc/pve/nodes ] || { echo "vmf:doubt no /etc/pve/nodes: /etc/pve not mounted"; return 3; }
  set -- /etc/pve/nodes/*/qemu-server/*.conf
  [ -e "$1" ] || set --
  LC_ALL=C awk 'BEGIN { RUN = "/var/run/qemu-server"; PVE = "/etc/pve" }

function vmf_args(p,   f, r, a, n) {
  f = "/proc/" p "/cmdline"; n = 0
  split("", A)
  while ((r = (getline a < f)) > 0) A[++n] = a
  close(f)
  return r < 0 ? -1 : n
}
function vmf_stat(p,   f, s, r) {
  f = "/proc/" p "/stat"; s = ""
  r = (getline s < f)
  close(f)
  if (r <= 0) return 0
  sub(/\n$/, "", s)
  # comm may hold ") " itself; the fields after it never hold ")".
  C = s
  sub(/\) [^)]*$/, "", C); sub(/^[^(]*\(/, "", C)
  sub(/.*\) /, "", s)
  split(s, S, " ")
  return 1
}
function vmf_dead() { return S[1] == "X" || (S[1] == "Z" && S[18] == 1) }
function vmf_kthread() { return int(S[7] / 2097152) % 2 == 1 }
function vmf_opt(o,   i) {
  for (i = 1; i < vmf_n; i++) if (A[i] == o) return A[i + 1]
  return "\n"
}

function vmf_pve_vm(v, run,   i) {
  if (!(A[1] ~ /kvm$/ || A[1] ~ /\/qemu-[^\/]*$/)) return 0
  if (vmf_opt("-pidfile") != run "/" v ".pid") return 0
  i = vmf_opt("-id")
  return i == "\n" || i == v
}
function vmf_conf_name(f, v,   rs, r, l, n, t) {
  rs = RS; RS = "\n"; n = ""
  while ((r = (getline l < f)) > 0) {
    if (substr(l, 1, 1) == "[") break
    if (substr(l, 1, 5) != "name:") continue
    t = substr(l, 6); sub(/^[ \t]+/, "", t); sub(/[ \t]+$/, "", t)
    if (t != "") n = t
  }
  close(f); RS = rs
  if (r < 0) return "\n"
  return n == "" ? "vm" v : n
}

BEGIN {
  RS = "\n"; f = ARGV[1]; d = ""; nl = ""
  while ((r = (getline l < f)) > 0) { d = d nl l; nl = "\n" }
  if (r < 0) { print "vmf:doubt cannot read " f; exit 3 }
  close(f)
  printf "vmf:vmlist %d\n%s\n", length(d), d
  for (i = 2; i < ARGC; i++) {
    c = ARGV[i]
    v = c; sub(/\.conf$/, "", v); sub(/.*\//, "", v)
    o = c; sub(/\/qemu-server\/[^\/]*$/, "", o); sub(/.*\//, "", o)
    n = vmf_conf_name(c, v)
    # Gone since the glob (destroyed, moved): the cluster changes under us, a doubt.
    if (n == "\n") { print "vmf:doubt cannot read " c; exit 3 }
    printf "vmf:conf %d %d %d\n%s%s%s\n", length(o), length(v), length(n), o, v, n
  }
  print "vmf:end"
}
' /etc/pve/.vmlist "$@"
}
vmf_chk() {
  vmf_o=$(awk 'BEGIN { RUN = "/var/run/qemu-server"; PVE = "/etc/pve" }

function vmf_args(p,   f, r, a, n) {
  f = "/proc/" p "/cmdline"; n = 0
  split("", A)
  while ((r = (getline a < f)) > 0) A[++n] = a
  close(f)
  return r < 0 ? -1 : n
}
function vmf_stat(p,   f, s, r) {
  f = "/proc/" p "/stat"; s = ""
  r = (getline s < f)
  close(f)
  if (r <= 0) return 0
  sub(/\n$/, "", s)
  # comm may hold ") " itself; the fields after it never hold ")".
  C = s
  sub(/\) [^)]*$/, "", C); sub(/^[^(]*\(/, "", C)
  sub(/.*\) /, "", s)
  split(s, S, " ")
  return 1
}
function vmf_dead() { return S[1] == "X" || (S[1] == "Z" && S[18] == 1) }
function vmf_kthread() { return int(S[7] / 2097152) % 2 == 1 }
function vmf_opt(o,   i) {
  for (i = 1; i < vmf_n; i++) if (A[i] == o) return A[i + 1]
  return "\n"
}

function vmf_pve_vm(v, run,   i) {
  if (!(A[1] ~ /kvm$/ || A[1] ~ /\/qemu-[^\/]*$/)) return 0
  if (vmf_opt("-pidfile") != run "/" v ".pid") return 0
  i = vmf_opt("-id")
  return i == "\n" || i == v
}
function vmf_conf_name(f, v,   rs, r, l, n, t) {
  rs = RS; RS = "\n"; n = ""
  while ((r = (getline l < f)) > 0) {
    if (substr(l, 1, 1) == "[") break
    if (substr(l, 1, 5) != "name:") continue
    t = substr(l, 6); sub(/^[ \t]+/, "", t); sub(/[ \t]+$/, "", t)
    if (t != "") n = t
  }
  close(f); RS = rs
  if (r < 0) return "\n"
  return n == "" ? "vm" v : n
}

BEGIN {
  RS = "\0"; p = ARGV[1]
  if (!vmf_stat(p)) exit 11
  if (vmf_dead()) exit 11
  vmf_n = vmf_args(p)
  if (vmf_n < 0) exit 13
  if (vmf_n == 0) {
    if (!vmf_stat(p) || vmf_dead()) exit 11
    exit 13
  }
  if (!(vmf_pve_vm(ENVIRON["VMF_VMID"], RUN))) exit 12
  print S[20]
  exit 10
}
' "$vmf_p" 2>&1)
  case $? in
    10) vmf_start=${vmf_o##*[!0-9]}; return 0;;
    11) return 1;;
    12) return 2;;
  esac
  [ -r /proc/1/stat ] && [ ! -e "/proc/$vmf_p" ] && return 1
  return 3
}
vmf_gone() {
  vmf_l=
  { read -r vmf_l < "/proc/$vmf_p/stat"; } 2>/dev/null
  [ -n "$vmf_l" ] || return 0
  set -- ${vmf_l##*) }
  [ "$1" = X ] && return 0
  [ "$1" = Z ] && [ "${18}" = 1 ] && return 0
  [ -n "$vmf_start" ] && [ "${20}" != "$vmf_start" ] && return 0
  return 1
}
vmf_kill() {
  VMF_VMID=$1; export VMF_VMID; vmf_p=$2; vmf_tries=$3; vmf_start=
  vmf_chk; vmf_r=$?
  if [ "$vmf_r" -eq 0 ]; then
    if ! kill -9 "$vmf_p" 2>/dev/null && ! vmf_gone; then
      echo "kill -9 $vmf_p refused"; echo vmf:error
    else
      vmf_i=0
      while ! vmf_gone; do
        vmf_i=$((vmf_i + 1)); [ "$vmf_i" -ge "$vmf_tries" ] && break
        [ "$vmf_i" -gt 200 ] && { sleep 0.01 2>/dev/null || sleep 1; }
      done
      if vmf_gone; then echo vmf:killed; else echo vmf:alive; fi
    fi
  else
    case $vmf_r in
      1) echo vmf:not-running;;
      2) echo vmf:not-that-vm;;
      *) printf '%s\n' "$vmf_o"; echo vmf:error;;
    esac
  fi
}
vmf_pk() {
  vmf_kill "$1" "$2" "$3"
}
vmf_on() {
  VMF_VMID=$1; VMF_NAME=$2; export VMF_VMID
  case $VMF_VMID in ''|*[!0-9]*|0*) echo "vmf:refused not a VMID"; return 1;; esac
  case ${VMF_PVE_NODE:-} in ''|*/*|.*)
    echo "vmf:refused no Proxmox node name${VMF_PVE_WHY:+: $VMF_PVE_WHY}"; return 1;; esac
  vmf_c=/etc/pve/nodes/"$VMF_PVE_NODE"/qemu-server/"$VMF_VMID".conf
  [ -f "$vmf_c" ] || {
    echo "vmf:refused VMID $VMF_VMID has no config on $VMF_PVE_NODE (moved or destroyed)"
    return 1; }
  vmf_n=$(LC_ALL=C awk '
function vmf_args(p,   f, r, a, n) {
  f = "/proc/" p "/cmdline"; n = 0
  split("", A)
  while ((r = (getline a < f)) > 0) A[++n] = a
  close(f)
  return r < 0 ? -1 : n
}
function vmf_stat(p,   f, s, r) {
  f = "/proc/" p "/stat"; s = ""
  r = (getline s < f)
  close(f)
  if (r <= 0) return 0
  sub(/\n$/, "", s)
  # comm may hold ") " itself; the fields after it never hold ")".
  C = s
  sub(/\) [^)]*$/, "", C); sub(/^[^(]*\(/, "", C)
  sub(/.*\) /, "", s)
  split(s, S, " ")
  return 1
}
function vmf_dead() { return S[1] == "X" || (S[1] == "Z" && S[18] == 1) }
function vmf_kthread() { return int(S[7] / 2097152) % 2 == 1 }
function vmf_opt(o,   i) {
  for (i = 1; i < vmf_n; i++) if (A[i] == o) return A[i + 1]
  return "\n"
}

function vmf_pve_vm(v, run,   i) {
  if (!(A[1] ~ /kvm$/ || A[1] ~ /\/qemu-[^\/]*$/)) return 0
  if (vmf_opt("-pidfile") != run "/" v ".pid") return 0
  i = vmf_opt("-id")
  return i == "\n" || i == v
}
function vmf_conf_name(f, v,   rs, r, l, n, t) {
  rs = RS; RS = "\n"; n = ""
  while ((r = (getline l < f)) > 0) {
    if (substr(l, 1, 1) == "[") break
    if (substr(l, 1, 5) != "name:") continue
    t = substr(l, 6); sub(/^[ \t]+/, "", t); sub(/[ \t]+$/, "", t)
    if (t != "") n = t
  }
  close(f); RS = rs
  if (r < 0) return "\n"
  return n == "" ? "vm" v : n
}

BEGIN {
  n = vmf_conf_name(ARGV[1], ENVIRON["VMF_VMID"])
  if (n == "\n") exit 3
  print n
}
' "$vmf_c") || {
    echo "vmf:refused cannot read $vmf_c"; return 1; }
  [ "$vmf_n" = "$VMF_NAME" ] || {
    printf 'vmf:refused VMID %s now names another VM: %s\n' "$VMF_VMID" "$vmf_n"; return 1; }
  vmf_s=none
  if [ -e /etc/pve/ha/resources.cfg ]; then
    vmf_s=$(LC_ALL=C awk '
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
' /etc/pve/ha/resources.cfg) || {
      echo "vmf:refused cannot read the HA resources"; return 1; }
  fi
  case $vmf_s in
    none|ignored) qm start "$VMF_VMID"; return;;
    "managed "*) ;;
    *) echo "vmf:refused HA resources not understood"; return 1;;
  esac
  ha-manager set "vm:$VMF_VMID" --state started || return 1
  vmf_i=0
  while [ "$vmf_i" -lt 600 ]; do
    vmf_p=
    { read -r vmf_p < /var/run/qemu-server/"$VMF_VMID".pid; } 2>/dev/null
    case $vmf_p in
      ''|*[!0-9]*|0*) ;;
      *) LC_ALL=C awk 'BEGIN { RUN = "/var/run/qemu-server"; PVE = "/etc/pve" }

function vmf_args(p,   f, r, a, n) {
  f = "/proc/" p "/cmdline"; n = 0
  split("", A)
  while ((r = (getline a < f)) > 0) A[++n] = a
  close(f)
  return r < 0 ? -1 : n
}
function vmf_stat(p,   f, s, r) {
  f = "/proc/" p "/stat"; s = ""
  r = (getline s < f)
  close(f)
  if (r <= 0) return 0
  sub(/\n$/, "", s)
  # comm may hold ") " itself; the fields after it never hold ")".
  C = s
  sub(/\) [^)]*$/, "", C); sub(/^[^(]*\(/, "", C)
  sub(/.*\) /, "", s)
  split(s, S, " ")
  return 1
}
function vmf_dead() { return S[1] == "X" || (S[1] == "Z" && S[18] == 1) }
function vmf_kthread() { return int(S[7] / 2097152) % 2 == 1 }
function vmf_opt(o,   i) {
  for (i = 1; i < vmf_n; i++) if (A[i] == o) return A[i + 1]
  return "\n"
}

function vmf_pve_vm(v, run,   i) {
  if (!(A[1] ~ /kvm$/ || A[1] ~ /\/qemu-[^\/]*$/)) return 0
  if (vmf_opt("-pidfile") != run "/" v ".pid") return 0
  i = vmf_opt("-id")
  return i == "\n" || i == v
}
function vmf_conf_name(f, v,   rs, r, l, n, t) {
  rs = RS; RS = "\n"; n = ""
  while ((r = (getline l < f)) > 0) {
    if (substr(l, 1, 1) == "[") break
    if (substr(l, 1, 5) != "name:") continue
    t = substr(l, 6); sub(/^[ \t]+/, "", t); sub(/[ \t]+$/, "", t)
    if (t != "") n = t
  }
  close(f); RS = rs
  if (r < 0) return "\n"
  return n == "" ? "vm" v : n
}

BEGIN {
  RS = "\0"; p = ARGV[1]
  if (!vmf_stat(p)) exit 11
  if (vmf_dead()) exit 11
  vmf_n = vmf_args(p)
  if (vmf_n < 0) exit 13
  if (vmf_n == 0) {
    if (!vmf_stat(p) || vmf_dead()) exit 11
    exit 13
  }
  if (!(vmf_pve_vm(ENVIRON["VMF_VMID"], RUN))) exit 12
  print S[20]
  exit 10
}
' "$vmf_p" >/dev/null 2>&1; [ "$?" -eq 10 ] && return 0;;
    esac
    vmf_i=$((vmf_i + 1))
    sleep 0.1 2>/dev/null || sleep 1
  done
  echo "vmf:refused the HA stack did not start VMID $VMF_VMID within 60 s"
  return 1
}
vmf_hold() {
  case $1 in ''|*[!0-9]*|0*) echo "vmf:ha unknown not a VMID"; return 0;; esac
  VMF_VMID=$1; export VMF_VMID
  [ -e /etc/pve/ha/resources.cfg ] || { echo "vmf:ha not-managed"; return 0; }
  vmf_s=$(LC_ALL=C awk '
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
' /etc/pve/ha/resources.cfg 2>&1) || {
    vmf_s=$(printf '%s' "$vmf_s" | tr '\n' ' ' | cut -c1-200)
    echo "vmf:ha unknown cannot read the HA resources: $vmf_s"; return 0; }
  case $vmf_s in
    none|ignored) echo "vmf:ha not-managed"; return 0;;
    "managed "*) ;;
    *) echo "vmf:ha unknown HA resources not understood"; return 0;;
  esac
  vmf_o=$(timeout -k 1 8 ha-manager crm-command stop "vm:$VMF_VMID" 0 2>&1)
  vmf_r=$?
  vmf_o=$(printf '%s' "$vmf_o" | tr '\n' ' ' | cut -c1-300)
  if [ "$vmf_r" -eq 0 ]; then echo "vmf:ha stop-accepted $vmf_o"
  else echo "vmf:ha stop-refused exit $vmf_r: $vmf_o"; fi
}
vmf_serve() {
  vmf_verb=$1; shift
  case $vmf_verb in
    ping)
      vmf_nargs 0 $#;;
    hello)
      vmf_nargs 1 $# || return
      vmf_str "$1" || return
      printf 'vmf:helper %s %s %s\n' "$VMF_VERSION" "$VMF_KIND" "$VMF_IDENT"
      [ "$vmf_txt" = "$VMF_VERSION" ] && return 0
      vmf_refuse "version mismatch: the daemon expects $vmf_txt"
      return 1;;
    list)
      vmf_nargs 1 $# || return
      case $1 in 1) vmf_pl;; *) vmf_bad="no listing $1";; esac;;
    registered)
      vmf_nargs 0 $# || return
      vmf_pr;;
    kill)
      vmf_nargs 3 $# || return
      vmf_num "$1" || return
      vmf_num "$2" || return
      vmf_num "$3" || return
      vmf_pk "$1" "$2" "$3";;
    kill-list)
      vmf_nargs 3 $# || return
      vmf_num "$1" || return
      vmf_num "$2" || return
      vmf_num "$3" || return
      vmf_pk "$1" "$2" "$3"
      echo vmf:listing-after-kill
      vmf_pl;;
    on)
      vmf_nargs 2 $# || return
      vmf_num "$1" || return
      vmf_str "$2" || return; vmf_a2=$vmf_txt
      vmf_on "$1" "$vmf_a2";;
    hold-off)
      vmf_nargs 1 $# || return
      vmf_num "$1" || return
      vmf_hold "$1";;
    *)
      vmf_bad="unknown request: $vmf_verb";;
  esac
}
# The key runs this program whatever the client asked: any other command is refused.
if [ -n "${SSH_ORIGINAL_COMMAND+x}" ] && [ "$SSH_ORIGINAL_COMMAND" != vmfenced-host ]
then
  vmf_refuse "command not allowed: $SSH_ORIGINAL_COMMAND"
  exit 1
fi
while :; do
  vmf_req=
  IFS= read -r vmf_req || exit 0
  if [ "${#vmf_req}" -gt 8192 ]; then
    vmf_refuse "request over 8192 bytes"; exit 2
  fi
  case $vmf_req in
    *[!-0-9A-Za-z\ ._/+:@,=]*|' '*|*' '|*'  '*)
      vmf_refuse "malformed request: $vmf_req"; exit 2;;
  esac
  set -f; set -- $vmf_req; set +f
  case $1 in
    *[!0-9a-f]*) vmf_refuse "malformed request: $vmf_req"; exit 2;;
  esac
  [ "${#1}" -eq 16 ] || { vmf_refuse "malformed request: $vmf_req"; exit 2; }
  vmf_tok=$1; shift
  [ $# -ge 1 ] || { vmf_refuse "no request after the token"; exit 2; }
  vmf_serve "$@" </dev/null 2>&1
  vmf_rc=$?
  if [ -n "$vmf_bad" ]; then
    vmf_refuse "$vmf_bad"
    printf '\n:vmf-end:%s:%d\n' "$vmf_tok" 126
    exit 2
  fi
  printf '\n:vmf-end:%s:%d\n' "$vmf_tok" "$vmf_rc"
done
