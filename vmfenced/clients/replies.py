"""Results of the socket protocol (docs/protocol.md) parsed strictly into client_records' types.

A reply that does not have the documented shape is a ProtocolViolation, never a guess.
"""

from __future__ import annotations

import math

from vmfenced.clients.errors import JsonObject, ProtocolViolation
from vmfenced.clients.records import (
    DaemonInfo,
    FenceResult,
    HistoryEntry,
    HistoryResult,
    HostInfo,
    JournalInfo,
    MissingNode,
    ReloadResult,
    StatusResult,
    VmInfo,
    VmState,
)

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing would cost every agent call its import time; only mypy needs it
    from typing import TypeVar

    _T = TypeVar("_T")


def _get(obj: JsonObject, key: str, kind: type[_T], where: str) -> _T:
    value = obj.get(key)
    # bool is an int subclass; a JSON true is never a count or a time.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolViolation(f"{where}: {key!r} is {value!r}, expected {kind.__name__}")
    return value


def _str(obj: JsonObject, key: str, where: str) -> str:
    return _get(obj, key, str, where)


def _opt_str(obj: JsonObject, key: str, where: str) -> str | None:
    return None if obj.get(key) is None else _str(obj, key, where)


def _int(obj: JsonObject, key: str, where: str) -> int:
    return _get(obj, key, int, where)


def _opt_int(obj: JsonObject, key: str, where: str) -> int | None:
    return None if obj.get(key) is None else _int(obj, key, where)


def _num(obj: JsonObject, key: str, where: str) -> float:
    value = obj.get(key)
    # JSON's 1e400 parses as infinity: no time or count the daemon sends can be that.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProtocolViolation(f"{where}: {key!r} is {value!r}, expected a finite number")
    return float(value)


def _opt_num(obj: JsonObject, key: str, where: str) -> float | None:
    return None if obj.get(key) is None else _num(obj, key, where)


def _lane_address(host: JsonObject, lane: str) -> str | None:
    """`connected_address.<lane>`; absent from daemons older than fallback addresses."""
    if host.get("connected_address") is None:
        return None
    addresses: JsonObject = _get(host, "connected_address", dict, "status host")
    return _opt_str(addresses, lane, "status host connected_address")


def _strings(obj: JsonObject, key: str, where: str) -> tuple[str, ...]:
    """An optional list of strings (absent from older daemons and other kinds)."""
    items = obj.get(key)
    if items is None:
        return ()
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ProtocolViolation(f"{where}: {key!r} is {items!r}, expected a list of strings")
    return tuple(items)


def _objects(obj: JsonObject, key: str, where: str) -> list[JsonObject]:
    items: list[object] = _get(obj, key, list, where)
    objects = [item for item in items if isinstance(item, dict)]
    if len(objects) != len(items):
        raise ProtocolViolation(f"{where}: {key!r} holds a non-object")
    return objects


def _vm(obj: JsonObject, where: str) -> VmInfo:
    return VmInfo(
        name=_str(obj, "name", where),
        alias=_opt_str(obj, "alias", where),
        host=_opt_str(obj, "host", where),
        state=_str(obj, "state", where),
        cartel=_opt_int(obj, "cartel", where),
    )


def _journal(result: JsonObject, key: str, where: str) -> JournalInfo | None:
    """The journal's state; absent (None) from daemons older than its backlog."""
    if result.get(key) is None:
        return None
    journal: JsonObject = _get(result, key, dict, where)
    where = f"{where} {key}"
    state = _str(journal, "state", where)
    if state not in ("ok", "failing"):
        raise ProtocolViolation(f"{where}: state {state!r} is neither 'ok' nor 'failing'")
    return JournalInfo(
        path=_str(journal, "path", where),
        state=state,
        error=_opt_str(journal, "error", where),
        since=_opt_num(journal, "since", where),
        backlog=_int(journal, "backlog", where),
        backlog_max=_int(journal, "backlog_max", where),
        dropped=_int(journal, "dropped", where),
    )


def parse_status(result: JsonObject) -> StatusResult:
    daemon: JsonObject = _get(result, "daemon", dict, "status")
    hosts = tuple(
        HostInfo(
            name=_str(h, "name", "status host"),
            address=_str(h, "address", "status host"),
            port=_int(h, "port", "status host"),
            kind=_str(h, "kind", "status host"),
            state=_str(h, "state", "status host"),
            since=_opt_num(h, "since", "status host"),
            reason=_opt_str(h, "reason", "status host"),
            rtt_ms=_opt_num(h, "rtt_ms", "status host"),
            inventory_age_s=_opt_num(h, "inventory_age_s", "status host"),
            vm_count=_int(h, "vm_count", "status host"),
            fence_address=_lane_address(h, "fence"),
            inventory_address=_lane_address(h, "inventory"),
            listing_problem=_opt_str(h, "listing_problem", "status host"),
            mode=_opt_str(h, "mode", "status host"),
            helper_version=_opt_str(h, "helper_version", "status host"),
            path=_opt_str(h, "path", "status host"),
            warnings=_strings(h, "warnings", "status host"),
        )
        for h in _objects(result, "hosts", "status")
    )
    return StatusResult(
        daemon=DaemonInfo(
            version=_str(daemon, "version", "status daemon"),
            pid=_int(daemon, "pid", "status daemon"),
            uptime_s=_num(daemon, "uptime_s", "status daemon"),
        ),
        hosts=hosts,
        vms=tuple(_vm(v, "status vm") for v in _objects(result, "vms", "status")),
        journal=_journal(result, "journal", "status"),
        missing_nodes=_missing_nodes(result),
    )


def _missing_nodes(result: JsonObject) -> tuple[MissingNode, ...]:
    """Proxmox nodes missing from the config; absent from daemons before Proxmox."""
    if result.get("missing_nodes") is None:
        return ()
    out = []
    for obj in _objects(result, "missing_nodes", "status"):
        vms = _get(obj, "vms", list, "status missing node")
        if not all(isinstance(v, str) for v in vms):
            raise ProtocolViolation(f"status missing node: 'vms' is {vms!r:.200}, expected strings")
        out.append(MissingNode(_str(obj, "node", "status missing node"), tuple(vms)))
    return tuple(out)


def parse_list(result: JsonObject) -> tuple[VmInfo, ...]:
    return tuple(_vm(v, "list vm") for v in _objects(result, "vms", "list"))


def parse_vm_status(result: JsonObject) -> VmState:
    state = _str(result, "state", "vm_status")
    # The agent's exit code hangs on this value: anything but on/off is a broken reply.
    if state not in ("on", "off"):
        raise ProtocolViolation(f"vm_status: state {state!r} is neither 'on' nor 'off'")
    return VmState(
        vm=_str(result, "vm", "vm_status"),
        state=state,
        host=_opt_str(result, "host", "vm_status"),
        cartel=_opt_int(result, "cartel", "vm_status"),
    )


def _names(obj: JsonObject, key: str, where: str) -> tuple[str, ...]:
    items: list[object] = _get(obj, key, list, where)
    if not all(isinstance(item, str) for item in items):
        raise ProtocolViolation(f"{where}: {key!r} holds a non-string")
    return tuple(str(item) for item in items)


def parse_reload(result: JsonObject) -> ReloadResult:
    return ReloadResult(
        changed=_get(result, "changed", bool, "reload"),
        added=_names(result, "added", "reload"),
        removed=_names(result, "removed", "reload"),
        replaced=_names(result, "replaced", "reload"),
        unchanged=_names(result, "unchanged", "reload"),
        settings=_names(result, "settings", "reload"),
        elapsed_ms=_opt_num(result, "elapsed_ms", "reload"),
    )


def _history_entry(obj: JsonObject) -> HistoryEntry:
    where = "history entry"
    peer = obj.get("peer")
    peer = peer if isinstance(peer, dict) else {}
    joined = obj.get("joined")
    return HistoryEntry(
        t=_num(obj, "t", where),
        vm=_str(obj, "vm", where),
        target=_str(obj, "target", where),
        action=_str(obj, "action", where),
        result=_str(obj, "result", where),
        ok=_get(obj, "ok", bool, where),
        host=_opt_str(obj, "host", where),
        cartel=_opt_int(obj, "cartel", where),
        reason=_opt_str(obj, "reason", where),
        joined=joined is True,
        elapsed_ms=_opt_num(obj, "elapsed_ms", where),
        total_ms=_opt_num(obj, "total_ms", where),
        peer_uid=_opt_int(peer, "uid", where),
        peer_pid=_opt_int(peer, "pid", where),
    )


def parse_history(result: JsonObject) -> HistoryResult:
    skipped = result.get("skipped")
    return HistoryResult(
        entries=tuple(_history_entry(e) for e in _objects(result, "entries", "history")),
        skipped=skipped if isinstance(skipped, int) and not isinstance(skipped, bool) else 0,
        journal=_opt_str(result, "journal", "history"),
        journal_state=_journal(result, "journal_state", "history"),
    )


def parse_metrics(result: JsonObject) -> str:
    return _str(result, "text", "metrics")


def parse_fence(result: JsonObject) -> FenceResult:
    joined = result.get("joined")
    joined = False if joined is None else joined
    if not isinstance(joined, bool):
        raise ProtocolViolation(f"fence: 'joined' is {joined!r}, expected a boolean")
    return FenceResult(
        vm=_str(result, "vm", "fence"),
        action=_str(result, "action", "fence"),
        outcome=_str(result, "outcome", "fence"),
        host=_opt_str(result, "host", "fence"),
        cartel=_opt_int(result, "cartel", "fence"),
        elapsed_ms=_opt_num(result, "elapsed_ms", "fence"),
        joined=joined,
        warning=_opt_str(result, "warning", "fence"),
        journal_warning=_opt_str(result, "journal_warning", "fence"),
        ha=_opt_str(result, "ha", "fence"),
    )
