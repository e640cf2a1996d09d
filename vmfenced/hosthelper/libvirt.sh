#!/bin/sh
# vmfenced-host 1-44706a76822dffe5 for libvirt hosts: the only things vmfenced's key may do
# here (list processes and registrations, the guarded kill of one VM, power-on of one
# registered VM). Printed by `vmfencectl host-helper --kind libvirt`: replace it with a
# newer vmfencectl's output rather than edit it; vmfenced checks the version at every
# connection. One request a line on stdin; anything else is refused and logged (logger).
VMF_VERSION=1-44706a76822dffe5
VMF_KIND=libvirt
LIBVIRT_DEFAULT_URI=@VMFENCED_LIBVIRT_URI@; export LIBVIRT_DEFAULT_URI; LC_ALL=C; export LC_ALL; PATH="$PATH:/usr/sbin:/sbin"; export PATH
# Who this host is, in the hello answer: the libvirt URI, or the Proxmox node (its hostname).
VMF_IDENT="$LIBVIRT_DEFAULT_URI"
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
vmf_ls() {
  [ "${LIBVIRT_DEFAULT_URI:-qemu:///system}" = qemu:///system ] || {
    echo "vmf:doubt not qemu:///system"; return 3; }
  [ -r /proc/1/stat ] || { echo "vmf:doubt /proc hides processes"; return 3; }
  [ -d /run/libvirt/qemu ] || { echo "vmf:doubt no /run/libvirt/qemu"; return 3; }
  set --
  for vmf_f in /run/libvirt/qemu/*.pid; do
    [ -e "$vmf_f" ] || continue
    vmf_v=
    { read -r vmf_v < "$vmf_f"; } 2>/dev/null
    case $vmf_v in
      ''|*[!0-9]*|0*) [ -e "$vmf_f" ] && { echo "vmf:doubt bad pid file $vmf_f"; return 3; }
        continue;;
    esac
    vmf_n=${vmf_f##*/}
    set -- "$@" "$vmf_v" "${vmf_n%.pid}"
  done
  awk '
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
    else if (substr(t, 1, 6) == "&apos;") { d = d "'"'"'"; f = substr(t, 7) }
    else if (substr(t, 1, 6) == "&quot;") { d = d "\""; f = substr(t, 7) }
    else if (substr(t, 1, 4) == "&lt;") { d = d "<"; f = substr(t, 5) }
    else if (substr(t, 1, 4) == "&gt;") { d = d ">"; f = substr(t, 5) }
    else return "\n"
  }
  return d f
}
function vmf_qemu_comm() { return C ~ /^qemu/ || C == "kvm" }

BEGIN {
  RS = "\0"
  for (i = 1; i + 1 < ARGC; i += 2) {
    p = ARGV[i]; name = vmf_unxml(ARGV[i + 1])
    if (name == "\n") { print "vmf:doubt pid file name not understood: " ARGV[i + 1]; exit 3 }
    if (!vmf_stat(p) || vmf_dead()) continue
    # A kernel thread reused the PID after this domain'"'"'s qemu died.
    if (vmf_kthread()) continue
    vmf_n = vmf_args(p)
    if (vmf_n <= 0) {
      if (!vmf_stat(p) || vmf_dead()) continue
      if (S[1] == "Z") { print "vmf:doubt " p " (" name ") is exiting, threads still run"; exit 3 }
      print "vmf:doubt cannot read the command line of " p " (" name ")"; exit 3
    }
    # A program without -name reused the PID after this domain'"'"'s qemu died.
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
' "$@"
}
vmf_vl() {
  [ -r /proc/1/stat ] || { echo "vmf:doubt /proc hides processes"; return 3; }
  vmf_o=$(virsh list --name 2>&1) || { printf '%s\n' "$vmf_o"; return 3; }
  printf '%s\n' "$vmf_o" | awk '
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
    else if (substr(t, 1, 6) == "&apos;") { d = d "'"'"'"; f = substr(t, 7) }
    else if (substr(t, 1, 6) == "&quot;") { d = d "\""; f = substr(t, 7) }
    else if (substr(t, 1, 4) == "&lt;") { d = d "<"; f = substr(t, 5) }
    else if (substr(t, 1, 4) == "&gt;") { d = d ">"; f = substr(t, 5) }
    else return "\n"
  }
  return d f
}
function vmf_qemu_comm() { return C ~ /^qemu/ || C == "kvm" }

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
' /proc/[0-9]*/cmdline
}
vmf_registered() {
  if vmf_o=$(virsh list --all --uuid --name 2>&1); then
    printf 'vmf:uuid-name\n%s\n' "$vmf_o"
  else
    vmf_o=$(virsh list --all --name) && printf 'vmf:name\n%s\n' "$vmf_o"
  fi
}
vmf_chk() {
  vmf_o=$(awk '
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
    else if (substr(t, 1, 6) == "&apos;") { d = d "'"'"'"; f = substr(t, 7) }
    else if (substr(t, 1, 6) == "&quot;") { d = d "\""; f = substr(t, 7) }
    else if (substr(t, 1, 4) == "&lt;") { d = d "<"; f = substr(t, 5) }
    else if (substr(t, 1, 4) == "&gt;") { d = d ">"; f = substr(t, 5) }
    else return "\n"
  }
  return d f
}
function vmf_qemu_comm() { return C ~ /^qemu/ || C == "kvm" }

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
  if (!(vmf_qemu_comm() && vmf_guest(vmf_opt("-name")) == ENVIRON["VMF_NAME"])) exit 12
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
  VMF_NAME=$1; export VMF_NAME; vmf_p=$2; vmf_tries=$3; vmf_start=
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
vmf_on() {
  vmf_d=$1; VMF_NAME=$2
  vmf_i=0
  while vmf_s=$(virsh domstate --domain "$vmf_d" 2>&1); do
    case $vmf_s in "shut off"*|crashed*) break;; esac
    vmf_i=$((vmf_i + 1)); [ "$vmf_i" -ge 300 ] && break
    sleep 0.05 2>/dev/null || sleep 1
  done
  if [ "$vmf_d" != "$VMF_NAME" ]; then
    vmf_n=$(virsh domname --domain "$vmf_d" 2>&1) || {
      printf 'vmf:refused cannot name %s: %s\n' "$vmf_d" "$vmf_n"; return 1; }
    [ "$vmf_n" = "$VMF_NAME" ] || {
      printf 'vmf:refused %s now names another domain: %s\n' "$vmf_d" "$vmf_n"; return 1; }
  fi
  virsh start --domain "$vmf_d"
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
      case $1 in 1) vmf_ls;; 2) vmf_vl;; *) vmf_bad="no listing $1";; esac;;
    registered)
      vmf_nargs 0 $# || return
      vmf_registered;;
    kill)
      vmf_nargs 3 $# || return
      vmf_str "$1" || return; vmf_a1=$vmf_txt
      vmf_num "$2" || return
      vmf_num "$3" || return
      vmf_kill "$vmf_a1" "$2" "$3";;
    kill-list)
      vmf_nargs 3 $# || return
      vmf_str "$1" || return; vmf_a1=$vmf_txt
      vmf_num "$2" || return
      vmf_num "$3" || return
      vmf_kill "$vmf_a1" "$2" "$3"
      echo vmf:listing-after-kill
      vmf_ls;;
    on)
      vmf_nargs 2 $# || return
      vmf_str "$1" || return; vmf_a1=$vmf_txt
      vmf_str "$2" || return; vmf_a2=$vmf_txt
      vmf_on "$vmf_a1" "$vmf_a2";;
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
