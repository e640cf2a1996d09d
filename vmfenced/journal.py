"""The fence journal: one JSON line per fence request, on disk before the reply goes out.

`fences.jsonl` in the state directory, rotated to `fences.jsonl.1` ... `.N` past a size bound.
The file stays open (O_APPEND); a single writer thread appends the records in order and the
event loop never waits on the disk. Records queued while one fdatasync() runs share the next
one (group commit): 100 fences confirmed at once pay a few syncs, not 100 in a row.
A crash mid-write leaves a torn last line: it is ended with a newline when the journal is
opened again, and every line that is not a whole record is skipped on read, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from vmfenced.errors import StartupError, VmfencedError

FILE_NAME = "fences.jsonl"
VERSION = 1
MAX_KEEP = 100  # the config's upper bound on journal_keep


class JournalError(VmfencedError):
    """A record could not be made durable."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"fence journal {path}: {reason}")


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
            "daemon_pid": os.getpid(),
        }


def encode(record: dict[str, Any]) -> bytes:
    # ensure_ascii: a line is never split by a multi-byte character at a torn write.
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


class Journal:
    def __init__(self, directory: Path, max_bytes: int, keep: int) -> None:
        self.directory = directory
        self.path = directory / FILE_NAME
        self._max_bytes = max_bytes
        self._keep = keep
        self._fd: int | None = None
        self._size = 0
        self._torn = False
        self._pending: dict[int, float] = {}
        self._lock = threading.Lock()
        self._serial = 0
        self._queue: list[tuple[bytes, int, Future[None]]] = []
        self._flushing = False
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmfenced-journal")
        self._log = structlog.get_logger("vmfenced.journal").bind(path=str(self.path))

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory, open the file, end a torn last line. Raises StartupError."""
        try:
            self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
            self._fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
            )
            self._size = os.fstat(self._fd).st_size
            if self._size and _last_byte(self.path) != b"\n":
                # Kept, not cut: the fragment is evidence; readers skip it.
                self._write_all(b"\n")
                os.fdatasync(self._fd)
                self._size += 1
        except OSError as exc:
            self._close_fd()
            raise StartupError(
                f"cannot open the fence journal {self.path}: {exc.strerror}"
            ) from None

    def close(self) -> None:
        """Finish the writes already queued, then close."""
        self._writer.shutdown(wait=True)
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def set_limits(self, max_bytes: int, keep: int) -> None:
        with self._lock:
            self._max_bytes, self._keep = max_bytes, keep

    def stuck_for(self) -> float:
        """Seconds the oldest queued write has waited (0 when none): a hung disk shows here."""
        with self._lock:
            oldest = min(self._pending.values(), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    # -- writing -------------------------------------------------------------------------------

    async def append(self, record: dict[str, Any]) -> None:
        """Return once the record is on disk (written and fdatasync'ed); raise JournalError."""
        await asyncio.wrap_future(self.submit(record))

    def submit(self, record: dict[str, Any]) -> Future[None]:
        """Queue the record without waiting (a shutdown's cancelled fences still get written)."""
        line = encode(record)
        done: Future[None] = Future()
        with self._lock:
            self._serial += 1
            self._pending[self._serial] = time.monotonic()
            self._queue.append((line, self._serial, done))
            start = not self._flushing
            self._flushing = True
        if start:
            try:
                self._writer.submit(self._flush)
            except RuntimeError:  # the writer was shut down
                self._fail_queued(JournalError(self.path, "the journal is closed"))
        return done

    def _fail_queued(self, error: JournalError) -> None:
        with self._lock:
            batch, self._queue = self._queue, []
            self._flushing = False
            for _, serial, _ in batch:
                self._pending.pop(serial, None)
        for _, _, done in batch:
            done.set_exception(error)

    def _flush(self) -> None:
        """Writer thread: everything queued goes out in one write() and one fdatasync()."""
        while True:
            with self._lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._flushing = False
                    return
                max_bytes, keep = self._max_bytes, self._keep
            error: JournalError | None = None
            try:
                self._write(b"".join(line for line, _, _ in batch), max_bytes, keep)
            except JournalError as exc:
                error = exc
            with self._lock:
                for _, serial, _ in batch:
                    self._pending.pop(serial, None)
            for _, _, done in batch:
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)

    def _write(self, lines: bytes, max_bytes: int, keep: int) -> None:
        if self._fd is None:
            raise JournalError(self.path, "the journal is not open")
        if self._torn:
            lines = b"\n" + lines
        if self._size and self._size + len(lines) > max_bytes:
            try:
                self._rotate(keep)
            except OSError as exc:
                # Keep appending to the file we have: an oversized journal beats a lost record.
                self._log.error("fence journal rotation failed", reason=exc.strerror)
        try:
            self._write_all(lines)
            os.fdatasync(self._fd)
        except OSError as exc:
            # Part of the lines may be on disk: the next record starts on a fresh line.
            self._torn = True
            raise JournalError(self.path, exc.strerror or str(exc)) from None
        self._torn = False
        self._size += len(lines)

    def _write_all(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def _rotate(self, keep: int) -> None:
        for index in range(MAX_KEEP, keep - 1, -1):  # also what a larger `keep` once left
            with contextlib.suppress(FileNotFoundError):
                _rotated(self.path, index).unlink()
        for index in range(keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                _rotated(self.path, index).rename(_rotated(self.path, index + 1))
        self.path.rename(_rotated(self.path, 1))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        old, self._fd, self._size = self._fd, fd, 0
        if old is not None:
            os.close(old)
        _sync_directory(self.directory)

    # -- reading -------------------------------------------------------------------------------

    async def read(
        self, vm: str | None = None, since: float | None = None, limit: int = 100
    ) -> tuple[list[dict[str, Any]], int]:
        return await asyncio.to_thread(read, self.path, vm, since, limit)


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
    for file in [*(_rotated(path, i) for i in indexes), path]:
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


def _rotated(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.{index}")


def _is_rotated(candidate: Path, path: Path) -> bool:
    suffix = candidate.name[len(path.name) + 1 :]
    return suffix.isascii() and suffix.isdigit() and 0 < int(suffix) <= MAX_KEEP


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1)


def _sync_directory(directory: Path) -> None:
    # The renames of a rotation are durable only once the directory is.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
