"""`vmfenced`: the composition root. Builds every part from the config, runs, tears down."""

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

from vmfenced import __version__, logsetup
from vmfenced.api import Api
from vmfenced.backends import Backend, esxi
from vmfenced.config import Config, check_environment, load
from vmfenced.errors import ConfigError, StartupError
from vmfenced.fence import Fencer
from vmfenced.host import Host
from vmfenced.inventory import InventoryService
from vmfenced.link import Lane
from vmfenced.model import LinkState, VMMap
from vmfenced.notify import Notifier
from vmfenced.server import SocketServer

DEFAULT_CONFIG = Path("/etc/vmfenced/vmfenced.toml")
BACKENDS: dict[str, Backend] = {"esxi": esxi.BACKEND}


def load_keys(config: Config) -> dict[Path, asyncssh.SSHKey]:
    keys: dict[Path, asyncssh.SSHKey] = {}
    for host in config.hosts:
        for path in config.ssh_for(host).client_keys:
            if path in keys:
                continue
            try:
                keys[path] = asyncssh.read_private_key(path)
            except (OSError, asyncssh.KeyImportError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                raise StartupError(f"cannot read client key {path}: {reason}") from None
    return keys


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


class Daemon:
    def __init__(self, config: Config, keys: dict[Path, asyncssh.SSHKey]) -> None:
        self.config = config
        self.stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._failed = False
        self._log = structlog.get_logger("vmfenced")
        self._notifier = Notifier.from_environment()
        self.map = VMMap()
        self.hosts = {
            h.name: Host(
                h,
                config.ssh_for(h),
                BACKENDS[h.kind],
                [keys[p] for p in config.ssh_for(h).client_keys],
                self._lane_changed,
            )
            for h in config.hosts
        }
        self.inventory = InventoryService(self.hosts, self.map, config.daemon.inventory_interval)
        self.fencer = Fencer(
            self.hosts,
            self.map,
            dict(config.aliases),
            config.daemon.fence_timeout,
            self.inventory.request,
        )
        self.server = SocketServer(
            config.daemon.socket,
            config.daemon.socket_mode,
            config.daemon.socket_group,
            Api(self.fencer, self.hosts, self.map).handle,
        )

    def _lane_changed(self, host: Host, lane: Lane) -> None:
        self._log.info(
            "lane state", host=host.name, lane=lane.name, state=lane.state.value, reason=lane.reason
        )
        if lane.state is LinkState.UP and lane is host.inventory:
            self.inventory.request(host.name)
        if lane is host.fence:
            self._notifier.send(f"STATUS={self._status_line()}")

    def _status_line(self) -> str:
        up = sum(1 for h in self.hosts.values() if h.state is LinkState.UP)
        return f"{up}/{len(self.hosts)} hosts up"

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

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

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        try:
            await self.server.start()
        except StartupError as exc:
            self._log.error("cannot start", reason=str(exc))
            return 1
        for host in self.hosts.values():
            host.start(self._spawn)
        self.inventory.start(self._spawn)
        self._log.info("listening", socket=str(self.config.daemon.socket), hosts=len(self.hosts))
        first = max(self.config.ssh_for(h).connect_timeout for h in self.config.hosts) * 2 + 5
        ready = asyncio.ensure_future(self._ready_when_inventoried(first))
        await self.stop.wait()
        ready.cancel()
        await self._shutdown()
        return 1 if self._failed else 0

    async def _ready_when_inventoried(self, timeout: float) -> None:
        complete = await self.inventory.first_round(timeout)
        self._notifier.send("READY=1", f"STATUS={self._status_line()}")
        self._log.info("ready", inventoried=complete, status=self._status_line())

    def _on_signal(self) -> None:
        if self.stop.is_set():
            # A second signal during shutdown: the operator wants out now.
            self._log.warning("second signal: exiting at once")
            os._exit(1)
        self._log.info("stopping")
        self.stop.set()

    async def _shutdown(self) -> None:
        self._notifier.send("STOPPING=1")
        grace = self.config.daemon.shutdown_timeout
        self.server.stop_accepting()
        inflight = self.fencer.inflight()
        if inflight:
            self._log.info("waiting for fences in flight", count=len(inflight))
            _done, late = await asyncio.wait(inflight, timeout=grace)
            for fence in late:
                fence.cancel()
        await self.server.close(grace=1.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(h.close() for h in self.hosts.values()), return_exceptions=True)
        self._notifier.close()
        self._log.info("stopped")


async def _serve(config: Config, keys: dict[Path, asyncssh.SSHKey]) -> int:
    # Built inside the loop: locks and events belong to the loop that runs them.
    return await Daemon(config, keys).run()


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
    except (ConfigError, StartupError) as exc:
        print(f"vmfenced: {exc}", file=sys.stderr)
        sys.exit(1)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code = runner.run(_serve(config, keys))
    sys.exit(code)


if __name__ == "__main__":
    main()
