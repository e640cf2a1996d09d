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


class Reloader:
    """Owns the running config and keys, and the metrics listener that follows them."""

    def __init__(
        self,
        config: Config,
        keys: dict[Path, asyncssh.SSHKey],
        config_path: Path,
        *,
        hostset: HostSet,
        server: SocketServer,
        fencer: Fencer,
        journal: Journal,
        metrics: Metrics,
        notifier: Notifier,
        drained: Callable[[], Awaitable[None]],
        status_line: Callable[[], str],
        stopping: Callable[[], bool],
    ) -> None:
        self.config = config
        self.keys = keys
        self.config_path = config_path
        self.metrics_server: MetricsServer | None = None
        self._hostset = hostset
        self._server = server
        self._fencer = fencer
        self._journal = journal
        self._metrics = metrics
        self._notifier = notifier
        self._drained = drained
        self._status_line = status_line
        self._stopping = stopping
        self._tasks: set[asyncio.Task[dict[str, Any]]] = set()
        self._lock = asyncio.Lock()
        self._log = structlog.get_logger("vmfenced")

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

    async def cancel(self) -> None:
        """Shutdown: reloads still waiting or swapping are abandoned (the config stays as was)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _reload(self, origin: str) -> dict[str, Any]:
        async with self._lock:
            self._notifier.reloading()
            self._log.info("reloading", origin=origin, config=str(self.config_path))
            started = time.perf_counter()
            try:
                applied = await self._apply()
            except ConfigError as exc:
                self._metrics.reloads.labels("failed").inc()
                self._log.error(
                    "reload failed: configuration NOT changed",
                    origin=origin,
                    problems=list(exc.problems),
                )
                raise
            except Exception as exc:
                self._metrics.reloads.labels("failed").inc()
                self._log.exception("reload failed", origin=origin)
                raise ConfigError(str(self.config_path), [f"internal error: {exc!r}"]) from None
            finally:
                if not self._stopping():
                    self._notifier.ready(self._status_line())
            self._metrics.reloads.labels("ok").inc()
            summary = applied.summary()
            summary["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 3)
            self._log.info("reloaded", origin=origin, **summary)
            return summary

    async def _apply(self) -> ReloadPlan:
        source = str(self.config_path)
        new, keys = await asyncio.to_thread(prepare, self.config_path)
        applied = plan(self.config, self.keys, new, keys, source)
        hosts = self._hostset.hosts
        old_metrics = self.metrics_server
        new_metrics = old_metrics
        try:
            if "metrics.listen" in applied.settings:
                endpoint = new.metrics.endpoint()
                new_metrics = None if endpoint is None else MetricsServer(self._metrics, *endpoint)
                if new_metrics is not None:
                    await new_metrics.start()
            before, after = self.config.daemon, new.daemon
            if (before.socket_mode, before.socket_group) != (after.socket_mode, after.socket_group):
                self._server.set_access(after.socket_mode, after.socket_group)
            # Old and new hosts both hold lanes until the old are retired: fewer clients then.
            swap = len(hosts) + len(applied.added) + len(applied.replaced)
            self._server.set_reserved_fds(reserved_fds(swap))
            retired = await self._hostset.reload(applied, self._drained)
        except BaseException as exc:
            self._server.set_reserved_fds(reserved_fds(len(hosts)))
            if new_metrics is not old_metrics and new_metrics is not None:
                await new_metrics.close()
            if isinstance(exc, StartupError):
                raise ConfigError(source, [str(exc)]) from None
            raise
        # Same step as the host swap (no await since): the rest of the config follows at once.
        self._fencer.aliases = dict(new.aliases)
        self._fencer.fence_timeout = new.daemon.fence_timeout
        self._fencer.on_timeout = new.daemon.on_timeout
        self._journal.set_limits(new.daemon.journal_max_bytes, new.daemon.journal_keep)
        self._server.idle_timeout = new.daemon.client_idle_timeout
        self.config, self.keys = new, keys
        self.metrics_server = new_metrics
        for name in applied.removed:
            self._metrics.forget(name)
        for kind in ("added", "replaced", "removed"):
            for name in getattr(applied, kind):
                self._log.info(f"host {kind}", host=name)
        await asyncio.gather(*(self._hostset.retire(h) for h in retired), return_exceptions=True)
        self._server.set_reserved_fds(reserved_fds(len(hosts)))
        if old_metrics is not None and old_metrics is not new_metrics:
            await old_metrics.close()
        return applied
