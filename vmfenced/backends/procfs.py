"""Linux /proc helpers shared by the backends of Linux hosts (libvirt/KVM, ESX classic).

POSIX awk functions (gawk and mawk read NUL-separated /proc/PID/cmdline with RS = "\\0") and the
guarded kill script built on them. "Dead" is decided in one place: a process is dead when
/proc/PID is gone, its state is X, or it is a zombie whose last thread has exited (a zombie
leader with threads still in the kernel may still have I/O in flight).

A process that is not dead but whose command line reads empty or cannot be read (a zombie leader
whose threads still run; a process that emptied its argv area) cannot be judged: when it could
be a VM process it is a doubt, never "not running". Kernel threads (PF_KTHREAD) have no command
line by nature and are never VMs.
"""

from __future__ import annotations

import re
import shlex

from vmfenced.backends import ShFunction
from vmfenced.backends.text import split_lines
from vmfenced.errors import ParseError

# Builtin checks of a killed PID before the host-side wait starts paying for `sleep`.
SPIN = 200

# Inside a `for vmf_f in DIR/*.pid` loop of a listing function: the PID in "$vmf_f" into vmf_v,
# or a doubt (return 3). A file gone meanwhile is skipped (its VM stopped). A leading zero
# would name no /proc entry: a running VM read as gone, so it is a doubt too.
READ_PID_FILE = """    vmf_v=
    { read -r vmf_v < "$vmf_f"; } 2>/dev/null
    case $vmf_v in
      ''|*[!0-9]*|0*) [ -e "$vmf_f" ] && { echo "vmf:doubt bad pid file $vmf_f"; return 3; }
        continue;;
    esac
"""

# vmf_args fills A[] with a process's argv and returns its length, -1 when unreadable; vmf_stat
# fills S[] with the fields after "(comm) " (S[1] state, S[7] flags, S[18] num_threads, S[20]
# starttime), sets C to comm and returns 0 when the process is gone; vmf_opt returns the argument
# after option o ("\n": none). vmf_kthread tests PF_KTHREAD (0x00200000, Linux >= 2.6.27: not for
# the 2.4 service console of ESX classic) in the flags without bitwise operators, which POSIX
# awk (mawk) lacks.
AWK_LIB = r"""
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
"""


def kill_tries(budget: float) -> int:
    """How many times the guarded kill checks the PID before answering `vmf:alive`."""
    return SPIN + max(1, int(budget / 0.01))


def kill_function(env_name: str, check_awk: str) -> ShFunction:
    """`vmf_kill VALUE PID TRIES`, one round trip: `check_awk` says the PID runs the expected VM,
    kill -9, wait until dead (TRIES checks, those after the first SPIN sleeping 10 ms).

    `check_awk` gets the PID as ARGV[1] and VALUE as ENVIRON[env_name]; it prints the
    process's starttime and exits 10 when the PID is that VM, 11 gone or dead, 12 something
    else, 13 no verdict. Dead also means the PID now belongs to a process started later
    (starttime differs: reused after our kill was reaped). A check that cannot conclude is
    `vmf:error`, never "not running".
    """
    body = f"""vmf_chk() {{
  vmf_o=$(awk {shlex.quote(check_awk)} "$vmf_p" 2>&1)
  case $? in
    10) vmf_start=${{vmf_o##*[!0-9]}}; return 0;;
    11) return 1;;
    12) return 2;;
  esac
  [ -r /proc/1/stat ] && [ ! -e "/proc/$vmf_p" ] && return 1
  return 3
}}
vmf_gone() {{
  vmf_l=
  {{ read -r vmf_l < "/proc/$vmf_p/stat"; }} 2>/dev/null
  [ -n "$vmf_l" ] || return 0
  set -- ${{vmf_l##*) }}
  [ "$1" = X ] && return 0
  [ "$1" = Z ] && [ "${{18}}" = 1 ] && return 0
  [ -n "$vmf_start" ] && [ "${{20}}" != "$vmf_start" ] && return 0
  return 1
}}
vmf_kill() {{
  {env_name}=$1; export {env_name}; vmf_p=$2; vmf_tries=$3; vmf_start=
  vmf_chk; vmf_r=$?
  if [ "$vmf_r" -eq 0 ]; then
    if ! kill -9 "$vmf_p" 2>/dev/null && ! vmf_gone; then
      echo "kill -9 $vmf_p refused"; echo vmf:error
    else
      vmf_i=0
      while ! vmf_gone; do
        vmf_i=$((vmf_i + 1)); [ "$vmf_i" -ge "$vmf_tries" ] && break
        [ "$vmf_i" -gt {SPIN} ] && {{ sleep 0.01 2>/dev/null || sleep 1; }}
      done
      if vmf_gone; then echo vmf:killed; else echo vmf:alive; fi
    fi
  else
    case $vmf_r in
      1) echo vmf:not-running;;
      2) echo vmf:not-that-vm;;
      *) printf '%s\\n' "$vmf_o"; echo vmf:error;;
    esac
  fi
}}"""
    return ShFunction("vmf_kill", ("str", "num", "num"), body)


def check_awk(lib: str, is_vm: str) -> str:
    """The awk program that judges one process (PID in ARGV[1]): it prints the starttime and
    exits 10 when `is_vm` (an awk expression over A[]) holds, 11 when the process is gone or
    dead, 12 when it is something else, 13 when there is no verdict (unreadable argv)."""
    return (
        lib
        + r"""
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
  if (!("""
        + is_vm
        + r""")) exit 12
  print S[20]
  exit 10
}
"""
    )


def marked_lines(text: str, what: str, line: re.Pattern[str]) -> list[re.Match[str]]:
    """The `vmf:vm ...` lines of a listing script, which must end with `vmf:end`.

    Strict: a line we cannot read, or an answer cut short, could hide a running VM.
    """
    matches = []
    ended = False
    for number, raw in enumerate(split_lines(text), 1):
        if ended:
            raise ParseError(what, f"line {number} after the end: {raw[:200]!r}")
        if raw == "vmf:end":
            ended = True
            continue
        match = line.match(raw)
        if match is None:
            raise ParseError(what, f"line {number} not understood: {raw[:200]!r}")
        matches.append(match)
    if not ended:
        raise ParseError(what, "incomplete answer (no vmf:end)")
    return matches
