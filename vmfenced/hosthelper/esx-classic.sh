#!/bin/sh
# vmfenced-host 1-6e8577f2935e1a42 for esx-classic hosts: the only things vmfenced's key may do
# here (list processes and registrations, the guarded kill of one VM, power-on of one
# registered VM). Printed by `vmfencectl host-helper --kind esx-classic`: replace it with a
# newer vmfencectl's output rather than edit it; vmfenced checks the version at every
# connection. One request a line on stdin; anything else is refused and logged (logger).
VMF_VERSION=1-6e8577f2935e1a42
VMF_KIND=esx-classic
LC_ALL=C; export LC_ALL; PATH="$PATH:/usr/bin:/usr/sbin:/sbin"; export PATH
# Who this host is, in the hello answer: the libvirt URI, or the Proxmox node (its hostname).
VMF_IDENT=-
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
  [ -r /proc/1/stat ] || { echo "vmf:doubt /proc hides processes"; return 3; }
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

function vmf_vmx(   i) {
  for (i = vmf_n; i > 1; i--) if (A[i] ~ /\.vmx$/) return A[i]
  return "\n"
}
function vmf_is_vmx() { return A[1] ~ /(^|\/)vmware-vmx$/ }

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
' /proc/[0-9]*/cmdline
}
vmf_ps() {
  ps -e -ww -o pid=,args=
}
vmf_registered() {
  vmware-cmd -l
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

function vmf_vmx(   i) {
  for (i = vmf_n; i > 1; i--) if (A[i] ~ /\.vmx$/) return A[i]
  return "\n"
}
function vmf_is_vmx() { return A[1] ~ /(^|\/)vmware-vmx$/ }

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
  if (!(vmf_is_vmx() && vmf_vmx() == ENVIRON["VMF_VMX"])) exit 12
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
  VMF_VMX=$1; export VMF_VMX; vmf_p=$2; vmf_tries=$3; vmf_start=
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
  VMF_VMX=$1; export VMF_VMX
  if ! vmf_l=$(vmware-cmd -l 2>&1); then
    printf '%s\n' "$vmf_l" | tail -n 3
    printf 'vmf:refused vmware-cmd -l failed: cannot check that %s is registered here\n' "$VMF_VMX"
    return 1
  fi
  if ! printf '%s\n' "$vmf_l" | awk '
{ l = $0; sub(/^[ \t]+/, "", l); sub(/[ \t]+$/, "", l); if (l "" == ENVIRON["VMF_VMX"] "") n++ }
END { exit n ? 0 : 1 }
'; then
    printf 'vmf:refused %s is not registered on this host: not powered on\n' "$VMF_VMX"
    return 1
  fi
  vmware-cmd "$VMF_VMX" start
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
      case $1 in 1) vmf_ls;; 2) vmf_ps;; *) vmf_bad="no listing $1";; esac;;
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
      vmf_nargs 1 $# || return
      vmf_str "$1" || return; vmf_a1=$vmf_txt
      vmf_on "$vmf_a1";;
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
