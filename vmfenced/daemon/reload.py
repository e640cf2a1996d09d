"""Reload orchestration: a new config applied while the daemon serves, or nothing changes.

`reload_plan` says what a new config changes (pure); this module carries it out: one reload
at a time, hosts swapped only while no fence or live status runs, every other setting in the
same step as the swap. A reload that fails leaves the running config as it was: it never
stops the daemon, whatever it reads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import structlog

from vmfenced.config import Config
from vmfenced.daemon.fence import Fencer
from vmfenced.daemon.hostset import HostSet
from vmfenced.daemon.journal import Journal
from vmfenced.daemon.metrics import Metrics, MetricsServer
from vmfenced.daemon.notify import Notifier
from vmfenced.daemon.reload_plan import ReloadPlan, plan, prepare
from vmfenced.daemon.server import SocketServer, reserved_fds
from vmfenced.errors import ConfigError, StartupError


@dataclass(eq=False, repr=False)
class Reloader:
    """Owns the running config and keys, and the metrics listener that follows them."""

    config: Config
    keys: dict[Path, asyncssh.SSHKey]
    config_path: Path
    _: KW_ONLY
    hostset: HostSet
    server: SocketServer
    fencer: Fencer
    journal: Journal
    metrics: Metrics
    notifier: Notifier
    drained: Callable[[], Awaitable[None]]
    status_line: Callable[[], str]
    stopping: Callable[[], bool]
    metrics_server: MetricsServer | None = field(default=None, init=False)
    _tasks: set[asyncio.Task[dict[str, Any]]] = field(default_factory=set, init=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    _log: Any = field(default_factory=lambda: structlog.get_logger("vmfenced"), init=False)

    def start(self, origin: str) -> asyncio.Task[dict[str, Any]]:
        """Queue a reload (`origin`: "SIGHUP" or "request"); its task answers with the summary."""
        task = asyncio.create_task(self._reload(origin), name=f"reload-{origin}")
        self._tasks.add(task)

        def done(t: asyncio.Task[dict[str, Any]]) -> None:
            self._tasks.discard(t)
            if not t.cancelled():
                t.exception()  # retrieved: _reload logged it; a SIGHUP has nobody to tell

        task.add_done_callback(done)
        return task

    async def start_metrics(self) -> None:
        """Open the metrics listener the running config asks for, if any."""
        endpoint = self.config.metrics.endpoint()
        if endpoint is not None:
            self.metrics_server = MetricsServer(self.metrics, *endpoint)
            await self.metrics_server.start()

    async def close_metrics(self) -> None:
        if self.metrics_server is not None:
            await self.metrics_server.close()

    async def cancel(self) -> None:
        """Shutdown: reloads still waiting or swapping are abandoned (the config stays as was)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _reload(self, origin: str) -> dict[str, Any]:
        async with self._lock:
            self.notifier.reloading()
            self._log.info("reloading", origin=origin, config=str(self.config_path))
            started = time.perf_counter()
            try:
                applied = await self._apply()
            except ConfigError as exc:
                self.metrics.reloads.labels("failed").inc()
                self._log.error(
                    "reload failed: configuration NOT changed",
                    origin=origin,
                    problems=list(exc.problems),
                )
                raise
            except Exception as exc:
                self.metrics.reloads.labels("failed").inc()
                self._log.exception("reload failed", origin=origin)
                raise ConfigError(str(self.config_path), [f"internal error: {exc!r}"]) from None
            finally:
                if not self.stopping():
                    self.notifier.ready(self.status_line())
            self.metrics.reloads.labels("ok").inc()
            summary = applied.summary()
            summary["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 3)
            self._log.info("reloaded", origin=origin, **summary)
            return summary

    async def _apply(self) -> ReloadPlan:
        source = str(self.config_path)
        new, keys = await asyncio.to_thread(prepare, self.config_path)
        applied = plan(self.config, self.keys, new, keys, source)
        hosts = self.hostset.hosts
        old_metrics = self.metrics_server
        new_metrics = old_metrics
        try:
            if "metrics.listen" in applied.settings:
                endpoint = new.metrics.endpoint()
                new_metrics = None if endpoint is None else MetricsServer(self.metrics, *endpoint)
                if new_metrics is not None:
                    await new_metrics.start()
            before, after = self.config.daemon, new.daemon
            if (before.socket_mode, before.socket_group) != (after.socket_mode, after.socket_group):
                self.server.set_access(after.socket_mode, after.socket_group)
            # Old and new hosts both hold lanes until the old are retired: fewer clients then.
            swap = len(hosts) + len(applied.added) + len(applied.replaced)
            self.server.set_reserved_fds(reserved_fds(swap))
            retired = await self.hostset.reload(applied, self.drained)
        except BaseException as exc:
            self.server.set_reserved_fds(reserved_fds(len(hosts)))
            if new_metrics is not old_metrics and new_metrics is not None:
                await new_metrics.close()
            if isinstance(exc, StartupError):
                raise ConfigError(source, [str(exc)]) from None
            raise
        # Same step as the host swap (no await since): the rest of the config follows at once.
        self.fencer.aliases = dict(new.aliases)
        self.fencer.fence_timeout = new.daemon.fence_timeout
        self.fencer.on_timeout = new.daemon.on_timeout
        self.journal.set_limits(new.daemon.journal_max_bytes, new.daemon.journal_keep)
        self.server.idle_timeout = new.daemon.client_idle_timeout
        self.config, self.keys = new, keys
        self.metrics_server = new_metrics
        for name in applied.removed:
            self.metrics.forget(name)
        for kind in ("added", "replaced", "removed"):
            for name in getattr(applied, kind):
                self._log.info(f"host {kind}", host=name)
        await asyncio.gather(*(self.hostset.retire(h) for h in retired), return_exceptions=True)
        self.server.set_reserved_fds(reserved_fds(len(hosts)))
        if old_metrics is not None and old_metrics is not new_metrics:
            await old_metrics.close()
        return applied
