"""The lab's pmxcfs: one ``/etc/pve`` tree that every lab Proxmox node sees (stdlib only).

pmxcfs is one cluster-wide filesystem, so the lab keeps one host directory and bind-mounts it on
``/etc/pve`` in every node's mount namespace (``vmflab.pid1.proxmox``). Everything here works on
that directory through a root path: the lab uses the host path, the ``qm``/``ha-manager``
stand-ins and the nodes' init use ``/etc/pve``; both share one lock and one counter file kept
beside the tree (not in it: the tree's layout stays exactly pmxcfs's).

What pmxcfs derives, the lab derives the same way: ``.vmlist`` follows the ``<vmid>.conf`` files
(``refresh_vmlist``), with pmxcfs's exact text (``status.c cfs_create_vmlist_msg``): a global
``version`` bumped on every change and a per-entry ``version`` from a second counter, assigned
when the entry is (re)inserted, i.e. on create and on a move to another node.

Standard library only: the nodes' PID 1 and the stand-ins import it with ``python3 -I -S``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

VMID = re.compile(r"^[1-9][0-9]{2,8}$")
NODE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
HA_STATES = ("started", "stopped", "disabled", "ignored")
# .vmlist's type -> the directory of its configs under nodes/<node>/.
GUEST_DIRS = {"qemu": "qemu-server", "lxc": "lxc"}
# A config line (QemuServer.pm parse_vm_config): ``key: value``.
CONF_LINE = re.compile(r"^([a-z][a-z_]*\d*):\s*(.*?)\s*$")


class TreeError(Exception):
    """The tree cannot do what was asked (a stand-in prints it and exits non-zero)."""


def check_vmid(vmid: int | str) -> int:
    text = str(vmid)
    if not VMID.match(text):
        raise TreeError(f"invalid VMID {text!r}")
    return int(text)


def check_node(node: str) -> str:
    if not NODE.match(node):
        raise TreeError(f"invalid node name {node!r}")
    return node


def write_atomic(path: Path, text: str, mode: int = 0o640) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(mode)
    tmp.replace(path)


def render_vmlist(version: int, entries: Mapping[int, tuple[str, str, int]]) -> str:
    """``.vmlist`` exactly as pmxcfs prints it; ``entries``: VMID -> (node, type, entry
    version). pmxcfs iterates a hash table (no order); the lab sorts by VMID."""
    if not entries:
        return '{\n"version": %u\n\n}\n' % version  # noqa: UP031 (status.c's format)
    rows = [
        '"%u": { "node": "%s", "type": "%s", "version": %u }' % (vmid, node, kind, entry)  # noqa: UP031
        for vmid, (node, kind, entry) in sorted(entries.items())
    ]
    head = '{\n"version": %u,\n"ids": {\n' % version  # noqa: UP031 (status.c's format)
    return head + ",\n".join(rows) + "}\n\n}\n"


def render_members(local: str, nodes: Sequence[tuple[str, str, bool]], version: int) -> str:
    """``.members`` as pmxcfs prints it for node ``local``; ``nodes``: (name, ip, online)."""
    rows = [
        f'  "{name}": {{ "id": {number}, "online": {int(online)}, "ip": "{ip}"}}'
        for number, (name, ip, online) in enumerate(nodes, start=1)
    ]
    quorate = int(sum(online for _, _, online in nodes) * 2 > len(nodes))
    cluster = f'{{ "name": "vmflab", "version": 2, "nodes": {len(nodes)}, "quorate": {quorate} }}'
    return (
        f'{{\n"nodename": "{local}",\n"version": {version},\n"cluster": {cluster},\n'
        + '"nodelist": {\n'
        + ",\n".join(rows)
        + "\n  }\n}\n"
    )


def parse_conf(text: str) -> dict[str, str]:
    """The current config's options: the part before the first ``[section]``; lines split on
    "\\n" only; a line that is neither an option, a comment nor blank fails."""
    options: dict[str, str] = {}
    for line in text.split("\n"):
        if line.startswith("["):
            break
        if not line.strip() or line.startswith("#"):
            continue
        match = CONF_LINE.match(line)
        if match is None:
            raise TreeError(f"unreadable config line {line!r}")
        options[match.group(1)] = match.group(2)
    return options


@dataclass(frozen=True)
class HaResource:
    vmid: int
    state: str


class PveTree:
    """``root``: the tree (host path or ``/etc/pve``); ``state``: the lab's lock and counters,
    beside the tree."""

    def __init__(self, root: Path, state: Path) -> None:
        self.root = root
        self.state = state

    # ------------------------------------------------------------------ layout
    def create(self, nodes: Sequence[str]) -> None:
        """An empty cluster tree for ``nodes`` (lab side, before any node starts)."""
        for node in nodes:
            for kind in GUEST_DIRS.values():
                (self.root / "nodes" / check_node(node) / kind).mkdir(parents=True, exist_ok=True)
        (self.root / "ha").mkdir(exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        with self.locked():
            if not (self.root / ".vmlist").exists():
                self._write_counters(1, 0)
                write_atomic(self.root / ".vmlist", render_vmlist(1, {}), 0o440)
            for name in ("resources.cfg", "crm_commands"):
                if not (self.root / "ha" / name).exists():
                    write_atomic(self.root / "ha" / name, "")

    def conf_path(self, node: str, vmid: int) -> Path:
        return self.root / "nodes" / check_node(node) / "qemu-server" / f"{check_vmid(vmid)}.conf"

    def nodes(self) -> list[str]:
        return sorted(p.name for p in (self.root / "nodes").iterdir() if p.is_dir())

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One writer at a time across every node and the lab (pmxcfs serialises writes)."""
        self.state.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------------- VMs
    def owner(self, vmid: int) -> str | None:
        """The node whose directory holds ``<vmid>.conf`` (pmxcfs's notion of owner)."""
        found = [n for n in self.nodes() if self.conf_path(n, vmid).exists()]
        if len(found) > 1:
            raise TreeError(f"VMID {vmid} configured on {found}")
        return found[0] if found else None

    def read_conf(self, vmid: int) -> tuple[str, dict[str, str]]:
        node = self.owner(vmid)
        if node is None:
            raise TreeError(f"Configuration file 'nodes/*/qemu-server/{vmid}.conf' does not exist")
        return node, parse_conf(self.conf_path(node, vmid).read_text(encoding="utf-8"))

    def write_conf(self, node: str, vmid: int, options: Mapping[str, str]) -> None:
        """Creates or rewrites the VM's config on ``node`` (its owner, if it has one)."""
        with self.locked():
            owner = self.owner(vmid)
            if owner is not None and owner != node:
                raise TreeError(f"VMID {vmid} belongs to {owner}, not {node}")
            text = "".join(f"{key}: {value}\n" for key, value in options.items())
            write_atomic(self.conf_path(node, vmid), text)
            self._refresh()

    def set_option(self, vmid: int, key: str, value: str | None) -> None:
        """Sets (or, with None, removes) one option of the current config."""
        with self.locked():
            node, options = self.read_conf(vmid)
            if value is None:
                options.pop(key, None)
            else:
                options[key] = value
            text = "".join(f"{k}: {v}\n" for k, v in options.items())
            write_atomic(self.conf_path(node, vmid), text)

    def remove_conf(self, vmid: int) -> None:
        with self.locked():
            node = self.owner(vmid)
            if node is None:
                raise TreeError(f"VMID {vmid} does not exist")
            self.conf_path(node, vmid).unlink()
            self._refresh()

    def move_conf(self, vmid: int, target: str) -> None:
        """``move_config_to_node``: the file is renamed into the target node's directory."""
        with self.locked():
            node = self.owner(vmid)
            if node is None:
                raise TreeError(f"VMID {vmid} does not exist")
            self.conf_path(node, vmid).rename(self.conf_path(target, vmid))
            self._refresh()

    def vmlist(self, kind: str = "qemu") -> dict[int, str]:
        """VMID -> node of the guests of type ``kind`` as ``.vmlist`` says now."""
        data = json.loads((self.root / ".vmlist").read_text(encoding="utf-8"))
        return {int(k): v["node"] for k, v in data.get("ids", {}).items() if v["type"] == kind}

    def write_ct_conf(self, node: str, vmid: int, hostname: str) -> None:
        """An LXC container's config (``nodes/<node>/lxc/<vmid>.conf``; its name is
        ``hostname``); a VMID is unique across VMs and containers."""
        with self.locked():
            if self.owner(vmid) is not None or any(
                (self.root / "nodes" / n / "lxc" / f"{vmid}.conf").exists() for n in self.nodes()
            ):
                raise TreeError(f"VMID {vmid} already exists")
            text = f"arch: amd64\nhostname: {hostname}\nostype: debian\n"
            write_atomic(self.root / "nodes" / check_node(node) / "lxc" / f"{vmid}.conf", text)
            self._refresh()

    def refresh_vmlist(self) -> None:
        with self.locked():
            self._refresh()

    def _refresh(self) -> None:
        """``.vmlist`` follows the config files; the caller holds the lock."""
        old = json.loads((self.root / ".vmlist").read_text(encoding="utf-8"))
        before = {
            int(k): (v["node"], v["type"], v["version"]) for k, v in old.get("ids", {}).items()
        }
        version, counter = self._read_counters()
        now: dict[int, tuple[str, str, int]] = {}
        for node in self.nodes():
            for kind, directory in GUEST_DIRS.items():
                for conf in (self.root / "nodes" / node / directory).glob("*.conf"):
                    vmid = int(conf.stem)
                    if vmid in before and before[vmid][:2] == (node, kind):
                        now[vmid] = before[vmid]
                    else:
                        counter += 1
                        now[vmid] = (node, kind, counter)
        if now != before:
            version += 1
            self._write_counters(version, counter)
            write_atomic(self.root / ".vmlist", render_vmlist(version, now), 0o440)

    def _read_counters(self) -> tuple[int, int]:
        version, counter = (self.state / "counters").read_text(encoding="ascii").split()
        return int(version), int(counter)

    def _write_counters(self, version: int, counter: int) -> None:
        write_atomic(self.state / "counters", f"{version} {counter}\n", 0o600)

    # -------------------------------------------------------------------- HA
    def quorate(self) -> bool:
        """Whether this node's ``.members`` says the cluster is quorate (pmxcfs is read-only
        on a node without quorum)."""
        try:
            data = json.loads((self.root / ".members").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return bool(data.get("cluster", {}).get("quorate"))

    def ha_resources(self) -> dict[int, HaResource]:
        """``ha/resources.cfg``: ``vm: <vmid>`` sections with an indented ``state`` line
        (default ``started``)."""
        found: dict[int, HaResource] = {}
        current: int | None = None
        text = (self.root / "ha" / "resources.cfg").read_text(encoding="utf-8")
        for line in text.split("\n"):
            if not line.strip():
                current = None
                continue
            if line.startswith(("\t", " ")):
                key, _, value = line.strip().partition(" ")
                if current is None:
                    raise TreeError(f"option outside a section: {line!r}")
                if key == "state":
                    found[current] = HaResource(current, "started" if value == "enabled" else value)
                continue
            kind, _, sid = line.partition(": ")
            if kind != "vm":
                raise TreeError(f"unreadable resources.cfg line {line!r}")
            current = check_vmid(sid)
            found[current] = HaResource(current, "started")
        return found

    def ha_state(self, vmid: int) -> str | None:
        """The VM's requested HA state, None when it is not HA-managed (absent or ignored)."""
        resource = self.ha_resources().get(vmid)
        return None if resource is None or resource.state == "ignored" else resource.state

    def set_ha(self, vmid: int, state: str | None) -> None:
        """Adds, changes (``ha-manager set``) or (None) removes the VM's HA resource."""
        if state is not None and state not in HA_STATES:
            raise TreeError(f"invalid HA state {state!r}")
        with self.locked():
            resources = self.ha_resources()
            if state is None:
                resources.pop(vmid, None)
            else:
                resources[vmid] = HaResource(vmid, state)
            text = "".join(
                f"vm: {r.vmid}\n\tstate {r.state}\n\n" for _, r in sorted(resources.items())
            )
            write_atomic(self.root / "ha" / "resources.cfg", text)

    def queue_crm_command(self, line: str) -> None:
        """``ha-manager crm-command``: one line appended to ``ha/crm_commands``."""
        with self.locked():
            path = self.root / "ha" / "crm_commands"
            write_atomic(path, path.read_text(encoding="utf-8") + line + "\n")

    def take_crm_commands(self) -> list[str]:
        """The CRM reads and clears the queued commands."""
        with self.locked():
            path = self.root / "ha" / "crm_commands"
            lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line]
            if lines:
                write_atomic(path, "")
            return lines

    def write_manager_status(self, master: str, services: Mapping[int, tuple[str, str]]) -> None:
        """``ha/manager_status``: the CRM's JSON; ``services``: VMID -> (node, state)."""
        status = {
            "master_node": master,
            "node_status": dict.fromkeys(self.nodes(), "online"),
            "service_status": {
                f"vm:{vmid}": {"node": node, "state": state, "uid": f"{vmid:x}{os.getpid():x}"}
                for vmid, (node, state) in sorted(services.items())
            },
            "timestamp": int(time.time()),
        }
        write_atomic(self.root / "ha" / "manager_status", json.dumps(status))
