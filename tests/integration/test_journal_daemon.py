"""The fence journal of the real daemon: on disk before the reply, across a SIGKILL and a torn
line, read back with `vmfencectl history`."""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import pytest

from vmfenced.ctl import run as ctl_run
from vmfenced.journal import FILE_NAME, read
from vmflab import Lab
from vmflab.daemon import LabDaemon

pytestmark = pytest.mark.integration

ALIASES = {"node1": "gfs-node1", "node2": "gfs-node2"}


def history(daemon: LabDaemon, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = ctl_run(["--socket", str(daemon.socket), "history", *argv], out, err)
    return code, out.getvalue(), err.getvalue()


def test_journal_survives_sigkill_and_a_torn_line(lab: Lab, tmp_path: Path) -> None:
    esx1 = lab.hosts["esx1"]
    first_vm = esx1.start_vm("gfs-node1")
    second_vm = esx1.start_vm("gfs-node2")
    state = tmp_path / "state"
    journal = state / FILE_NAME
    config = {"aliases": ALIASES, "daemon": {"state_directory": str(state)}}

    first = LabDaemon(lab, **config)
    try:
        first.start()
        reply = first.request({"op": "fence", "vm": "node1", "id": "pcmk-1"})
        assert reply["ok"], reply
        # Durable before the reply: readable now, and the daemon is killed without a chance
        # to flush anything.
        assert first.proc is not None
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=30)
        (record,) = read(journal)[0]
    finally:
        first.close()
    assert (record["vm"], record["target"], record["action"]) == ("node1", "gfs-node1", "off")
    assert (record["result"], record["ok"], record["host"]) == ("killed", True, "esx1")
    assert record["cartel"] == first_vm
    assert record["peer"] == {"uid": 0, "pid": os.getpid()}
    assert record["id"] == "pcmk-1"
    assert record["elapsed_ms"] <= record["total_ms"]

    # What a SIGKILL in the middle of a write leaves behind.
    with journal.open("ab") as handle:
        handle.write(b'{"v":1,"t":17640')

    with LabDaemon(lab, **config) as second:
        assert second.request({"op": "fence", "vm": "node2"})["ok"]
        assert not second.request({"op": "fence", "vm": "gfs-node9"})["ok"]

        code, out, err = history(second, "--json")
        assert (code, err) == (0, "")
        result = json.loads(out)
        assert result["skipped"] == 1
        assert result["journal"] == str(journal)
        entries = result["entries"]
        assert [(e["vm"], e["result"]) for e in entries] == [
            ("node1", "killed"),
            ("node2", "killed"),
            ("gfs-node9", "unknown_vm"),
        ]
        assert entries[1]["cartel"] == second_vm
        assert "no alias names it" in entries[2]["reason"]
        assert entries[0]["daemon_pid"] != entries[1]["daemon_pid"]

        code, out, _ = history(second, "--vm", "gfs-node2")
        assert code == 0
        lines = out.splitlines()
        assert len(lines) == 3  # header, node2's fence, the skipped-lines note
        assert "node2 -> gfs-node2" in lines[1] and "killed" in lines[1]
        assert lines[2].startswith("(1 unreadable journal line(s) skipped")

        code, out, _ = history(second, "--since", str(entries[1]["t"]), "--json")
        assert [e["vm"] for e in json.loads(out)["entries"]] == ["node2", "gfs-node9"]
