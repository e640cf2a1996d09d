"""systemd's watchdog: WATCHDOG=1 from the event loop, only while the daemon is healthy.

The ping comes from a task on the loop, so a loop that is blocked or starved stops the pings
by itself. On top of that each tick runs self-checks (loop lag, the socket still accepting
connections, the journal's disk not hung); one failing check skips the ping, and systemd
restarts the daemon (Restart=on-failure) once WatchdogSec passes without one.

Reports are self-checks that are logged but never skip the ping: what a restart cannot cure
and a restart would make worse. A fence journal that cannot be written (a full or read-only
/var/lib) is one: the records wait in memory, fences go on, and a daemon restarted in a loop
by its watchdog could fence nothing. It shows in `vmfencectl status`, the log and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from vmfenced.daemon.notify import Notifier

# A check returns None when healthy, else what is wrong.
Check = Callable[[], Awaitable[str | None]]


class Watchdog:
    def __init__(
        self,
        notifier: Notifier,
        interval: float,
        checks: Sequence[Check],
        reports: Sequence[Check] = (),
    ) -> None:
        self.interval = interval
        self.period = interval / 2
        # More lag than this and the loop could miss a fence's deadline: not healthy.
        self.max_lag = max(0.5, interval / 4)
        self._notifier = notifier
        self._checks = list(checks)
        self._reports = list(reports)
        self._problem: str | None = None
        self._degraded: dict[int, str] = {}  # report index -> what it said last
        self._log = structlog.get_logger("vmfenced.watchdog")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self.period
            await asyncio.sleep(self.period)
            await self.tick(max(0.0, loop.time() - expected))

    async def tick(self, lag: float = 0.0) -> bool:
        """Run the checks; ping systemd when all pass. True when it pinged."""
        problem = f"event loop lagged {lag:.3f} s" if lag > self.max_lag else None
        for check in self._checks:
            if problem is not None:
                break
            try:
                async with asyncio.timeout(self.max_lag):
                    problem = await check()
            except TimeoutError:
                problem = f"self-check {getattr(check, '__name__', 'check')} did not finish"
        if problem != self._problem:
            if problem is None:
                self._log.info("healthy again: watchdog pings resumed")
            else:
                self._log.error("unhealthy: watchdog ping withheld", problem=problem)
            self._problem = problem
        await self._report()
        if problem is not None:
            self._log.debug("watchdog ping withheld", problem=problem)
            return False
        return self._notifier.watchdog()

    async def _report(self) -> None:
        """Run the reports; log each change (they never withhold the ping)."""
        for index, report in enumerate(self._reports):
            try:
                async with asyncio.timeout(self.max_lag):
                    said = await report()
            except TimeoutError:
                said = f"self-check {getattr(report, '__name__', 'report')} did not finish"
            before = self._degraded.get(index)
            if said == before:
                continue
            if said is None:
                self._degraded.pop(index)
                self._log.info("degraded no more", was=before)
            else:
                self._degraded[index] = said
                self._log.error("degraded: watchdog ping still sent", problem=said)

    @property
    def degraded(self) -> list[str]:
        """What the reports say is wrong now."""
        return list(self._degraded.values())


def socket_accepts(path: Path) -> Check:
    """The daemon's own socket takes a connection (it exists, is bound, the backlog has room)."""

    async def socket_accepts() -> str | None:
        try:
            _reader, writer = await asyncio.open_unix_connection(str(path))
        except OSError as exc:
            return f"socket {path} refuses connections: {exc.strerror}"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None

    return socket_accepts


def journal_flowing(stuck_for: Callable[[], float], bound: float) -> Check:
    """No fence record has waited on the disk longer than `bound` seconds."""

    async def journal_flowing() -> str | None:
        waited = stuck_for()
        return None if waited <= bound else f"a journal write has waited {waited:.1f} s"

    return journal_flowing


def journal_writable(state: Callable[[], Mapping[str, Any]]) -> Check:
    """A report: the fence journal takes records (`Journal.state()`), or why it does not."""

    async def journal_writable() -> str | None:
        now = state()
        if now.get("state") == "ok":
            return None
        # The reason only, not the counts: a change of reason is news, a longer backlog is not.
        return f"fence journal failing: {now.get('error')}; fence records wait in memory"

    return journal_writable
