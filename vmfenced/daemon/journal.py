"""The fence journal: one JSON line per fence request, on disk before the reply goes out.

`fences.jsonl` in the state directory, rotated to `fences.jsonl.1` ... `.N` past a size bound.
The file stays open (O_APPEND); a single writer thread appends the records in order and the
event loop never waits on the disk. Records queued while one fdatasync() runs share the next
one (group commit): 100 fences confirmed at once pay a few syncs, not 100 in a row.
A crash mid-write leaves a torn last line: it is ended with a newline when the journal is
opened again, and every line that is not a whole record is skipped on read, never fatal.

A write that fails (a full disk, an I/O error) never fails the fence: the record waits in a
bounded in-memory backlog (the oldest dropped, counted and logged whole when it is full) and
is written, in order and before any newer record, by the next write that succeeds: the next
record's or the periodic retry's (`keep_retrying`). `state()` says how the journal is doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from vmfenced.daemon.journal_records import FILE_NAME, MAX_KEEP, FenceEntry, encode, read, rotated
from vmfenced.errors import StartupError, VmfencedError

__all__ = ["FILE_NAME", "FenceEntry", "Journal", "JournalError", "encode", "read"]

# Records kept in memory while the disk refuses them: ~400 bytes each, so at most ~400 KiB.
BACKLOG_MAX = 1000
RETRY_INTERVAL = 5.0  # seconds between two tries of a waiting backlog when no fence comes

Write = Callable[[int, memoryview], int]
Sync = Callable[[int], None]


class JournalError(VmfencedError):
    """A record could not be made durable (now): `waiting` records are kept in memory."""

    def __init__(self, path: Path, reason: str, waiting: int = 0, dropped: int = 0) -> None:
        self.path = path
        self.reason = reason
        self.waiting = waiting
        self.dropped = dropped
        super().__init__(f"fence journal {path}: {reason}")

    @property
    def warning(self) -> str:
        """What a fence reply says about its record (docs/protocol.md, `journal_warning`)."""
        text = f"fence record not written: {self.reason}"
        if self.waiting:
            text += f"; kept in memory ({self.waiting} waiting)"
        if self.dropped:
            text += f"; {self.dropped} older record(s) dropped since the daemon started"
        return text


class Journal:
    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        keep: int,
        *,
        backlog_max: int = BACKLOG_MAX,
        write: Write = os.write,
        sync: Sync = os.fdatasync,
    ) -> None:
        self.directory = directory
        self.path = directory / FILE_NAME
        self._max_bytes = max_bytes
        self._keep = keep
        self._backlog_max = max(1, backlog_max)
        # The seams the tests fail on purpose (ENOSPC, EIO); os.write and os.fdatasync otherwise.
        self._os_write = write
        self._os_sync = sync
        self._fd: int | None = None
        self._size = 0
        self._torn = False
        self._pending: dict[int, float] = {}
        self._lock = threading.Lock()
        self._serial = 0
        self._queue: list[tuple[bytes, int, Future[None]]] = []
        self._flushing = False
        self._retry = False
        # Lines not written yet, oldest first; only the writer thread changes it.
        self._backlog: deque[bytes] = deque()
        self._dropped = 0
        self._failure: tuple[str, float] | None = None  # reason, since (Unix time)
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
                # Kept, not cut: the fragment is evidence; readers skip it. Should the disk be
                # full, the next write that succeeds starts with the newline instead.
                self._torn = True
        except OSError as exc:
            self._close_fd()
            raise StartupError(
                f"cannot open the fence journal {self.path}: {exc.strerror}"
            ) from None

    def close(self) -> None:
        """Finish the writes already queued, try the backlog once more, then close."""
        self._writer.shutdown(wait=True)
        if self._backlog:
            self._write_backlog([])
        lost = list(self._backlog)
        self._backlog.clear()
        for line in lost:
            # The last copy of the record: the daemon's log (journald) keeps it.
            self._log.error("fence record lost at exit: never written", record=_text(line))
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

    def state(self) -> dict[str, Any]:
        """`ok`, or `failing` with the error and since when; the backlog and the drops."""
        with self._lock:
            failure, waiting, dropped = self._failure, len(self._backlog), self._dropped
        return {
            "path": str(self.path),
            "state": "ok" if failure is None else "failing",
            "error": None if failure is None else failure[0],
            "since": None if failure is None else round(failure[1], 3),
            "backlog": waiting,
            "backlog_max": self._backlog_max,
            "dropped": dropped,
        }

    # -- writing -------------------------------------------------------------------------------

    async def append(self, record: dict[str, Any]) -> None:
        """Return once the record is on disk (written and fdatasync'ed); raise JournalError."""
        await asyncio.wrap_future(self.submit(record))

    async def write_within(self, record: dict[str, Any], wait: float) -> str | None:
        """Queue the record and wait at most `wait` s for the disk: None once it is on disk,
        else the warning a fence reply carries (the record stays queued or in the backlog)."""
        written = asyncio.wrap_future(self.submit(record))
        written.add_done_callback(_retrieve)  # also when this wait gives up or is cancelled
        try:
            async with asyncio.timeout(wait):
                await asyncio.shield(written)
        except JournalError as exc:
            return exc.warning
        except TimeoutError:
            return (
                f"fence record not on disk after {wait:g} s (the journal's disk is slow or "
                "hung); still queued"
            )
        return None

    def submit(self, record: dict[str, Any]) -> Future[None]:
        """Queue the record without waiting (a shutdown's cancelled fences still get written)."""
        line = encode(record)
        done: Future[None] = Future()
        # Not cancellable from now on: a caller that gives up waiting (a timeout, a cancelled
        # fence) must not make the writer's set_result() raise and the writer stop.
        done.set_running_or_notify_cancel()
        with self._lock:
            self._serial += 1
            self._pending[self._serial] = time.monotonic()
            self._queue.append((line, self._serial, done))
        self._kick()
        return done

    def retry(self) -> None:
        """Try the backlog again now, on the writer thread; never waits."""
        with self._lock:
            if not self._backlog:
                return
            self._retry = True
        self._kick()

    async def keep_retrying(self, interval: float = RETRY_INTERVAL) -> None:
        """A task: retry the backlog every `interval` s, so it lands even when no fence comes."""
        while True:
            await asyncio.sleep(interval)
            self.retry()

    def _kick(self) -> None:
        with self._lock:
            start = not self._flushing
            self._flushing = True
        if start:
            try:
                self._writer.submit(self._flush)
            except RuntimeError:  # the writer was shut down
                self._fail_queued(JournalError(self.path, "the journal is closed"))

    def _fail_queued(self, error: JournalError) -> None:
        with self._lock:
            batch, self._queue = self._queue, []
            self._flushing = False
            self._retry = False
            for _, serial, _ in batch:
                self._pending.pop(serial, None)
        for _, _, done in batch:
            done.set_exception(error)

    def _flush(self) -> None:
        """Writer thread: the backlog then everything queued, in one write() and fdatasync()."""
        while True:
            with self._lock:
                batch, self._queue = self._queue, []
                retry, self._retry = self._retry, False
                if not batch and not (retry and self._backlog):
                    self._flushing = False
                    return
            written, error = self._write_backlog([line for line, _, _ in batch])
            with self._lock:
                for _, serial, _ in batch:
                    self._pending.pop(serial, None)
            for index, (_, _, done) in enumerate(batch):
                if index < written:
                    done.set_result(None)
                else:
                    assert error is not None
                    done.set_exception(error)

    def _write_backlog(self, new: list[bytes]) -> tuple[int, JournalError | None]:
        """Write the backlog then `new`; what is not written joins the backlog. Returns how
        many of `new` are on disk, and the error that stopped the others."""
        with self._lock:
            max_bytes, keep = self._max_bytes, self._keep
        old = list(self._backlog)
        lines = old + new
        written, reason = self._write(lines, max_bytes, keep)
        unwritten = lines[written:]
        overflow = unwritten[: max(0, len(unwritten) - self._backlog_max)]
        with self._lock:
            self._backlog = deque(unwritten[len(overflow) :])
            self._dropped += len(overflow)
            was = self._failure
            if reason is None:
                self._failure = None
            elif was is None:
                self._failure = (reason, time.time())
            else:
                self._failure = (reason, was[1])
            waiting, dropped = len(self._backlog), self._dropped
        for line in overflow:
            # The backlog is full: the oldest record goes, its text kept in the daemon's log.
            self._log.error("fence record dropped: the backlog is full", record=_text(line))
        if reason is not None and was is None:
            self._log.error("fence journal failing: records wait in memory", reason=reason)
        elif reason is None and was is not None:
            self._log.warning("fence journal writable again", written_from_backlog=len(old))
        if reason is None:
            return len(new), None
        return max(0, written - len(old)), JournalError(self.path, reason, waiting, dropped)

    def _write(self, lines: list[bytes], max_bytes: int, keep: int) -> tuple[int, str | None]:
        """Append the lines; return how many are on disk, and why the others are not."""
        if self._fd is None:
            return 0, "the journal is not open"
        data = b"".join(lines)
        if self._size and self._size + len(data) + self._torn > max_bytes:
            try:
                self._rotate(keep)
            except OSError as exc:
                # Keep appending to the file we have: an oversized journal beats a lost record.
                self._log.error("fence journal rotation failed", reason=exc.strerror)
        prefix = b"\n" if self._torn else b""
        data = prefix + data
        accepted, failed = self._write_all(data)
        if accepted:
            # A line cut short by the failure: the next record starts on a fresh line.
            self._torn = data[accepted - 1 : accepted] != b"\n"
        try:
            self._os_sync(self._fd)
        except OSError as exc:
            # What write() took may not be on the disk: all of it is written again (a record
            # may then be in the file twice: never lost).
            return 0, _reason(failed or exc)
        if failed is None:
            return len(lines), None
        # What write() took is on disk now; a line cut short is written again whole.
        end, whole = len(prefix), 0
        for line in lines:
            end += len(line)
            if end > accepted:
                break
            whole += 1
        return whole, _reason(failed)

    def _write_all(self, data: bytes) -> tuple[int, OSError | None]:
        """Write all of `data`; return how much write() took, and the error that stopped it."""
        assert self._fd is not None
        view = memoryview(data)
        accepted = 0
        error: OSError | None = None
        try:
            while accepted < len(data):
                accepted += self._os_write(self._fd, view[accepted:])
        except OSError as exc:
            error = exc
        self._size += accepted
        return accepted, error

    def _rotate(self, keep: int) -> None:
        for index in range(MAX_KEEP, keep - 1, -1):  # also what a larger `keep` once left
            with contextlib.suppress(FileNotFoundError):
                rotated(self.path, index).unlink()
        for index in range(keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                rotated(self.path, index).rename(rotated(self.path, index + 1))
        self.path.rename(rotated(self.path, 1))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        old, self._fd, self._size, self._torn = self._fd, fd, 0, False
        if old is not None:
            os.close(old)
        _sync_directory(self.directory)

    # -- reading -------------------------------------------------------------------------------

    async def read(
        self, vm: str | None = None, since: float | None = None, limit: int = 100
    ) -> tuple[list[dict[str, Any]], int]:
        return await asyncio.to_thread(read, self.path, vm, since, limit)


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1)


def _retrieve(future: asyncio.Future[None]) -> None:
    # An outcome nobody awaits any more (the journal logs failures): retrieved, so asyncio
    # does not report it as lost.
    if not future.cancelled():
        future.exception()


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _text(line: bytes) -> str:
    return line.rstrip(b"\n").decode("ascii", "replace")


def _sync_directory(directory: Path) -> None:
    # The renames of a rotation are durable only once the directory is.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
