"""A fence journal whose disk refuses writes (ENOSPC, EIO), through the write/sync seams: the
records wait in a bounded backlog, land in order once the disk has room, and say so."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from vmfenced.daemon.journal import FILE_NAME, Journal, JournalError, encode, read
from vmfenced.daemon.watchdog import journal_writable


def record(n: int) -> dict[str, object]:
    return {
        "v": 1,
        "t": 1e9 + n,
        "vm": "gfs-node1",
        "target": "gfs-node1",
        "action": "off",
        "result": "killed",
        "ok": True,
        "n": n,
    }


class Disk:
    """os.write and os.fdatasync with a fault switch: `room` bytes more are taken (None: no
    limit), then ENOSPC; `sync_error` fails the next fdatasync calls; `hold` blocks writes."""

    def __init__(self) -> None:
        self.room: int | None = None
        self.sync_errors = 0
        self.hold = threading.Event()
        self.hold.set()

    def write(self, fd: int, data: memoryview) -> int:
        self.hold.wait()
        if self.room is not None:
            if self.room == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            data = data[: self.room]
        written = os.write(fd, data)
        if self.room is not None:
            self.room -= written
        return written

    def sync(self, fd: int) -> None:
        if self.sync_errors:
            self.sync_errors -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fdatasync(fd)

    def full(self) -> None:
        self.room = 0

    def free(self) -> None:
        self.room = None


@pytest.fixture
def disk() -> Disk:
    return Disk()


@pytest.fixture
def journal(tmp_path: Path, disk: Disk) -> Iterator[Journal]:
    opened = Journal(tmp_path, 1 << 20, 3, backlog_max=4, write=disk.write, sync=disk.sync)
    opened.open()
    try:
        yield opened
    finally:
        disk.free()
        disk.hold.set()
        opened.close()


def numbers(path: Path) -> list[object]:
    return [r["n"] for r in read(path, limit=1000)[0]]


async def failing(journal: Journal, n: int) -> JournalError:
    with pytest.raises(JournalError) as caught:
        await journal.append(record(n))
    return caught.value


@pytest.mark.asyncio
async def test_a_full_disk_keeps_records_in_memory_and_writes_them_in_order(
    journal: Journal, disk: Disk
) -> None:
    await journal.append(record(1))
    disk.full()
    first = await failing(journal, 2)
    assert first.warning == (
        "fence record not written: No space left on device; kept in memory (1 waiting)"
    )
    second = await failing(journal, 3)
    assert second.waiting == 2
    state = journal.state()
    assert (state["state"], state["error"], state["backlog"], state["dropped"]) == (
        "failing",
        "No space left on device",
        2,
        0,
    )
    assert state["since"] is not None and state["since"] <= time.time()
    assert numbers(journal.path) == [1]  # history still reads what is on disk

    disk.free()
    await journal.append(record(4))  # the backlog goes first, then the new record
    assert numbers(journal.path) == [1, 2, 3, 4]
    state = journal.state()
    assert (state["state"], state["error"], state["since"], state["backlog"]) == (
        "ok",
        None,
        None,
        0,
    )


@pytest.mark.asyncio
async def test_failing_since_is_the_first_failure(journal: Journal, disk: Disk) -> None:
    disk.full()
    await failing(journal, 1)
    since = journal.state()["since"]
    await failing(journal, 2)
    assert journal.state()["since"] == since


@pytest.mark.asyncio
async def test_the_backlog_is_bounded_the_oldest_dropped_counted_and_logged(
    journal: Journal, disk: Disk
) -> None:
    disk.full()
    with capture_logs() as logs:
        for n in range(1, 7):
            error = await failing(journal, n)
    assert (error.waiting, error.dropped) == (4, 2)
    assert error.warning.endswith(
        "kept in memory (4 waiting); 2 older record(s) dropped since the daemon started"
    )
    dropped = [e for e in logs if e["event"] == "fence record dropped: the backlog is full"]
    # The dropped records' text is in the daemon's log: the last copy of them.
    assert [e["record"] for e in dropped] == [encode(record(n)).decode()[:-1] for n in (1, 2)]
    assert [e["event"] for e in logs].count("fence journal failing: records wait in memory") == 1

    disk.free()
    await journal.append(record(7))
    assert numbers(journal.path) == [3, 4, 5, 6, 7]
    assert journal.state()["dropped"] == 2  # stays counted: records were lost


@pytest.mark.asyncio
async def test_the_periodic_retry_writes_the_backlog_without_a_new_record(
    journal: Journal, disk: Disk
) -> None:
    disk.full()
    await failing(journal, 1)
    await failing(journal, 2)
    retrying = asyncio.create_task(journal.keep_retrying(0.01))
    try:
        # Still full: the retries fail without harm.
        await wait_until(lambda: disk.room == 0 and journal.state()["backlog"] == 2)
        disk.free()
        await wait_until(lambda: journal.state()["backlog"] == 0)
    finally:
        retrying.cancel()
    assert numbers(journal.path) == [1, 2]
    assert journal.state()["state"] == "ok"


@pytest.mark.asyncio
async def test_a_line_cut_by_the_full_disk_is_written_again_whole(
    journal: Journal, disk: Disk
) -> None:
    line = len(encode(record(1)))
    disk.room = line + line // 2  # one record and half of the next fit
    results = await asyncio.gather(
        *(journal.append(record(n)) for n in (1, 2, 3)), return_exceptions=True
    )
    assert results[0] is None
    assert all(isinstance(r, JournalError) for r in results[1:])
    assert journal.state()["backlog"] == 2  # record 1 made it whole: on disk and synced
    disk.free()
    await journal.append(record(4))
    records, skipped = read(journal.path, limit=1000)
    assert [r["n"] for r in records] == [1, 2, 3, 4]
    assert skipped == 1  # the half line, kept as evidence on its own line


@pytest.mark.asyncio
async def test_a_failed_fdatasync_writes_the_records_again(journal: Journal, disk: Disk) -> None:
    disk.sync_errors = 1
    error = await failing(journal, 1)
    assert error.reason == "Input/output error"
    await journal.append(record(2))
    # Whether the first copy reached the disk is unknown: a record twice, never one lost.
    assert numbers(journal.path) == [1, 1, 2]


@pytest.mark.asyncio
async def test_a_hung_disk_delays_the_reply_by_the_wait_at_most(
    journal: Journal, disk: Disk
) -> None:
    disk.hold.clear()
    warning = await journal.write_within(record(1), 0.05)
    assert warning == (
        "fence record not on disk after 0.05 s (the journal's disk is slow or hung); still queued"
    )
    assert journal.stuck_for() > 0  # the watchdog's journal_flowing sees it
    disk.hold.set()
    await wait_until(lambda: numbers(journal.path) == [1])
    assert await journal.write_within(record(2), 5) is None


@pytest.mark.asyncio
async def test_write_within_says_why_a_record_waits(journal: Journal, disk: Disk) -> None:
    disk.full()
    warning = await journal.write_within(record(1), 5)
    assert (
        warning == "fence record not written: No space left on device; kept in memory (1 waiting)"
    )


def record_1_waiting(tmp_path: Path, disk: Disk) -> Journal:
    """An open journal whose disk filled up before record 1, which waits in memory."""
    journal = Journal(tmp_path, 1 << 20, 3, write=disk.write, sync=disk.sync)
    journal.open()
    disk.full()
    with pytest.raises(JournalError):
        asyncio.run(journal.append(record(1)))
    return journal


def test_close_tries_the_backlog_once_more(tmp_path: Path, disk: Disk) -> None:
    journal = record_1_waiting(tmp_path, disk)
    disk.free()
    journal.close()
    assert numbers(tmp_path / FILE_NAME) == [1]


def test_close_logs_what_it_cannot_write(tmp_path: Path, disk: Disk) -> None:
    journal = record_1_waiting(tmp_path, disk)
    with capture_logs() as logs:
        journal.close()
    lost = [e for e in logs if e["event"] == "fence record lost at exit: never written"]
    assert [e["record"] for e in lost] == [encode(record(1)).decode()[:-1]]


def test_a_torn_line_at_open_is_ended_by_the_first_write_that_succeeds(
    tmp_path: Path, disk: Disk
) -> None:
    whole = encode(record(1))
    (tmp_path / FILE_NAME).write_bytes(whole + whole[:10])
    disk.full()
    journal = Journal(tmp_path, 1 << 20, 3, write=disk.write, sync=disk.sync)
    journal.open()  # a full disk is no reason not to start
    try:
        with pytest.raises(JournalError):
            asyncio.run(journal.append(record(2)))
        disk.free()
        asyncio.run(journal.append(record(3)))
    finally:
        journal.close()
    assert read(tmp_path / FILE_NAME) == ([record(1), record(2), record(3)], 1)


@pytest.mark.asyncio
async def test_the_watchdog_report_names_the_failure(journal: Journal, disk: Disk) -> None:
    report = journal_writable(journal.state)
    assert await report() is None
    disk.full()
    await failing(journal, 1)
    assert await report() == (
        "fence journal failing: No space left on device; fence records wait in memory"
    )


async def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Poll a condition with a deadline (the writer runs on its own thread)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)
