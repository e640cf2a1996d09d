"""sd_notify and the watchdog, seen from a real AF_UNIX datagram socket (what systemd reads)."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfenced.daemon.notify import Notifier, watchdog_interval
from vmfenced.daemon.watchdog import Watchdog, journal_flowing, socket_accepts


class Receiver:
    """A bound datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address

    def messages(self) -> list[list[str]]:
        """Every datagram queued so far, split into fields; never waits."""
        out: list[list[str]] = []
        while True:
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            out.append(data.decode().split("\n"))


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield Receiver(sock, str(path))


def test_messages_arrive_as_newline_separated_fields(receiver: Receiver) -> None:
    notifier = Notifier(receiver.address)
    try:
        assert notifier.ready("2/3 hosts up")
        assert notifier.status("3/3 hosts up")
        assert notifier.reloading()
        assert notifier.watchdog()
        assert notifier.stopping()
        ready, status, reloading, watchdog, stopping = receiver.messages()
    finally:
        notifier.close()
    assert ready == ["READY=1", "STATUS=2/3 hosts up"]
    assert status == ["STATUS=3/3 hosts up"]
    assert reloading[0] == "RELOADING=1"
    key, _, usec = reloading[1].partition("=")
    assert key == "MONOTONIC_USEC" and usec.isdigit()
    # CLOCK_MONOTONIC in microseconds: close to ours, taken just before.
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert 0 <= now_usec - int(usec) < 60_000_000
    assert watchdog == ["WATCHDOG=1"]
    assert stopping == ["STOPPING=1"]


def test_abstract_namespace_address() -> None:
    name = f"vmfenced-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = Notifier("@" + name)
        try:
            assert notifier.send("READY=1")
        finally:
            notifier.close()
        assert sock.recv(100, socket.MSG_DONTWAIT) == b"READY=1"


def test_status_text_cannot_forge_fields(receiver: Receiver) -> None:
    notifier = Notifier(receiver.address)
    try:
        notifier.status("evil\nREADY=1\nWATCHDOG=1")
    finally:
        notifier.close()
    assert receiver.messages() == [["STATUS=evil READY=1 WATCHDOG=1"]]


def test_no_systemd_is_not_an_error(tmp_path: Path) -> None:
    assert Notifier.from_environment({}).send("READY=1") is False
    assert not Notifier.from_environment({"NOTIFY_SOCKET": ""}).enabled
    gone = Notifier(str(tmp_path / "nobody-listens"))
    try:
        assert gone.send("READY=1") is False  # ENOENT: logged nowhere, never raised
    finally:
        gone.close()


def test_full_queue_never_blocks(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        notifier = Notifier(str(path))
        try:
            results = [notifier.send("X=" + "x" * 4000) for _ in range(2000)]
        finally:
            notifier.close()
    assert results[0] is True
    assert False in results  # the queue filled up and sending said so, without waiting


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "20000000"}, 20.0),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ) == expected


async def healthy() -> str | None:
    return None


async def sick() -> str | None:
    return "the socket is gone"


@pytest.mark.asyncio
async def test_watchdog_pings_only_while_healthy(receiver: Receiver) -> None:
    notifier = Notifier(receiver.address)
    state = {"ok": True}

    async def toggled() -> str | None:
        return None if state["ok"] else "broken"

    watchdog = Watchdog(notifier, 20.0, [healthy, toggled])
    try:
        assert await watchdog.tick() is True
        assert receiver.messages() == [["WATCHDOG=1"]]
        state["ok"] = False
        assert await watchdog.tick() is False
        assert receiver.messages() == []
        # A lagging loop is not healthy either, whatever the checks say.
        state["ok"] = True
        assert await watchdog.tick(lag=watchdog.max_lag + 1) is False
        assert receiver.messages() == []
        assert await watchdog.tick() is True
        assert receiver.messages() == [["WATCHDOG=1"]]
    finally:
        notifier.close()


@pytest.mark.asyncio
async def test_a_hung_check_withholds_the_ping(receiver: Receiver) -> None:
    notifier = Notifier(receiver.address)
    never = asyncio.Event()

    async def hangs() -> str | None:
        await never.wait()
        return None

    watchdog = Watchdog(notifier, 2.0, [hangs])  # max_lag 0.5 s bounds each check
    try:
        assert await watchdog.tick() is False
        assert receiver.messages() == []
    finally:
        notifier.close()


@pytest.mark.asyncio
async def test_watchdog_loop_sends_from_the_event_loop(receiver: Receiver) -> None:
    notifier = Notifier(receiver.address)
    watchdog = Watchdog(notifier, 0.2, [healthy])
    task = asyncio.create_task(watchdog.run())
    loop = asyncio.get_running_loop()
    got: list[list[str]] = []
    try:
        deadline = loop.time() + 30
        while len(got) < 3 and loop.time() < deadline:
            got += receiver.messages()
            await asyncio.sleep(0.02)  # polling a condition with a deadline
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        notifier.close()
    assert got[:3] == [["WATCHDOG=1"]] * 3


@pytest.mark.asyncio
async def test_socket_accepts_check(tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    check = socket_accepts(path)
    assert "refuses connections" in (await check() or "")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_unix_server(serve, path=str(path))
    try:
        assert await check() is None
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
async def test_journal_flowing_check() -> None:
    waited = {"s": 0.0}
    check = journal_flowing(lambda: waited["s"], 5.0)
    assert await check() is None
    waited["s"] = 7.5
    assert await check() == "a journal write has waited 7.5 s"
