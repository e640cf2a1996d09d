"""`vmfenced-host`: the host-side helper a restricted key runs instead of a shell.

The program is assembled here, from the same sh functions shell mode sends (`Backend`): the
listings, the registration listing, the guarded kill and the power-on of the kind, plus a
dispatcher that reads one request a line on stdin for the life of the channel:

    TOKEN VERB ARG...

TOKEN is 16 lowercase hex digits, VERB one of the words below; a number argument is decimal
without leading zeros, a text argument the lowercase hex of its UTF-8 bytes ("-" for empty),
or "=" and the text itself when it holds only letters, digits and `._/+:@,=-` (most names and
paths: no decoding on the host), so a name is data from the wire to the function's "$1",
never shell text. The answer is the
operation's output, then "\\n:vmf-end:TOKEN:STATUS\\n", exactly as shell mode frames it. A
request outside this grammar is refused with a `vmf:refused REASON` line, logged with `logger`
and the client's address, and ends the session: after a malformed request the stream cannot be
trusted, so nothing after it is served.

The generated text is shipped as package data (`vmfenced/hosthelper/KIND.sh`) so that
vmfencectl, which may not import the backends, prints it; a unit test checks that the shipped
files are exactly what `program` builds, and the daemon checks at every connection that the
host runs the same version (a digest of the text).
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from vmfenced.backends import Arg, Backend, ShFunction

PROTOCOL = 1
# Longer requests are refused: the longest real one (a power-on with a 255-character name and
# path, hex-encoded) is about 2 KiB.
MAX_REQUEST = 8192
VERSION_MARK = "@VMFENCED_HOST_VERSION@"
URI_MARK = "@VMFENCED_LIBVIRT_URI@"
# The shipped programs, one per kind (vmfencectl host-helper reads them).
DATA_DIR = Path(__file__).resolve().parent.parent / "hosthelper"
# Separates the guarded kill's answer from the listing that follows it in one command.
LISTING_MARK = "vmf:listing-after-kill"
_TOKEN = re.compile(r"^[0-9a-f]{16}$")
# Text that travels as itself ("=TEXT"); anything else is hex-encoded.
_PLAIN = re.compile(r"[A-Za-z0-9._/+:@,=-]+")

_PRELUDE = r"""vmf_from=${SSH_CONNECTION%% *}
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
"""

_LOOP = r"""# The key runs this program whatever the client asked: any other command is refused.
if [ -n "${SSH_ORIGINAL_COMMAND+x}" ] && [ "$SSH_ORIGINAL_COMMAND" != vmfenced-host ]
then
  vmf_refuse "command not allowed: $SSH_ORIGINAL_COMMAND"
  exit 1
fi
while :; do
  vmf_req=
  IFS= read -r vmf_req || exit 0
  if [ "${#vmf_req}" -gt @MAX@ ]; then
    vmf_refuse "request over @MAX@ bytes"; exit 2
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
"""


def _validated_call(function: ShFunction) -> str:
    """Lines that check "$@" against the function's grammar, then call it."""
    lines = [f"vmf_nargs {len(function.params)} $# || return"]
    names = []
    for number, param in enumerate(function.params, 1):
        if param == "num":
            lines.append(f'vmf_num "${number}" || return')
            names.append(f'"${number}"')
        else:
            lines.append(f'vmf_str "${number}" || return; vmf_a{number}=$vmf_txt')
            names.append(f'"$vmf_a{number}"')
    lines.append(" ".join([function.name, *names]))
    return "\n      ".join(lines)


def _dispatcher(backend: Backend) -> str:
    listings = " ".join(
        f"{number}) {listing.function.name};;" for number, listing in enumerate(backend.listings, 1)
    )
    kill = _validated_call(backend.kill)
    first = backend.listings[0].function.name
    hold = ""
    if backend.hold_off is not None:
        hold = f"\n    hold-off)\n      {_validated_call(backend.hold_off)};;"
    return f"""vmf_serve() {{
  vmf_verb=$1; shift
  case $vmf_verb in
    ping)
      vmf_nargs 0 $#;;
    hello)
      vmf_nargs 1 $# || return
      vmf_str "$1" || return
      printf 'vmf:helper %s %s %s\\n' "$VMF_VERSION" "$VMF_KIND" "$VMF_IDENT"
      [ "$vmf_txt" = "$VMF_VERSION" ] && return 0
      vmf_refuse "version mismatch: the daemon expects $vmf_txt"
      return 1;;
    list)
      vmf_nargs 1 $# || return
      case $1 in {listings} *) vmf_bad="no listing $1";; esac;;
    registered)
      vmf_nargs 0 $# || return
      {backend.registered.name};;
    kill)
      {kill};;
    kill-list)
      {kill}
      echo {LISTING_MARK}
      {first};;
    on)
      {_validated_call(backend.power_on)};;{hold}
    *)
      vmf_bad="unknown request: $vmf_verb";;
  esac
}}
"""


def _ident(backend: Backend) -> str:
    """The variable the setup of this kind sets, never one a client's environment could
    bring to a kind whose setup does not set it."""
    if backend.ident == "libvirt-uri":
        return '"$LIBVIRT_DEFAULT_URI"'
    if backend.ident == "pve-node":
        return '"${VMF_PVE_NODE:--}"'
    return "-"


_DEFINITION = re.compile(r"^ *([A-Za-z_][A-Za-z0-9_]*) *\(\) *\{", re.M)


@cache
def template(backend: Backend) -> str:
    """The helper of a kind, its libvirt URI still the placeholder `URI_MARK`."""
    functions: list[ShFunction] = [
        *(listing.function for listing in backend.listings),
        backend.registered,
        backend.kill,
        backend.power_on,
        *([] if backend.hold_off is None else [backend.hold_off]),
    ]
    head = f"""#!/bin/sh
# vmfenced-host {VERSION_MARK} for {backend.kind} hosts: the only things vmfenced's key may do
# here (list processes and registrations, the guarded kill of one VM, power-on of one
# registered VM). Printed by `vmfencectl host-helper --kind {backend.kind}`: replace it with a
# newer vmfencectl's output rather than edit it; vmfenced checks the version at every
# connection. One request a line on stdin; anything else is refused and logged (logger).
VMF_VERSION={VERSION_MARK}
VMF_KIND={backend.kind}
{backend.setup(URI_MARK)}
# Who this host is, in the hello answer: the libvirt URI, or the Proxmox node (its hostname).
VMF_IDENT={_ident(backend)}
"""
    body = "\n".join(f.body for f in functions)
    loop = _LOOP.replace("@MAX@", str(MAX_REQUEST))
    text = f"{head}{_PRELUDE}{body}\n{_dispatcher(backend)}{loop}"
    # Shell mode defines each function afresh per command; here they all share one program, so a
    # body redefining another's function, or the prelude's validators, would change what runs.
    defined = _DEFINITION.findall(text)
    twice = sorted({name for name in defined if defined.count(name) > 1})
    if twice:
        raise ValueError(f"{backend.kind} helper: functions defined twice: {', '.join(twice)}")
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return text.replace(VERSION_MARK, f"{PROTOCOL}-{digest}")


def version(backend: Backend) -> str:
    """What a host's helper must answer to `hello` for this daemon to use it."""
    text = template(backend)
    start = text.index("\nVMF_VERSION=") + len("\nVMF_VERSION=")
    return text[start : text.index("\n", start)]


@dataclass(frozen=True, slots=True)
class HelperSpec:
    """What a helper-mode host must run: the `vmfenced-host` of this kind and version, using
    this libvirt URI, or (Proxmox) on the node of this name; "-" for the other kinds."""

    kind: str
    version: str
    libvirt_uri: str

    def refusal(self, output: str) -> str | None:
        """Why the answer to `hello` does not let this daemon use the host (None: it does)."""
        words: list[str] = []
        for line in output.split("\n"):
            if line.startswith("vmf:helper "):
                words = line.split(" ")[1:]
        if len(words) != 3:
            shown = " ".join(output.split())[-200:]
            return f"no vmfenced-host answered: {shown or 'nothing'}"
        version, kind, uri = words
        hint = f"install the output of `vmfencectl host-helper --kind {self.kind}"
        if kind != self.kind:
            return f"the host's vmfenced-host serves {kind} hosts, not {self.kind}: {hint}`"
        if version != self.version:
            return (
                f"vmfenced-host version mismatch: the host runs {version}, "
                f"vmfenced expects {self.version}: {hint}`"
            )
        if uri != self.libvirt_uri and self.kind == "proxmox":
            # The helper names its node from the host's hostname, never from a request.
            return (
                f"the host's vmfenced-host runs on Proxmox node {uri}, this entry's node is "
                f"{self.libvirt_uri}: set pve_node to the node's name (its hostname)"
            )
        if uri != self.libvirt_uri:
            return (
                f"the host's vmfenced-host uses libvirt URI {uri}, this host's libvirt_uri is "
                f"{self.libvirt_uri}: {hint} --libvirt-uri {self.libvirt_uri}`"
            )
        return None


def spec(backend: Backend, libvirt_uri: str, node: str | None = None) -> HelperSpec:
    """`node`: a Proxmox host's node name (`HostConfig.node`), checked in the handshake."""
    if backend.ident == "libvirt-uri":
        return HelperSpec(backend.kind, version(backend), libvirt_uri)
    if backend.ident == "pve-node" and node is not None:
        return HelperSpec(backend.kind, version(backend), node)
    return HelperSpec(backend.kind, version(backend), "-")


def encode(params: tuple[str, ...], args: tuple[Arg, ...]) -> str:
    """The arguments of a request, each as the helper's grammar wants it."""
    if len(params) != len(args):
        raise ValueError(f"{len(params)} arguments expected, not {len(args)}")
    words = []
    for param, arg in zip(params, args, strict=True):
        if param == "num":
            words.append(str(int(arg)))
        elif _PLAIN.fullmatch(str(arg)):
            words.append(f"={arg}")
        else:
            words.append(str(arg).encode().hex() or "-")
    return " ".join(words)


def request(verb: str, function: ShFunction | None = None, args: tuple[Arg, ...] = ()) -> str:
    """One request line without its token: `VERB ARG...`."""
    if function is None:
        return f"{verb} {encode(('str',) * len(args), args)}".rstrip()
    return f"{verb} {encode(function.params, args)}".rstrip()


def framed(token: str, request_text: str) -> str:
    if not _TOKEN.match(token):
        raise ValueError(f"bad token {token!r}")
    return f"{token} {request_text}\n"


def write_data(directory: Path = DATA_DIR) -> list[Path]:
    """Writes the shipped programs (`python -m vmfenced.backends.helper`)."""
    from vmfenced.backends.registry import BACKENDS

    written = []
    for kind, backend in sorted(BACKENDS.items()):
        path = directory / f"{kind}.sh"
        path.write_text(template(backend))
        written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover - a maintainer's command
    for path in write_data():
        sys.stdout.write(f"wrote {path}\n")
