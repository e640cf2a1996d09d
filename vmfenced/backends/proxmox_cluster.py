"""Proxmox VE's cluster filesystem (/etc/pve): paths, the awk that reads VM configs, and the
registration listing of the whole cluster, framed by byte lengths and parsed strictly.

Any one node answers for the whole cluster: `/etc/pve/.vmlist` (JSON: VMID -> owner node and
type; only `qemu` entries count) and the name of every VM config. The shell sends each value
with its length in bytes before it, so a file's content can never be read as a frame of its
own; .vmlist is parsed here as JSON with duplicate-key, type and key checks, never by pattern.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

from vmfenced.backends import ShFunction, procfs
from vmfenced.backends.text import check_name
from vmfenced.errors import ParseError
from vmfenced.model import RegisteredVM

RUN_DIR = "/var/run/qemu-server"
PVE_DIR = "/etc/pve"

VMID = r"[1-9][0-9]{0,8}"
# Proxmox node names are host names; anything else in a path or a .vmlist is not a node.
NODE = r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,62})"
VMID_RE = re.compile(rf"\A{VMID}\Z")
NODE_RE = re.compile(rf"\A{NODE}\Z")
_SAFE_PATH = re.compile(r"\A/[A-Za-z0-9/._-]*\Z")

# vmf_pve_vm: whether the argv in A[] is the kvm of VMID v whose pid file lives in `run`
# (qemu-server's parse_cmdline + instance_running_locally). vmf_conf_name: the name in the
# current section of a VM config, "vm<vmid>" when unset, "\n" when the file cannot be read
# (parse_vm_config: `key: value` lines, the last one wins, sections start at `[`).
AWK_LIB = (
    procfs.AWK_LIB
    + r"""
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
"""
)

# ARGV[1] .vmlist, then every VM config: `vmf:vmlist LEN` and the file, then per config
# `vmf:conf LEN_NODE LEN_VMID LEN_NAME` and the three values, then `vmf:end`. Lengths are
# bytes (LC_ALL=C), so nothing inside a value can be read as a frame.
_AWK_REGISTERED = (
    AWK_LIB
    + r"""
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
"""
)


def _literal(path: str) -> str:
    if not _SAFE_PATH.fullmatch(path):
        raise ValueError(f"not a plain absolute path: {path!r}")
    return path


def awk(program: str, run_dir: str, pve_dir: str) -> str:
    """The program with its root paths set (tests run it against a temporary tree)."""
    head = f'BEGIN {{ RUN = "{_literal(run_dir)}"; PVE = "{_literal(pve_dir)}" }}\n'
    return head + program


def check_program(run_dir: str = RUN_DIR, pve_dir: str = PVE_DIR) -> str:
    """The judge of one PID (ARGV[1]): the kvm of ENVIRON["VMF_VMID"] (procfs.check_awk: exit
    10 when it is). The guarded kill's guard, and the HA power-on's wait."""
    return awk(procfs.check_awk(AWK_LIB, 'vmf_pve_vm(ENVIRON["VMF_VMID"], RUN)'), run_dir, pve_dir)


def registered_command(pve_dir: str = PVE_DIR) -> str:
    return registered_function(pve_dir).call()


def registered_function(pve_dir: str = PVE_DIR) -> ShFunction:
    pve = shlex.quote(pve_dir)
    program = shlex.quote(awk(_AWK_REGISTERED, RUN_DIR, pve_dir))
    body = f"""vmf_pr() {{
  [ -d {pve}/nodes ] || {{ echo "vmf:doubt no {pve_dir}/nodes: /etc/pve not mounted"; return 3; }}
  set -- {pve}/nodes/*/qemu-server/*.conf
  [ -e "$1" ] || set --
  LC_ALL=C awk {program} {pve}/.vmlist "$@"
}}"""
    return ShFunction("vmf_pr", (), body)


def conf_path(node: str, vmid: str, pve_dir: str = PVE_DIR) -> str:
    return f"{pve_dir}/nodes/{node}/qemu-server/{vmid}.conf"


# -- registrations: framed by byte lengths, then parsed strictly ------------------------------

_REGISTERED = "proxmox registrations"
_ENTRY_KEYS = frozenset({"node", "type", "version"})
_TYPES = frozenset({"qemu", "lxc", "openvz"})


class _Frames:
    """A reader of `header\\n` lines and byte-counted values over the output's bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def line(self) -> str:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            raise ParseError(_REGISTERED, "incomplete answer (no vmf:end)")
        raw = self.data[self.pos : end]
        self.pos = end + 1
        return _decode(raw)

    def take(self, size: int) -> bytes:
        value = self.data[self.pos : self.pos + size]
        if len(value) != size:
            raise ParseError(_REGISTERED, "incomplete answer (a value cut short)")
        self.pos += size
        return value

    def newline(self) -> None:
        if self.take(1) != b"\n":
            raise ParseError(_REGISTERED, "a value is longer than its frame says")


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError(_REGISTERED, f"not UTF-8: {raw[:200]!r}") from None


def parse_registered(text: str) -> tuple[RegisteredVM, ...]:
    """The whole cluster's VMs: .vmlist's `qemu` entries, each named by its config."""
    # The link replaces bytes that are not UTF-8 with U+FFFD, which changes byte lengths: a
    # frame could no longer be trusted.
    if "\ufffd" in text:
        raise ParseError(_REGISTERED, "the answer is not UTF-8 (U+FFFD)")
    frames = _Frames(text.encode("utf-8"))
    header = frames.line()
    match = re.fullmatch(r"vmf:vmlist ([0-9]{1,9})", header)
    if match is None:
        raise ParseError(_REGISTERED, f"unexpected answer: {text.strip()[:300]!r}")
    owners = parse_vmlist(_decode(frames.take(int(match[1]))))
    frames.newline()
    confs: dict[str, tuple[str, str]] = {}
    while True:
        header = frames.line()
        if header == "vmf:end":
            break
        match = re.fullmatch(r"vmf:conf ([0-9]{1,3}) ([0-9]{1,2}) ([0-9]{1,6})", header)
        if match is None:
            raise ParseError(_REGISTERED, f"line not understood: {header[:200]!r}")
        node = _decode(frames.take(int(match[1])))
        vmid = _decode(frames.take(int(match[2])))
        name = _decode(frames.take(int(match[3])))
        frames.newline()
        if not NODE_RE.fullmatch(node) or not VMID_RE.fullmatch(vmid):
            raise ParseError(_REGISTERED, f"config path not understood: {node!r}, {vmid!r}")
        if vmid in confs:
            raise ParseError(
                _REGISTERED, f"VMID {vmid} has a config on {confs[vmid][0]} and {node}"
            )
        if not name:
            raise ParseError(_REGISTERED, f"VMID {vmid} has an empty name")
        confs[vmid] = (node, check_name(_REGISTERED, name))
    if frames.pos != len(frames.data):
        raise ParseError(_REGISTERED, "output after vmf:end")
    return _join(owners, confs)


def _join(owners: dict[str, str], confs: dict[str, tuple[str, str]]) -> tuple[RegisteredVM, ...]:
    """.vmlist and the config files must agree: pmxcfs derives one from the other, so a
    difference is a change caught half-way (a migration, a create, a destroy): a doubt."""
    for vmid in sorted(set(owners) ^ set(confs), key=int):
        where = "in .vmlist" if vmid in owners else "a config"
        raise ParseError(_REGISTERED, f"VMID {vmid}: only {where} (changing now?)")
    out = []
    for vmid in sorted(owners, key=int):
        node, name = confs[vmid]
        if node != owners[vmid]:
            raise ParseError(
                _REGISTERED, f"VMID {vmid}: .vmlist says {owners[vmid]}, its config is on {node}"
            )
        out.append(
            RegisteredVM(vmid=vmid, name=name, config_file=conf_path(node, vmid), owner=node)
        )
    return tuple(out)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ParseError(_REGISTERED, f".vmlist: key {key!r:.80} appears twice")
        out[key] = value
    return out


def _no_constant(word: str) -> Any:
    raise ParseError(_REGISTERED, f".vmlist: {word} is not JSON")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_vmlist(text: str) -> dict[str, str]:
    """/etc/pve/.vmlist -> {VMID: owner node} of its `qemu` entries; anything unexpected
    (a duplicate key, a type, a key pmxcfs does not write) fails the whole list."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except ValueError as exc:
        raise ParseError(_REGISTERED, f".vmlist is not JSON: {exc}") from None
    except RecursionError:
        raise ParseError(_REGISTERED, ".vmlist nests too deep") from None
    if not isinstance(data, dict) or not set(data) <= {"version", "ids"}:
        raise ParseError(_REGISTERED, ".vmlist: not an object of version and ids")
    if not _is_int(data.get("version")):
        raise ParseError(_REGISTERED, ".vmlist: no integer version")
    ids = data.get("ids", {})
    if not isinstance(ids, dict):
        raise ParseError(_REGISTERED, ".vmlist: ids is not an object")
    owners = {}
    for vmid, entry in ids.items():
        if not VMID_RE.fullmatch(vmid):
            raise ParseError(_REGISTERED, f".vmlist: {vmid!r:.80} is not a VMID")
        if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
            raise ParseError(_REGISTERED, f".vmlist: entry {vmid} is not node, type, version")
        node, kind = entry["node"], entry["type"]
        if not isinstance(node, str) or not NODE_RE.fullmatch(node):
            raise ParseError(_REGISTERED, f".vmlist: entry {vmid} names no node: {node!r:.80}")
        if kind not in _TYPES or not _is_int(entry["version"]):
            raise ParseError(_REGISTERED, f".vmlist: entry {vmid} has a bad type or version")
        if kind == "qemu":
            owners[vmid] = node
    return owners
