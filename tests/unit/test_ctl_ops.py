"""vmfencectl reload, history and metrics against the fake daemon; --since parsing."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from tests.fakedaemon import NOW, Err, FakeDaemon, Ok
from tests.fakedaemon import run_ctl as ctl
from vmfenced.clients.ctl import RELOAD_TIMEOUT_S, UsageError, build_parser, parse_since


def reload_result(**extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "changed": True,
        "added": ["esx4"],
        "removed": ["esx3"],
        "replaced": [],
        "unchanged": ["esx1", "esx2"],
        "settings": ["aliases"],
        "elapsed_ms": 812.5,
    }
    base.update(extra)
    return base


def record(n: int, **extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "v": 1,
        "time": "2025-11-24T16:00:00.000+00:00",
        "t": 1764000000.0 + n,
        "peer": {"uid": 0, "pid": 4242},
        "id": n,
        "vm": "node1",
        "target": "gfs-node1",
        "action": "off",
        "result": "killed",
        "ok": True,
        "host": "esx1",
        "cartel": 68761,
        "reason": None,
        "joined": False,
        "elapsed_ms": 1.9,
        "total_ms": 2.25,
    }
    base.update(extra)
    return base


def test_reload_summary(daemon: FakeDaemon) -> None:
    daemon.set("reload", Ok(reload_result()))
    code, out, err = ctl(daemon, "reload")
    assert (code, err) == (0, "")
    assert out == ("reloaded: added esx4; removed esx3; changed aliases (links kept: esx1, esx2)\n")
    assert daemon.requests[-1] == {"op": "reload", "id": 1}
    daemon.set("reload", Ok(reload_result(changed=False, added=[], removed=[], settings=[])))
    assert ctl(daemon, "reload")[1] == "reloaded: no change\n"


def test_reload_refused_exits_1_with_the_reasons(daemon: FakeDaemon) -> None:
    daemon.set(
        "reload",
        Err(
            "reload_failed",
            "configuration NOT changed: /etc/vmfenced/vmfenced.toml: hosts[1] (esx2).port: "
            "Input should be less than or equal to 65535",
        ),
    )
    code, out, err = ctl(daemon, "reload")
    assert (code, out) == (1, "")
    assert err == (
        "vmfencectl: daemon error reload_failed: configuration NOT changed: "
        "/etc/vmfenced/vmfenced.toml: hosts[1] (esx2).port: "
        "Input should be less than or equal to 65535\n"
    )


def test_history_table(daemon: FakeDaemon) -> None:
    daemon.set(
        "history",
        Ok(
            {
                "entries": [
                    record(1),
                    record(
                        2,
                        vm="gfs-node2",
                        target="gfs-node2",
                        result="failed",
                        ok=False,
                        host=None,
                        cartel=None,
                        reason="cannot confirm it is off: unreachable esx2 (timed out)",
                        elapsed_ms=None,
                        total_ms=10012.0,
                        peer={"uid": 189, "pid": 77},
                    ),
                ],
                "skipped": 1,
                "journal": "/var/lib/vmfenced/fences.jsonl",
            }
        ),
    )
    code, out, err = ctl(daemon, "history")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "TIME (UTC)                VM                  ACTION  RESULT  HOST  CARTEL  MS       "
        "ASKED BY        REASON",
        "2025-11-24 16:00:01.000Z  node1 -> gfs-node1  off     killed  esx1  68761   2.2      "
        "uid=0 pid=4242  -",
        "2025-11-24 16:00:02.000Z  gfs-node2           off     failed  -     -       10012.0  "
        "uid=189 pid=77  cannot confirm it is off: unreachable esx2 (timed out)",
        "(1 unreadable journal line(s) skipped, e.g. torn by a crash)",
    ]


def test_history_filters_are_sent(daemon: FakeDaemon) -> None:
    daemon.set("history", Ok({"entries": [record(1)], "skipped": 0, "journal": None}))
    code, out, _ = ctl(
        daemon, "history", "--vm", "node1", "--since", "2h", "--limit", "5", "--json"
    )
    assert code == 0
    assert daemon.requests[-1] == {
        "op": "history",
        "id": 1,
        "limit": 5,
        "vm": "node1",
        "since": NOW - 7200,
    }
    assert json.loads(out)["entries"][0]["cartel"] == 68761


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["history", "--since", "yesterday"], "--since 'yesterday': expected a date/time"),
        (["history", "--limit", "0"], "--limit must be 1 to 10000"),
        (["history", "--vm", "a\nb"], "the VM name contains control characters"),
    ],
)
def test_history_usage_errors(daemon: FakeDaemon, argv: list[str], message: str) -> None:
    code, out, err = ctl(daemon, *argv)
    assert (code, out) == (2, "")
    assert message in err
    assert daemon.requests == []


def test_metrics_prints_the_exposition_text(daemon: FakeDaemon) -> None:
    text = '# HELP vmfenced_host_up x\n# TYPE vmfenced_host_up gauge\nvmfenced_host_up{host="esx1"} 1.0\n'
    daemon.set("metrics", Ok({"text": text}))
    assert ctl(daemon, "metrics") == (0, text, "")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", NOW - 90),
        ("15m", NOW - 900),
        ("1.5h", NOW - 5400),
        ("3d", NOW - 3 * 86400),
        ("1w", NOW - 604800),
        ("1764000000", 1764000000.0),
        ("2025-11-24T16:00:00Z", 1764000000.0),
        ("2025-11-24T17:00:00+01:00", 1764000000.0),
        ("2025-11-24", datetime(2025, 11, 24).timestamp()),  # naive: local time
    ],
)
def test_parse_since(text: str, expected: float) -> None:
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "soon", "5 minutes", "nan", "inf", "-2h"])
def test_parse_since_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_since(text, NOW)


def test_reload_waits_longer_by_default() -> None:
    # The default reply timeout of a reload covers fences in flight and new hosts' logins.
    assert RELOAD_TIMEOUT_S > 30
    assert build_parser().parse_args(["reload"]).timeout is None
