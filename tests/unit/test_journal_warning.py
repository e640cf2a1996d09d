"""A fence whose journal record is not on disk: the reply's journal_warning, what
fence_vmfenced and vmfencectl make of it (and of the journal's state), the metrics and the
watchdog's report, which never withholds the ping."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.fakedaemon import NOW, FakeDaemon, Ok, fence_result, status_result
from tests.fakedaemon import run_ctl as ctl
from vmfenced.clients.agent import run as agent_run
from vmfenced.clients.errors import ProtocolViolation
from vmfenced.clients.replies import parse_status
from vmfenced.daemon.api import Api
from vmfenced.daemon.fence import Fencer, FenceResult
from vmfenced.daemon.journal import FenceEntry
from vmfenced.daemon.metrics import Metrics
from vmfenced.daemon.notify import Notifier
from vmfenced.daemon.watchdog import Watchdog
from vmfenced.model import VMMap
from vmfenced.protocol import FenceRequest

WARNING = "fence record not written: No space left on device; kept in memory (3 waiting)"


def journal_state(**extra: object) -> dict[str, object]:
    state: dict[str, object] = {
        "path": "/var/lib/vmfenced/fences.jsonl",
        "state": "failing",
        "error": "No space left on device",
        "since": NOW - 125,
        "backlog": 3,
        "backlog_max": 1000,
        "dropped": 0,
    }
    state.update(extra)
    return state


# -- the daemon's reply ------------------------------------------------------------------------


class _Fencer(Fencer):
    """A fencer that kills at once, without hosts."""

    def __init__(self) -> None:
        super().__init__({}, VMMap(), {}, 5, lambda _host: None)

    async def fence(self, name: str, action: str) -> tuple[FenceResult, bool]:
        return FenceResult(name, action, "killed", "esx1", 68761, 1.5), False


class _Ops:
    def __init__(self, warning: str | None) -> None:
        self.warning = warning
        self.recorded: list[FenceEntry] = []

    async def reload(self) -> dict[str, Any]:
        raise NotImplementedError

    async def history(self, vm: str | None, since: float | None, limit: int) -> dict[str, Any]:
        raise NotImplementedError

    def metrics_text(self) -> str:
        raise NotImplementedError

    async def record(self, entry: FenceEntry) -> str | None:
        self.recorded.append(entry)
        return self.warning

    def record_nowait(self, entry: FenceEntry) -> None:
        self.recorded.append(entry)


@pytest.mark.asyncio
@pytest.mark.parametrize("warning", [WARNING, None])
async def test_the_fence_reply_carries_the_journal_warning(warning: str | None) -> None:
    ops = _Ops(warning)
    api = Api(_Fencer(), {}, VMMap(), ops)
    reply = await api.handle(FenceRequest(op="fence", vm="gfs-node1"))
    assert reply["outcome"] == "killed"  # the fence succeeded, whatever the journal did
    assert reply.get("journal_warning") == warning
    assert [e.result for e in ops.recorded] == ["killed"]


# -- fence_vmfenced ------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["off", "reboot"])
def test_agent_prints_the_journal_warning_and_still_succeeds(
    daemon: FakeDaemon, action: str
) -> None:
    outcome = "killed" if action == "off" else "rebooted"
    daemon.set("fence", Ok(fence_result(action, outcome, journal_warning=WARNING)))
    out, err = io.StringIO(), io.StringIO()
    stdin = f"action={action}\nplug=node1\nsocket={daemon.path}\n".encode()
    code = agent_run([], io.BytesIO(stdin), out, err, sleep=lambda _s: None)
    assert code == 0
    assert out.getvalue().startswith("Success: ")
    assert err.getvalue() == f"WARNING: vmfenced: {WARNING}\n"


def test_a_malformed_journal_warning_is_a_protocol_violation() -> None:
    # Like every field: a reply that does not have the documented shape is not guessed at.
    with pytest.raises(ProtocolViolation, match="journal"):
        parse_status({**status_result(), "journal": journal_state(state="fine")})


# -- vmfencectl ------------------------------------------------------------------------------


def test_ctl_fence_shows_the_journal_warning(daemon: FakeDaemon) -> None:
    daemon.set("fence", Ok(fence_result(journal_warning=WARNING)))
    code, out, err = ctl(daemon, "fence", "node1")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "gfs-node1: off -> killed on esx1 (cartel 68761) in 1.9 ms",
        f"journal warning: {WARNING}",
    ]


@pytest.mark.parametrize(
    ("state", "line"),
    [
        (
            journal_state(),
            "journal FAILING for 2m05s: No space left on device; 3 fence record(s) wait in "
            "memory (at most 1000)",
        ),
        (
            journal_state(dropped=7, backlog=1000),
            "journal FAILING for 2m05s: No space left on device; 1000 fence record(s) wait in "
            "memory (at most 1000); 7 record(s) dropped (backlog full): see the daemon's log",
        ),
        (
            journal_state(state="ok", error=None, since=None, backlog=0),
            "journal ok, /var/lib/vmfenced/fences.jsonl",
        ),
        (None, None),  # a daemon older than the backlog says nothing about it
    ],
)
def test_ctl_status_shows_the_journal(
    daemon: FakeDaemon, state: dict[str, object] | None, line: str | None
) -> None:
    result = status_result()
    if state is not None:
        result["journal"] = state
    daemon.set("status", Ok(result))
    code, out, err = ctl(daemon, "status")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "vmfenced 0.1.0, pid 1234, up 12s"
    if line is None:
        assert lines[1] == ""
    else:
        assert lines[1:3] == [line, ""]


def test_ctl_history_says_records_wait_in_memory(daemon: FakeDaemon) -> None:
    result = {"entries": [], "skipped": 0, "journal": "/j", "journal_state": journal_state()}
    daemon.set("history", Ok(result))
    code, out, err = ctl(daemon, "history")
    assert (code, err) == (0, "")
    assert out.splitlines()[-1] == (
        "(journal FAILING for 2m05s: No space left on device; 3 fence record(s) wait in memory "
        "(at most 1000): not listed above)"
    )
    ok = journal_state(state="ok", error=None, since=None, backlog=0)
    daemon.set("history", Ok(dict(result, journal_state=ok)))
    code, out, _ = ctl(daemon, "history")
    assert "journal" not in out.splitlines()[-1]
    code, out, _ = ctl(daemon, "history", "--json")
    assert json.loads(out)["journal_state"] == ok


# -- metrics and watchdog ------------------------------------------------------------------


def test_metrics_show_the_backlog_and_the_drops() -> None:
    metrics = Metrics({}, VMMap(), lambda: 0)
    metrics.watch_journal(lambda: journal_state(backlog=3, dropped=2))
    text = metrics.render().decode()
    assert "vmfenced_journal_writable 0.0\n" in text
    assert "vmfenced_journal_backlog 3.0\n" in text
    assert "vmfenced_journal_dropped_records_total 2.0\n" in text


class _Notifier(Notifier):
    def __init__(self) -> None:
        super().__init__(None)
        self.pings = 0

    def watchdog(self) -> bool:
        self.pings += 1
        return True


@pytest.mark.asyncio
async def test_a_failing_journal_is_reported_but_never_withholds_the_ping() -> None:
    said: list[str | None] = ["fence journal failing: No space left on device"]

    async def report() -> str | None:
        return said[0]

    async def healthy() -> str | None:
        return None

    notifier = _Notifier()
    watchdog = Watchdog(notifier, 20, [healthy], reports=[report])
    with capture_logs() as logs:
        assert await watchdog.tick()
        assert await watchdog.tick()
        assert watchdog.degraded == ["fence journal failing: No space left on device"]
        said[0] = None
        assert await watchdog.tick()
    assert notifier.pings == 3
    assert watchdog.degraded == []
    assert [(e["event"], e.get("problem")) for e in logs] == [
        ("degraded: watchdog ping still sent", "fence journal failing: No space left on device"),
        ("degraded no more", None),
    ]
