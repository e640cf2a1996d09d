#!/bin/sh
# vmfenced-host 1-cb965f02c0ff879f for esxi hosts: the only things vmfenced's key may do
# here (list processes and registrations, the guarded kill of one VM, power-on of one
# registered VM). Printed by `vmfencectl host-helper --kind esxi`: replace it with a
# newer vmfencectl's output rather than edit it; vmfenced checks the version at every
# connection. One request a line on stdin; anything else is refused and logged (logger).
VMF_VERSION=1-cb965f02c0ff879f
VMF_KIND=esxi
PATH="$PATH:/usr/lib/vmware/bin"; export PATH; LC_ALL=C; export LC_ALL
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
vmf_vmdumper() {
  vmdumper -l
}
vmf_esxcli() {
  esxcli --formatter=xml vm process list
}
vmf_getallvms() {
  vim-cmd vmsvc/getallvms
}
vmf_chk() {
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
}
vmf_on() {
  VMF_ID=$1; VMF_NAME=$2; VMF_FILE=$3; export VMF_ID VMF_NAME VMF_FILE
  if ! vmf_l=$(vim-cmd vmsvc/getallvms 2>&1); then
    printf '%s\n' "$vmf_l" | tail -n 3
    printf 'vmf:refused vim-cmd vmsvc/getallvms failed: cannot check what Vmid %s is\n' "$VMF_ID"
    return 1
  fi
  printf '%s\n' "$vmf_l" | awk '
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
'
  case $? in
    0) vim-cmd vmsvc/power.on "$VMF_ID"; return;;
    1) printf 'vmf:refused no Vmid %s on this host: nothing powered on\n' "$VMF_ID";;
    2) printf 'vmf:refused Vmid %s is no longer %s (%s) here: not powered on\n' \
         "$VMF_ID" "$VMF_NAME" "$VMF_FILE";;
    *) printf 'vmf:refused no getallvms table: cannot check what Vmid %s is\n' "$VMF_ID";;
  esac
  return 1
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
      case $1 in 1) vmf_vmdumper;; 2) vmf_esxcli;; *) vmf_bad="no listing $1";; esac;;
    registered)
      vmf_nargs 0 $# || return
      vmf_getallvms;;
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
      vmf_vmdumper;;
    on)
      vmf_nargs 3 $# || return
      vmf_str "$1" || return; vmf_a1=$vmf_txt
      vmf_str "$2" || return; vmf_a2=$vmf_txt
      vmf_str "$3" || return; vmf_a3=$vmf_txt
      vmf_on "$vmf_a1" "$vmf_a2" "$vmf_a3";;
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
