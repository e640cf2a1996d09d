"""The fence journal's records: one JSON line each, and reading them back from the rotated
files then the current one, oldest first.

Every line that is not a whole record (torn by a crash or a full disk, not JSON, another
version) is skipped and counted, never fatal.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FILE_NAME = "fences.jsonl"
VERSION = 1
MAX_KEEP = 100  # the config's upper bound on journal_keep


@dataclass(frozen=True, slots=True)
class FenceEntry:
    """One fence request and what came of it."""

    t: float  # Unix time the request arrived
    peer_uid: int | None
    peer_pid: int | None
    request_id: str | int | None
    vm: str  # as the client named it (alias or VM name)
    target: str  # the VM display name it resolved to
    action: str
    result: str  # the outcome (killed, already_off...) or failed, unknown_vm, cancelled, error
    ok: bool
    host: str | None = None
    cartel: int | None = None
    reason: str | None = None  # why it failed, or the warning of a success
    joined: bool = False
    elapsed_ms: float | None = None  # the fence itself, as the fencer timed it
    total_ms: float | None = None  # request received -> record written
    ha: str | None = None  # Proxmox: the HA stack's answer after `off` (docs/proxmox.md)

    def record(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "time": datetime.fromtimestamp(self.t, UTC).isoformat(timespec="milliseconds"),
            "t": round(self.t, 6),
            "peer": {"uid": self.peer_uid, "pid": self.peer_pid},
            "id": self.request_id,
            "vm": self.vm,
            "target": self.target,
            "action": self.action,
            "result": self.result,
            "ok": self.ok,
            "host": self.host,
            "cartel": self.cartel,
            "reason": self.reason,
            "joined": self.joined,
            "elapsed_ms": self.elapsed_ms,
            "total_ms": self.total_ms,
            "ha": self.ha,
            "daemon_pid": os.getpid(),
        }


def encode(record: dict[str, Any]) -> bytes:
    # ensure_ascii: a line is never split by a multi-byte character at a torn write.
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


def read(
    path: Path, vm: str | None = None, since: float | None = None, limit: int = 100
) -> tuple[list[dict[str, Any]], int]:
    """The newest `limit` records (oldest first) matching `vm` (either name) and `since`,
    and how many lines were skipped as not whole records."""
    kept: deque[dict[str, Any]] = deque(maxlen=limit)
    skipped = 0
    for record in _records(path):
        if record is None:
            skipped += 1
            continue
        if vm is not None and vm not in (record.get("vm"), record.get("target")):
            continue
        t = record.get("t")
        if since is not None and (not isinstance(t, int | float) or t < since):
            continue
        kept.append(record)
    return list(kept), skipped


def _records(path: Path) -> Iterator[dict[str, Any] | None]:
    """Every line of the rotated files then the current one; None for a line that is no record."""
    indexes = sorted(
        (
            int(p.name.rsplit(".", 1)[1])
            for p in path.parent.glob(path.name + ".*")
            if _is_rotated(p, path)
        ),
        reverse=True,
    )
    for file in [*(rotated(path, i) for i in indexes), path]:
        try:
            handle = file.open("rb")
        except FileNotFoundError:
            continue  # rotated away while we read
        with handle:
            for line in handle:
                if not line.strip():
                    continue
                yield _decode(line)


def _decode(line: bytes) -> dict[str, Any] | None:
    if not line.endswith(b"\n"):
        return None  # torn: the writer died in the middle of it
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or record.get("v") != VERSION:
        return None
    for key, kind in _REQUIRED.items():
        value = record.get(key)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            return None
    if not math.isfinite(record["t"]):
        return None
    return record


# What makes a line a whole record: the fields every reader may rely on.
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "t": (int, float),
    "vm": str,
    "target": str,
    "action": str,
    "result": str,
    "ok": bool,
}


def rotated(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.{index}")


def _is_rotated(candidate: Path, path: Path) -> bool:
    suffix = candidate.name[len(path.name) + 1 :]
    return suffix.isascii() and suffix.isdigit() and 0 < int(suffix) <= MAX_KEEP
