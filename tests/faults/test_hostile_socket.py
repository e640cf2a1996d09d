"""Hostile clients on the daemon's socket: precise errors, the daemon keeps serving, memory bounded."""

from __future__ import annotations

import json
import random
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmflab import Lab
from vmflab.daemon import LabDaemon

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    from tests.integration.conftest import lab_unavailable

    reason = lab_unavailable()
    if reason:
        pytest.fail(reason)
    with Lab(tmp_path_factory.mktemp("lab"), ("esx1",)) as started:
        started.hosts["esx1"].start_vm("gfs-node1")
        yield started


@pytest.fixture(scope="module")
def daemon(lab: Lab) -> Iterator[LabDaemon]:
    # Idle clients are held on purpose here: none may be closed by the idle timeout meanwhile.
    with LabDaemon(
        lab, aliases={"node1": "gfs-node1"}, daemon={"client_idle_timeout": 600}
    ) as running:
        yield running


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def connect(sock: socket.socket, path: Path) -> None:
    """A full listen backlog answers EAGAIN: a hostile flood must not fail the observer."""
    deadline = time.monotonic() + 20
    while True:
        try:
            sock.connect(str(path))
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            select.select([], [], [], 0.01)  # back off while the daemon accepts


def exchange(path: Path, payload: bytes) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(20)
        connect(sock, path)
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon may close first (too_large): its reply is still readable
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return [json.loads(line) for line in data.splitlines()]


def served_again(path: Path) -> dict[str, Any]:
    """Ask for status until it is served (slots held by closed clients are being freed)."""
    deadline = time.monotonic() + 60
    while True:
        (reply,) = exchange(path, b'{"op":"status"}\n')
        if reply["ok"] or time.monotonic() > deadline:
            return reply
        select.select([], [], [], 0.05)


def still_serving(daemon: LabDaemon) -> None:
    assert [h["state"] for h in daemon.status()["hosts"]] == ["up"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(min_size=1, max_size=2048))
def test_random_bytes_get_error_replies(daemon: LabDaemon, data: bytes) -> None:
    for reply in exchange(daemon.socket, data + b"\n"):
        assert reply["ok"] is False or "result" in reply
        if not reply["ok"]:
            assert reply["error"]["code"] in {"bad_request", "unknown_op", "too_large"}
            assert reply["error"]["message"]


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.dictionaries(
        st.sampled_from(["op", "vm", "action", "id", "x"]),
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=40)
        | st.lists(st.integers(), max_size=3),
        max_size=5,
    )
)
def test_wrong_shapes_never_fence_by_accident(daemon: LabDaemon, request: dict[str, Any]) -> None:
    if request.get("op") == "fence" and request.get("vm") in ("node1", "gfs-node1"):
        request["vm"] = "not-a-vm"  # this test is about shapes, not about fencing node1
    (reply,) = exchange(daemon.socket, json.dumps(request).encode() + b"\n")
    if not reply["ok"]:
        assert reply["error"]["code"] in {"bad_request", "unknown_op", "unknown_vm", "fence_failed"}


def test_specific_hostile_requests(daemon: LabDaemon) -> None:
    cases = [
        (b'{"op":"fen', "bad_request"),  # truncated, then EOF
        (b"[" * 200_000 + b"]" * 200_000 + b"\n", "too_large"),
        (b"[" * 30_000 + b"]" * 30_000 + b"\n", "bad_request"),  # deep, under the size limit
        (b'{"op":"fence","vm":["node1"]}\n', "bad_request"),
        (b'{"op":"status","id":{"nested":true}}\n', "bad_request"),
        (b'{"op":"fence","vm":"node1","action":"destroy-everything"}\n', "bad_request"),
        (b"\xff\xfe\x00\n", "bad_request"),
        (b"x" * (2 * 1024 * 1024), "too_large"),  # 2 MiB, no newline at all
    ]
    for payload, code in cases:
        replies = exchange(daemon.socket, payload)
        assert [r["error"]["code"] for r in replies] == [code], (payload[:40], replies)
    still_serving(daemon)
    assert daemon.request({"op": "vm_status", "vm": "node1"})["result"]["state"] == "on"


def test_idle_and_non_reading_clients_do_not_starve_others(daemon: LabDaemon) -> None:
    assert daemon.proc is not None
    before = rss_kib(daemon.proc.pid)
    idle: list[socket.socket] = []
    try:
        for _ in range(1500):  # more than the daemon serves at once
            sock = socket.socket(socket.AF_UNIX)
            idle.append(sock)
            connect(sock, daemon.socket)
        # A client that floods requests and never reads its replies.
        flood = socket.socket(socket.AF_UNIX)
        idle.append(flood)
        connect(flood, daemon.socket)
        flood.setblocking(False)
        sent = 0
        line = b'{"op":"status"}\n'
        try:
            while sent < 20_000:
                flood.send(line)
                sent += 1
        except BlockingIOError:
            pass
        # Every connection beyond the cap is told why; the cap keeps memory bounded.
        (refused,) = exchange(daemon.socket, b'{"op":"status"}\n')
        assert refused["error"]["code"] == "unavailable"
        assert refused["error"]["message"].startswith(
            "too many clients: 1024 connected, the limit is 1024 (RLIMIT_NOFILE "
        )
    finally:
        for sock in idle:
            sock.close()
    # The daemon frees each slot when it reads that client's EOF: polled, not assumed at once.
    assert served_again(daemon.socket)["ok"]
    still_serving(daemon)
    assert rss_kib(daemon.proc.pid) - before < 64 * 1024


def test_idle_clients_that_never_close_are_reclaimed(lab: Lab) -> None:
    """More idle connections than the daemon serves, never closed: the idle timeout frees the
    slots, each idle client is told why, and a new client is served again."""
    with LabDaemon(lab, daemon={"client_idle_timeout": 1}) as short:
        idle: list[socket.socket] = []
        try:
            for _ in range(1100):
                sock = socket.socket(socket.AF_UNIX)
                idle.append(sock)
                connect(sock, short.socket)
            reply = served_again(short.socket)  # once the idle clients' slots are reclaimed
            assert reply["ok"], reply
            first = idle[0]
            first.settimeout(20)
            told = json.loads(first.makefile("rb").readline())
            assert told["error"] == {
                "code": "unavailable",
                "message": "no complete request line within 1 s (client_idle_timeout)",
            }
        finally:
            for sock in idle:
                sock.close()


FUZZ_CODES = {"bad_request", "unknown_op", "too_large", "unknown_vm", "fence_failed"}


def test_bounded_random_fuzz(daemon: LabDaemon) -> None:
    """2,000 seeded random requests (mutated valid ones and raw noise), one connection each."""
    rng = random.Random(20261124)
    seeds = [
        b'{"op":"status"}',
        b'{"op":"list","id":3}',
        b'{"op":"vm_status","vm":"node1"}',
        b'{"op":"fence","vm":"no-such-vm","action":"off"}',
    ]
    for _ in range(2000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 6)):
            kind = rng.randrange(3)
            at = rng.randrange(len(data) + 1)
            if kind == 0:
                data[at:at] = bytes([rng.randrange(256)])
            elif kind == 1 and data:
                del data[min(at, len(data) - 1)]
            else:
                data[at:at] = rng.choice([b"{", b"}", b'"', b"\\", b"\x00", b"\n", b"[" * 50])
        for reply in exchange(daemon.socket, bytes(data) + b"\n"):
            assert reply["ok"] is True or reply["error"]["code"] in FUZZ_CODES, reply
    still_serving(daemon)
    assert daemon.request({"op": "vm_status", "vm": "node1"})["result"]["state"] == "on"
