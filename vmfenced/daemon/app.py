"""`vmfenced`: the composition root. Builds every part from the config; runs, reloads, stops."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import asyncssh
import structlog

from vmfenced import __version__
from vmfenced.backends.registry import BACKENDS
from vmfenced.config import Config, check_environment, load
from vmfenced.daemon import logsetup
from vmfenced.daemon.api import Api
from vmfenced.daemon.fence import Fencer
from vmfenced.daemon.host import Host
from vmfenced.daemon.hostset import STARTUP_HOSTS_AT_ONCE, HostSet
from vmfenced.daemon.journal import FenceEntry, Journal
from vmfenced.daemon.link import Lane
from vmfenced.daemon.metrics import Metrics
from vmfenced.daemon.notify import Notifier, watchdog_interval
from vmfenced.daemon.reload import Reloader
from vmfenced.daemon.reload_plan import load_keys
from vmfenced.daemon.server import Peer, SocketServer, reserved_fds
from vmfenced.daemon.watchdog import Watchdog, journal_flowing, journal_writable, socket_accepts
from vmfenced.errors import ConfigError, StartupError
from vmfenced.model import LinkState, VMMap
from vmfenced.protocol import FenceRequest, Request, StatusRequest, VMStatusRequest

DEFAULT_CONFIG = Path("/etc/vmfenced/vmfenced.toml")
READY_WAIT_CAP = 60.0
# The longest a fence reply waits for its journal record: a hung disk delays a fence by this
# much, then the reply goes out with a journal_warning (the record stays queued).
RECORD_WAIT_S = 5.0

__all__ = ["Daemon", "check", "load_keys", "main"]


def check(path: Path) -> list[str]:
    """Everything `--check-config` reports, one line per problem."""
    try:
        config = load(path)
    except ConfigError as exc:
        return list(exc.problems)
    problems = check_environment(config)
    if not problems:
        try:
            load_keys(config)
        except StartupError as exc:
            problems.append(str(exc))
    return problems


def open_journal(config: Config) -> Journal:
    daemon = config.daemon
    journal = Journal(daemon.state_directory, daemon.journal_max_bytes, daemon.journal_keep)
    journal.open()
    return journal


class Daemon:
    def __init__(
        self,
        config: Config,
        keys: dict[Path, asyncssh.SSHKey],
        journal: Journal,
        config_path: Path = DEFAULT_CONFIG,
    ) -> None:
        self.journal = journal
        self.config_path = config_path
        self.stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._failed = False
        self._busy = 0  # fence and vm_status requests being answered
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._log = structlog.get_logger("vmfenced")
        self._notifier = Notifier.from_environment()
        self.map = VMMap()
        self.hostset = HostSet(
            self.map, BACKENDS, self._spawn, self._lane_changed, config.daemon.inventory_interval
        )
        self.hosts = self.hostset.hosts
        self.fencer = Fencer(
            self.hosts,
            self.map,
            dict(config.aliases),
            config.daemon.fence_timeout,
            self.hostset.request_running,
            on_timeout=config.daemon.on_timeout,
        )
        self.metrics = Metrics(self.hosts, self.map, lambda: len(self.fencer.inflight()))
        self.metrics.watch_journal(self.journal.state)
        self.api = Api(self.fencer, self.hosts, self.map, self)
        self.server = SocketServer(
            config.daemon.socket,
            config.daemon.socket_mode,
            config.daemon.socket_group,
            self._handle,
            config.daemon.client_idle_timeout,
        )
        self.reloads = Reloader(
            config,
            keys,
            config_path,
            hostset=self.hostset,
            server=self.server,
            fencer=self.fencer,
            journal=self.journal,
            metrics=self.metrics,
            notifier=self._notifier,
            drained=self._drained,
            status_line=self._status_line,
            stopping=self.stop.is_set,
        )

    @property
    def config(self) -> Config:
        return self.reloads.config

    @property
    def keys(self) -> dict[Path, asyncssh.SSHKey]:
        return self.reloads.keys

    # -- tasks and events ----------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A dead supervisor would leave a host silently unfenceable: stop, let systemd restart.
            self._log.error("task failed", task=task.get_name(), exc_info=exc)
            self._failed = True
            self.stop.set()

    def _lane_changed(self, host: Host, lane: Lane) -> None:
        active = self.hostset.is_active(host)
        self._log.info(
            "lane state",
            host=host.name,
            lane=lane.name,
            state=lane.state.value,
            reason=lane.reason,
            **({} if active else {"pending": True}),
        )
        self.metrics.lane_changed(host, lane)
        if not active:
            return  # a host a reload is bringing in: it serves nothing yet
        if lane.state is LinkState.UP and lane is host.inventory:
            self.hostset.request(host.name)
        if lane is host.fence:
            self._notifier.status(self._status_line())

    def _status_line(self) -> str:
        up = sum(1 for h in self.hosts.values() if h.state is LinkState.UP)
        return f"{up}/{len(self.hosts)} hosts up"

    # -- run -----------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        started = False
        try:
            self.server.set_reserved_fds(reserved_fds(len(self.config.hosts)))
            await self.server.start()
            started = True
            await self.reloads.start_metrics()
        except StartupError as exc:
            self._log.error("cannot start", reason=str(exc))
            # Like every other startup error: one plain line on stderr, whatever the log format.
            print(f"vmfenced: {exc}", file=sys.stderr, flush=True)
            if started:  # never remove a socket another daemon listens on
                await self.server.close(grace=0)
            await asyncio.to_thread(self.journal.close)
            return 1
        built = self.hostset.build(self.config, self.keys, [h.name for h in self.config.hosts])
        for host in built:
            self.hostset.activate(host)
        self.hostset.start_all(built)
        self.hostset.start_vsphere(self.config)
        # Records a full disk refused land once it has room, even when no fence comes.
        self._spawn(self.journal.keep_retrying(), "journal-retry")
        self._start_watchdog()
        self._log.info("listening", socket=str(self.config.daemon.socket), hosts=len(self.hosts))
        connect = max(self.config.ssh_for(h).connect_timeout for h in self.config.hosts)
        # Hosts connect STARTUP_HOSTS_AT_ONCE at a time (HostSet.start_all): with many hosts,
        # some slow, the last start late. Capped well under systemd's TimeoutStartSec (90 s).
        waves = -(-len(built) // STARTUP_HOSTS_AT_ONCE)
        first = max(connect * 2 + 5, min(READY_WAIT_CAP, (connect * 2 + 1) * waves + 4))
        ready = asyncio.ensure_future(self._ready_when_inventoried(first))
        await self.stop.wait()
        ready.cancel()
        await self._shutdown()
        return 1 if self._failed else 0

    async def _ready_when_inventoried(self, timeout: float) -> None:
        complete = await self.hostset.first_round(timeout)
        self._notifier.ready(self._status_line())
        self._log.info("ready", inventoried=complete, status=self._status_line())

    def _start_watchdog(self) -> None:
        interval = watchdog_interval()
        if interval is None or not self._notifier.enabled:
            return
        watchdog = Watchdog(
            self._notifier,
            interval,
            [
                socket_accepts(self.config.daemon.socket),
                journal_flowing(self.journal.stuck_for, interval / 2),
            ],
            # Reported, never withholding the ping: a restart cannot free the disk, and a
            # daemon restarting in a loop would leave the cluster unable to fence.
            reports=[journal_writable(self.journal.state)],
        )
        self._log.info("watchdog on", interval_s=interval, ping_every_s=watchdog.period)
        self._spawn(watchdog.run(), "watchdog")

    def _on_signal(self) -> None:
        if self.stop.is_set():
            # A second signal during shutdown: the operator wants out now.
            self._log.warning("second signal: exiting at once")
            os._exit(1)
        self._log.info("stopping")
        self.stop.set()

    def _on_sighup(self) -> None:
        if self.stop.is_set():
            self._log.warning("SIGHUP ignored: shutting down")
            return
        self.reloads.start("SIGHUP")

    async def _shutdown(self) -> None:
        self._notifier.stopping()
        grace = self.config.daemon.shutdown_timeout
        self.server.stop_accepting()
        await self.reloads.cancel()
        inflight = self.fencer.inflight()
        if inflight:
            self._log.info("waiting for fences in flight", count=len(inflight))
            _done, late = await asyncio.wait(inflight, timeout=grace)
            for fence in late:
                fence.cancel()
        await self.server.close(grace=1.0)
        await self.reloads.close_metrics()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.hostset.close()
        # Records of fences cancelled above are still queued: written before the exit.
        await asyncio.to_thread(self.journal.close)
        self._notifier.close()
        self._log.info("stopped")

    # -- requests ------------------------------------------------------------------------------

    async def _handle(self, request: Request, peer: Peer) -> dict[str, Any]:
        # A reload swaps hosts only while no fence or live status is being answered.
        counted = isinstance(request, FenceRequest | VMStatusRequest)
        if counted:
            self._busy += 1
            self._quiet.clear()
        try:
            result = await self.api.handle(request, peer)
            if isinstance(request, StatusRequest):
                result["journal"] = self.journal.state()
            return result
        finally:
            if counted:
                self._busy -= 1
                if self._busy == 0:
                    self._quiet.set()

    async def _drained(self) -> None:
        """Return (without a later await) once nothing uses the hosts for a fence or status."""
        told = False
        while True:
            fences = self.fencer.inflight()
            if not fences and self._busy == 0:
                return
            if not told:
                self._log.info("reload waits for fences in flight", count=len(fences) or self._busy)
                told = True
            if fences:
                await asyncio.wait(fences)
            else:
                await self._quiet.wait()

    # -- DaemonOps: what the API asks of the daemon ---------------------------------------------

    async def record(self, entry: FenceEntry) -> str | None:
        self.metrics.observe_fence(entry.action, entry.result, (entry.total_ms or 0) / 1000)
        # The fence happened: its reply must not be lost, nor wait long, for the audit trail.
        warning = await self.journal.write_within(entry.record(), RECORD_WAIT_S)
        if warning is None:
            return None
        self.metrics.journal_errors.inc()
        self._log.error("fence not journaled", vm=entry.vm, host=entry.host, warning=warning)
        return warning

    def record_nowait(self, entry: FenceEntry) -> None:
        self.metrics.observe_fence(entry.action, entry.result, (entry.total_ms or 0) / 1000)
        self.journal.submit(entry.record())

    async def history(self, vm: str | None, since: float | None, limit: int) -> dict[str, Any]:
        entries, skipped = await self.journal.read(vm, since, limit)
        return {
            "entries": entries,
            "skipped": skipped,
            "journal": str(self.journal.path),
            "journal_state": self.journal.state(),  # records still waiting in memory
        }

    def metrics_text(self) -> str:
        return self.metrics.render().decode()

    async def reload(self) -> dict[str, Any]:
        return await asyncio.shield(self.reloads.start("request"))


async def _serve(
    config: Config, keys: dict[Path, asyncssh.SSHKey], journal: Journal, config_path: Path
) -> int:
    # Built inside the loop: locks and events belong to the loop that runs them.
    return await Daemon(config, keys, journal, config_path).run()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vmfenced", description=__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="TOML config file")
    parser.add_argument(
        "--check-config", type=Path, metavar="FILE", help="validate FILE, print problems, exit"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    parser.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    parser.add_argument("--version", action="version", version=f"vmfenced {__version__}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.check_config is not None:
        problems = check(args.check_config)
        for problem in problems:
            print(f"{args.check_config}: {problem}")
        if not problems:
            print(f"{args.check_config}: OK")
        sys.exit(1 if problems else 0)
    logsetup.configure(
        args.log_level, {"auto": None, "json": True, "console": False}[args.log_format]
    )
    try:
        config = load(args.config)
        problems = check_environment(config)
        if problems:
            raise ConfigError(str(args.config), problems)
        keys = load_keys(config)
        journal = open_journal(config)
    except (ConfigError, StartupError) as exc:
        print(f"vmfenced: {exc}", file=sys.stderr)
        sys.exit(1)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code = runner.run(_serve(config, keys, journal, args.config.absolute()))
    sys.exit(code)


if __name__ == "__main__":
    main()
