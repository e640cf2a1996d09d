"""The fence journal: durable appends, rotation, torn lines, filters, a writer killed by SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfenced.daemon.journal import FILE_NAME, FenceEntry, Journal, JournalError, encode, read
from vmfenced.errors import StartupError


def entry(n: int, vm: str = "gfs-node1", target: str | None = None, t: float = 1e9) -> FenceEntry:
    return FenceEntry(
        t=t + n,
        peer_uid=0,
        peer_pid=4242,
        request_id=n,
        vm=vm,
        target=target or vm,
        action="off",
        result="killed",
        ok=True,
        host="esx1",
        cartel=1000 + n,
        elapsed_ms=1.5,
        total_ms=1.75,
    )


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    opened = Journal(tmp_path / "state", 1 << 20, 3)
    opened.open()
    try:
        yield opened
    finally:
        opened.close()


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


@pytest.mark.asyncio
async def test_append_is_on_disk_when_it_returns(journal: Journal) -> None:
    await journal.append(entry(1).record())
    (line,) = lines(journal.path)
    record = json.loads(line)
    assert record["v"] == 1
    assert (record["vm"], record["action"], record["result"], record["cartel"]) == (
        "gfs-node1",
        "off",
        "killed",
        1001,
    )
    assert record["peer"] == {"uid": 0, "pid": 4242}
    assert record["time"] == "2001-09-09T01:46:41.000+00:00"
    assert record["daemon_pid"] == os.getpid()
    assert oct(journal.path.stat().st_mode & 0o777) == "0o640"


@pytest.mark.asyncio
async def test_concurrent_appends_keep_their_order_and_lines(journal: Journal) -> None:
    await asyncio.gather(*(journal.append(entry(n).record()) for n in range(200)))
    records, skipped = read(journal.path, limit=1000)
    assert skipped == 0
    # gather() submits in order and one writer thread writes in order.
    assert [r["id"] for r in records] == list(range(200))


def append_all(journal: Journal, numbers: range) -> None:
    async def run() -> None:
        for n in numbers:
            await journal.append(entry(n).record())

    asyncio.run(run())


def test_rotation_bounds_the_size_and_keeps_the_newest(tmp_path: Path) -> None:
    line = len(encode(entry(10).record()))  # ids 10..54: every line the same length
    journal = Journal(tmp_path, max_bytes=line * 10, keep=2)
    journal.open()
    try:
        append_all(journal, range(10, 55))
    finally:
        journal.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [FILE_NAME, FILE_NAME + ".1", FILE_NAME + ".2"]
    for path in tmp_path.iterdir():
        assert path.stat().st_size <= line * 10
    records, skipped = read(tmp_path / FILE_NAME, limit=1000)
    assert skipped == 0
    # Two full rotated files and the current one (5 records): the oldest 20 are gone.
    assert [r["id"] for r in records] == list(range(30, 55))


def test_smaller_keep_after_a_reload_drops_old_files(tmp_path: Path) -> None:
    line = len(encode(entry(0).record()))
    journal = Journal(tmp_path, max_bytes=line * 2, keep=5)
    journal.open()
    try:
        append_all(journal, range(12))
        assert (tmp_path / (FILE_NAME + ".5")).exists()
        journal.set_limits(line * 2, 1)
        append_all(journal, range(12, 13))
    finally:
        journal.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE_NAME, FILE_NAME + ".1"]


def test_torn_last_line_is_ended_on_open_and_skipped_on_read(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    whole = encode(entry(1).record())
    path.write_bytes(whole + whole[: len(whole) // 2])  # a writer died mid-line
    assert read(path) == ([json.loads(whole)], 1)
    journal = Journal(tmp_path, 1 << 20, 3)
    journal.open()
    try:
        append_all(journal, range(2, 3))
    finally:
        journal.close()
    records, skipped = read(path)
    assert [r["id"] for r in records] == [1, 2]
    assert skipped == 1  # the fragment is kept as evidence, on its own line
    assert path.read_bytes().startswith(whole + whole[: len(whole) // 2] + b"\n")


def test_lines_that_are_not_records_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    good = encode(entry(1).record())
    bad_kind = dict(entry(2).record(), ok="yes")
    path.write_bytes(
        b"not json\n"
        + b"[1, 2]\n"
        + b'{"v": 99}\n'
        + encode(bad_kind)
        + b'{"v": 1, "t": NaN, "vm": "a", "target": "a", "action": "off", "result": "x", "ok": true}\n'
        + b"\n"
        + b"\xff\xfe garbage\n"
        + good
    )
    assert read(path) == ([json.loads(good)], 6)


def test_filters(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    path.write_bytes(
        b"".join(
            encode(entry(n, vm="node1" if n % 2 else "gfs-node2", target=None).record())
            for n in range(10)
        )
    )
    by_alias, _ = read(path, vm="node1")
    assert [r["id"] for r in by_alias] == [1, 3, 5, 7, 9]
    recent, _ = read(path, since=1e9 + 7)
    assert [r["id"] for r in recent] == [7, 8, 9]
    newest, _ = read(path, limit=2)
    assert [r["id"] for r in newest] == [8, 9]
    aliased = tmp_path / "aliased"
    aliased.mkdir()
    (aliased / FILE_NAME).write_bytes(encode(entry(1, vm="node1", target="gfs-node1").record()))
    assert len(read(aliased / FILE_NAME, vm="gfs-node1")[0]) == 1  # either name matches
    assert read(tmp_path / "missing" / FILE_NAME) == ([], 0)


@pytest.mark.asyncio
async def test_closed_journal_fails_precisely(tmp_path: Path) -> None:
    journal = Journal(tmp_path, 1 << 20, 3)
    journal.open()
    journal.close()
    with pytest.raises(JournalError, match="closed"):
        await journal.append(entry(1).record())


def test_unusable_directory_is_a_startup_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StartupError, match=f"cannot open the fence journal {blocker}/"):
        Journal(blocker / "state", 1 << 20, 3).open()


@pytest.mark.asyncio
async def test_stuck_for_reports_a_waiting_write(journal: Journal) -> None:
    assert journal.stuck_for() == 0.0
    await journal.append(entry(1).record())
    assert journal.stuck_for() == 0.0


WRITER = """
import asyncio, sys
from pathlib import Path
from vmfenced.daemon.journal import Journal
journal = Journal(Path(sys.argv[1]), int(sys.argv[2]), 2)
journal.open()
async def main():
    n = 0
    while True:
        await journal.append({"v": 1, "t": 1.0 + n, "vm": "vm", "target": "vm",
                              "action": "off", "result": "killed", "ok": True, "n": n,
                              "pad": "x" * 300})
        if n == 50:
            print("written", flush=True)
        n += 1
asyncio.run(main())
"""


def test_writer_killed_by_sigkill_leaves_a_readable_journal(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), str(64 * 1024)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"written\n"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    records, _skipped = read(tmp_path / FILE_NAME, limit=100_000)
    numbers = [r["n"] for r in records]
    assert len(numbers) > 50
    # Whatever the kill cut, the records read are a gapless run, newest last.
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    # And the journal opens again and takes new records after whatever was cut.
    journal = Journal(tmp_path, 64 * 1024, 2)
    journal.open()
    try:
        asyncio.run(journal.append(dict(entry(1).record(), n=-1)))
    finally:
        journal.close()
    after, _ = read(tmp_path / FILE_NAME, limit=100_000)
    assert after[-1]["n"] == -1
