"""The metrics HTTP endpoint's edges: HEAD, bad and oversized requests, counters it keeps."""

from __future__ import annotations

import asyncio
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vmfenced.daemon.metrics import MAX_REQUEST_HEAD, Metrics, MetricsServer
from vmfenced.model import VMMap


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    writer.write_eof()  # all we will send: a short request is answered at once, not timed out
    await writer.drain()
    reply = await reader.read()
    writer.close()
    await writer.wait_closed()
    return reply


@pytest.mark.asyncio
async def test_http_edges() -> None:
    metrics = Metrics({}, VMMap(), lambda: 2)
    metrics.observe_fence("off", "killed", 0.004)
    metrics.reloads.labels("ok").inc()
    port = free_port()
    server = MetricsServer(metrics, "127.0.0.1", port)
    await server.start()
    try:
        full = await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = full.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 OK\r\n")
        assert f"Content-Length: {len(body)}".encode() in head
        names = {f.name for f in text_string_to_metric_families(body.decode())}
        assert {"vmfenced_fences", "vmfenced_fence_duration_seconds", "vmfenced_info"} <= names
        assert b"vmfenced_fences_in_flight 2.0" in body
        assert b'vmfenced_reloads_total{result="ok"} 1.0' in body

        head_only = await exchange(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert head_only.startswith(b"HTTP/1.0 200 OK") and head_only.endswith(b"\r\n\r\n")
        assert (await exchange(port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.0 400 ")
        assert (await exchange(port, b"GET /x HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 404 ")
        huge = b"GET /metrics HTTP/1.0\r\nX: " + b"a" * (MAX_REQUEST_HEAD * 2) + b"\r\n\r\n"
        assert await exchange(port, huge) == b""  # dropped, never buffered without bound
        assert await exchange(port, b"GET /metr") == b""  # the client gave up: nothing to say
    finally:
        await server.close()
    with pytest.raises(OSError):
        await exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n")
