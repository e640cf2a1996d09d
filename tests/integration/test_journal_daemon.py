"""The fence journal of the real daemon: on disk before the reply, across a SIGKILL and a torn
line, read back with `vmfencectl history`; on a full disk (a tiny tmpfs), fences go on with a
warning and the records land, in order, once there is room."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import ctl, run_client
from tests.integration.test_notify_daemon import Systemd
from tests.waiting import wait_until
from vmfenced.daemon.journal import FILE_NAME, read
from vmflab import Lab
from vmflab.daemon import LabDaemon

pytestmark = pytest.mark.integration

ALIASES = {"node1": "gfs-node1", "node2": "gfs-node2"}


def history(daemon: LabDaemon, *argv: str) -> tuple[int, str, str]:
    return ctl(daemon, "history", *argv)


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


# -- a journal whose disk is full ------------------------------------------------------------


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "64k") -> Iterator[Path]:
    """A real filesystem that fills up: a tmpfs of `size`, unmounted afterwards."""
    path.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        # Lazy: a daemon killed by the test's failure may still hold the journal open.
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Take every free byte of the filesystem; the file returned gives it back when removed."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                os.write(fd, b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        # The page a short write left is taken byte by byte.
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0"):
                pass
    finally:
        os.close(fd)
    # tmpfs counts whole pages: the journal's last page still has room. A blank line takes it
    # (readers skip blank lines), so the next record finds the disk full.
    journal = directory / FILE_NAME
    slack = -journal.stat().st_size % os.sysconf("SC_PAGE_SIZE")
    if slack:
        with journal.open("ab") as handle:
            handle.write(b" " * (slack - 1) + b"\n")
    return filler


def fence_agent(daemon: LabDaemon, plug: str) -> subprocess.CompletedProcess[str]:
    """fence_vmfenced as Pacemaker starts it."""
    return run_client("agent", stdin=f"action=off\nplug={plug}\nsocket={daemon.socket}\n")


def test_a_full_journal_disk_never_fails_a_fence(lab: Lab, tmp_path: Path) -> None:
    for n, host in ((1, "esx1"), (2, "esx1"), (3, "esx2"), (4, "esx3")):
        lab.hosts[host].start_vm(f"gfs-node{n}")
    aliases = {f"node{n}": f"gfs-node{n}" for n in range(1, 5)}
    with (
        tiny_tmpfs(tmp_path / "state") as state,
        LabDaemon(lab, aliases=aliases, daemon={"state_directory": str(state)}) as daemon,
    ):
        first = daemon.request({"op": "fence", "vm": "node1"})
        assert first["ok"] and "journal_warning" not in first["result"], first
        assert daemon.status()["journal"]["state"] == "ok"

        filler = fill(state)
        second = daemon.request({"op": "fence", "vm": "node2"})
        assert second["ok"], second  # the fence itself succeeded
        assert second["result"]["outcome"] == "killed"
        assert second["result"]["journal_warning"] == (
            "fence record not written: No space left on device; kept in memory (1 waiting)"
        )
        # Pacemaker's agent: success, and the warning on stderr for Pacemaker's log.
        agent = fence_agent(daemon, "node3")
        assert (agent.returncode, agent.stdout) == (0, "Success: Powered OFF\n"), agent
        assert agent.stderr == (
            "WARNING: vmfenced: fence record not written: No space left on device; "
            "kept in memory (2 waiting)\n"
        )

        journal = daemon.status()["journal"]
        assert (journal["state"], journal["error"], journal["backlog"]) == (
            "failing",
            "No space left on device",
            2,
        )
        code, out, _ = ctl(daemon, "status")
        assert code == 0
        assert out.splitlines()[1].startswith("journal FAILING for ")
        assert "2 fence record(s) wait in memory" in out.splitlines()[1]

        # History reads what is on disk and says what is not.
        code, out, err = ctl(daemon, "history")
        assert (code, err) == (0, "")
        assert "gfs-node1" in out and "gfs-node2" not in out
        assert out.splitlines()[-1].startswith("(journal FAILING for ")

        code, out, _ = ctl(daemon, "metrics")
        assert "vmfenced_journal_backlog 2.0" in out
        assert "vmfenced_journal_writable 0.0" in out

        # Room again: the periodic retry writes the backlog, in order, with no new fence.
        filler.unlink()
        wait_until(lambda: daemon.status()["journal"]["backlog"] == 0)
        assert daemon.status()["journal"]["state"] == "ok"
        records, skipped = read(state / FILE_NAME)
        assert [r["target"] for r in records] == ["gfs-node1", "gfs-node2", "gfs-node3"]
        assert skipped <= 1  # a line the full disk cut short, kept as evidence
        assert [r["result"] for r in records] == ["killed"] * 3

        fourth = daemon.request({"op": "fence", "vm": "node4"})
        assert fourth["ok"] and "journal_warning" not in fourth["result"], fourth
        assert [r["target"] for r in read(state / FILE_NAME)[0]][-1] == "gfs-node4"
        log = daemon.log_path.read_text()
        assert '"fence journal failing: records wait in memory"' in log
        assert '"fence journal writable again"' in log


def test_a_full_journal_disk_does_not_stop_the_watchdog(lab: Lab, tmp_path: Path) -> None:
    """A restart cannot free the disk, and a daemon restarted in a loop fences nothing: the
    failing journal is reported (log, status) while WATCHDOG=1 goes on."""
    lab.hosts["esx1"].start_vm("gfs-node1")
    with tiny_tmpfs(tmp_path / "state") as state:
        systemd = Systemd(lab, state, watchdog_usec=400_000)
        try:
            systemd.wait_message(lambda m: "READY=1" in m)
            systemd.wait_message(lambda m: m == ["WATCHDOG=1"])
            assert systemd.daemon.request({"op": "fence", "vm": "gfs-node1"})["ok"]
            fill(state)
            reply = systemd.daemon.request({"op": "fence", "vm": "gfs-node1"})
            assert reply["ok"] and "journal_warning" in reply["result"], reply
            wait_until(lambda: systemd.log_count('"degraded: watchdog ping still sent"') == 1)
            assert '"problem": "fence journal failing: No space left on device' in (
                systemd.daemon.log_path.read_text()
            )
            systemd.drain()
            systemd.wait_message(lambda m: m == ["WATCHDOG=1"])  # pings go on
            assert systemd.log_count("watchdog ping withheld") == 0
            assert systemd.daemon.status()["journal"]["state"] == "failing"
        finally:
            systemd.close()
