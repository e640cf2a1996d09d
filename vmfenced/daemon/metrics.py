"""Prometheus metrics: what the daemon counts, what it reads live at scrape time, and the
optional HTTP endpoint (off unless `[metrics] listen` is set).

The registry is this object's own, never prometheus_client's global one. Host and link
gauges are read from the live objects when scraped, so hosts a reload adds or removes appear
and vanish without bookkeeping. Scrapes run on the event loop, like everything that reads
the daemon's state, so they never see it half-changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.process_collector import ProcessCollector

from vmfenced import __version__
from vmfenced.daemon.host import Host
from vmfenced.daemon.link import Lane
from vmfenced.errors import StartupError
from vmfenced.model import LinkState, VMMap

# Fences confirmed over a warm shell take milliseconds; a search or a slow host, seconds.
FENCE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)
MAX_REQUEST_HEAD = 8192
HTTP_TIMEOUT = 5.0
MAX_HTTP_CLIENTS = 16


class Metrics:
    def __init__(
        self, hosts: Mapping[str, Host], vmmap: VMMap, inflight: Callable[[], int]
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.fences = Counter(
            "vmfenced_fences",
            "Fence requests answered, by action and result (the outcome, or failed/unknown_vm)",
            ["action", "result"],
            registry=self.registry,
        )
        self.fence_seconds = Histogram(
            "vmfenced_fence_duration_seconds",
            "Time from a fence request's arrival to its journal record, by action and result",
            ["action", "result"],
            buckets=FENCE_BUCKETS,
            registry=self.registry,
        )
        self.reloads = Counter(
            "vmfenced_reloads",
            "Configuration reloads, by result",
            ["result"],
            registry=self.registry,
        )
        self.journal_errors = Counter(
            "vmfenced_journal_errors",
            "Fence records not on disk when their reply went out (kept in memory, or a hung disk)",
            registry=self.registry,
        )
        self._connects: dict[tuple[str, str], int] = {}
        self._live = _Live(hosts, vmmap, inflight, self._connects)
        self.registry.register(self._live)
        ProcessCollector(registry=self.registry)

    def watch_journal(self, state: Callable[[], Mapping[str, Any]]) -> None:
        """Read the fence journal's backlog and drops (`Journal.state()`) at scrape time."""
        self.registry.register(_JournalGauges(state))

    def lane_changed(self, host: Host, lane: Lane) -> None:
        if lane.state is LinkState.UP:
            key = (host.name, lane.name)
            self._connects[key] = self._connects.get(key, 0) + 1

    def forget(self, host: str) -> None:
        for key in [k for k in self._connects if k[0] == host]:
            del self._connects[key]

    def observe_fence(self, action: str, result: str, seconds: float) -> None:
        self.fences.labels(action, result).inc()
        self.fence_seconds.labels(action, result).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live:
    """Gauges read from the daemon's objects at scrape time."""

    def __init__(
        self,
        hosts: Mapping[str, Host],
        vmmap: VMMap,
        inflight: Callable[[], int],
        connects: Mapping[tuple[str, str], int],
    ) -> None:
        self._hosts = hosts
        self._map = vmmap
        self._inflight = inflight
        self._connects = connects

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily("vmfenced_info", "The running daemon", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        hosts = GaugeMetricFamily(
            "vmfenced_host_up", "1 when the host's fence link is up, else 0", labels=["host"]
        )
        links = GaugeMetricFamily(
            "vmfenced_link_up", "1 when the SSH link (lane) is up, else 0", labels=["host", "lane"]
        )
        reconnects = CounterMetricFamily(
            "vmfenced_link_reconnects",
            "Times a lane came up again after its first connection",
            labels=["host", "lane"],
        )
        age = GaugeMetricFamily(
            "vmfenced_inventory_age_seconds",
            "Seconds since the host's last successful inventory",
            labels=["host"],
        )
        running = GaugeMetricFamily(
            "vmfenced_running_vms", "VMs running on the host at its last listing", labels=["host"]
        )
        now = time.time()
        for name, host in sorted(self._hosts.items()):
            hosts.add_metric([name], 1 if host.state is LinkState.UP else 0)
            for lane in (host.fence, host.inventory):
                links.add_metric([name, lane.name], 1 if lane.state is LinkState.UP else 0)
                connects = self._connects.get((name, lane.name), 0)
                reconnects.add_metric([name, lane.name], max(0, connects - 1))
            inventory = self._map.hosts.get(name)
            if inventory is not None:
                age.add_metric([name], max(0.0, now - inventory.at))
                running.add_metric([name], len(inventory.running))
        yield from (hosts, links, reconnects, age, running)
        yield GaugeMetricFamily(
            "vmfenced_fences_in_flight", "Fences running now", value=self._inflight()
        )


class _JournalGauges:
    """The fence journal's health, read from `Journal.state()` when scraped."""

    def __init__(self, state: Callable[[], Mapping[str, Any]]) -> None:
        self._state = state

    def collect(self) -> Iterable[Metric]:
        state = self._state()
        yield GaugeMetricFamily(
            "vmfenced_journal_writable",
            "1 while the fence journal takes records, 0 while writes fail (records wait in memory)",
            value=1 if state.get("state") == "ok" else 0,
        )
        yield GaugeMetricFamily(
            "vmfenced_journal_backlog",
            "Fence records waiting in memory for the journal's disk",
            value=state.get("backlog", 0),
        )
        yield CounterMetricFamily(
            "vmfenced_journal_dropped_records",
            "Fence records dropped from a full in-memory backlog (their text is in the log)",
            value=state.get("dropped", 0),
        )


class MetricsServer:
    """GET /metrics over plain HTTP/1.0 on the event loop: one request per connection."""

    def __init__(self, metrics: Metrics, address: str, port: int) -> None:
        self.address = address
        self.port = port
        self._metrics = metrics
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._log = structlog.get_logger("vmfenced.metrics")

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve, self.address, self.port, limit=MAX_REQUEST_HEAD
            )
        except OSError as exc:
            raise StartupError(
                f"metrics.listen: cannot listen on {self.endpoint}: {exc.strerror}"
            ) from None
        self._log.info("metrics endpoint listening", listen=self.endpoint)

    @property
    def endpoint(self) -> str:
        return (
            f"[{self.address}]:{self.port}"
            if ":" in self.address
            else f"{self.address}:{self.port}"
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            if len(self._clients) > MAX_HTTP_CLIENTS:
                await _respond(writer, 503, b"too many clients\n")
                return
            async with asyncio.timeout(HTTP_TIMEOUT):
                status, body, head_only = await self._answer(reader)
                await _respond(writer, status, body, head_only=head_only)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, b"bad request\n", False
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, b"only GET and HEAD\n", False
        if target == "/metrics":
            return 200, self._metrics.render(), method == "HEAD"
        if target == "/":
            return 200, b"vmfenced: metrics at /metrics\n", method == "HEAD"
        return 404, b"not found; metrics are at /metrics\n", method == "HEAD"


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


async def _respond(
    writer: asyncio.StreamWriter, status: int, body: bytes, *, head_only: bool = False
) -> None:
    content_type = CONTENT_TYPE_PLAIN_0_0_4 if status == 200 else "text/plain; charset=utf-8"
    head = (
        f"HTTP/1.0 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n" + ("Allow: GET, HEAD\r\n" if status == 405 else "") + "\r\n"
    )
    writer.write(head.encode("ascii") + (b"" if head_only else body))
    await writer.drain()
