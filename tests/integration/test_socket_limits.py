"""The daemon's socket limits on the real-sshd lab: idle clients are closed, one uid cannot take
every slot, root always gets through, the client limit follows RLIMIT_NOFILE and the number of
hosts, lanes reconnect while clients hold every slot, and vmfencectl shows the limit."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import ctl, sshd_sessions
from tests.integration.socket_clients import (
    GROUP,
    LONG_IDLE,
    NOBODY,
    STATUS,
    ask,
    crowd,
    gid_of,
    hosts,
    lab_of_two,
    limit_nofile,
    open_socket_to_others,
    read_until_eof,
    request,
)
from tests.waiting import wait_for
from vmfenced.daemon.clientlimits import MIN_CLIENTS, reserved_fds
from vmflab import Lab
from vmflab.daemon import LabDaemon, render_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from lab_of_two(tmp_path_factory)


def open_fds(daemon: LabDaemon) -> int:
    assert daemon.proc is not None
    return sum(1 for _ in Path(f"/proc/{daemon.proc.pid}/fd").iterdir())


def links_up(daemon: LabDaemon) -> int:
    """How many times a lane came up, by the daemon's log (its status needs a client slot)."""
    return daemon.log_path.read_text(errors="replace").count('"event": "link up"')


# -- idle timeout ------------------------------------------------------------------------------


def test_idle_and_slow_clients_are_closed_with_a_reason(lab: Lab) -> None:
    with LabDaemon(lab, hosts=["esx1"], daemon={"client_idle_timeout": 0.5}) as daemon:
        silent = socket.socket(socket.AF_UNIX)
        slow = socket.socket(socket.AF_UNIX)
        answered = socket.socket(socket.AF_UNIX)
        with silent, slow, answered:
            for sock in (silent, slow, answered):
                sock.settimeout(20)  # a bound on a hang, far above the 0.5 s under test
                sock.connect(str(daemon.socket))
            started = time.monotonic()
            slow.sendall(b'{"op":"sta')  # and never the rest of the line
            answered.sendall(STATUS)
            first = answered.makefile("rb").readline()
            replies = {
                name: read_until_eof(sock)
                for name, sock in (("silent", silent), ("slow", slow), ("answered", answered))
            }
            elapsed = time.monotonic() - started
        assert json.loads(first)["ok"] is True
        for name, data in replies.items():
            (reply,) = [json.loads(line) for line in data.split(b"\n") if line]
            assert reply["error"]["code"] == "unavailable", (name, reply)
            assert reply["error"]["message"] == (
                "no complete request line within 0.5 s (client_idle_timeout)"
            ), name
        assert elapsed >= 0.5  # the daemon cannot close before its timer: not a timing race
        assert daemon.status()["hosts"]


def test_a_busy_client_is_never_idle(lab: Lab) -> None:
    """The timer restarts after each reply: a client that keeps asking keeps its connection."""
    with (
        LabDaemon(lab, hosts=["esx1"], daemon={"client_idle_timeout": 0.3}) as daemon,
        socket.socket(socket.AF_UNIX) as sock,
    ):
        sock.settimeout(20)
        sock.connect(str(daemon.socket))
        replies = sock.makefile("rb")
        started = time.monotonic()
        count = 0
        while time.monotonic() - started < 1.5 or count < 5:
            sock.sendall(STATUS)
            assert json.loads(replies.readline())["ok"] is True
            count += 1


def test_idle_timeout_follows_a_reload(lab: Lab) -> None:
    with LabDaemon(lab, hosts=["esx1"], daemon=LONG_IDLE) as daemon:
        config = render_config(lab, daemon.socket, hosts=["esx1"])
        daemon.config_path.write_text(
            config.replace("[daemon]\n", "[daemon]\nclient_idle_timeout = 0.4\n")
        )
        reply = daemon.request({"op": "reload"})
        assert reply["ok"] and "daemon.client_idle_timeout" in reply["result"]["settings"], reply
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(20)
            sock.connect(str(daemon.socket))
            (line,) = read_until_eof(sock).split(b"\n")[:1]
        assert "within 0.4 s" in json.loads(line)["error"]["message"]


# -- who gets a slot ---------------------------------------------------------------------------


def test_one_uid_cannot_lock_out_another_nor_root(lab: Lab) -> None:
    users = gid_of(GROUP)
    daemon_keys = {**LONG_IDLE, "socket_mode": "0666", "socket_group": GROUP}
    with LabDaemon(lab, hosts=["esx1"], daemon=daemon_keys) as daemon:
        open_socket_to_others(daemon)
        nofile = reserved_fds(1) + 64
        limit_nofile(daemon, nofile)  # 64 clients: 16 per uid, 16 kept for root
        with contextlib.ExitStack() as held:
            for uid in (NOBODY, NOBODY - 1, NOBODY - 2):
                report = held.enter_context(crowd(daemon, 30, uid, [users]))
                assert report["served"] == 16, report
                assert {e["code"] for e in report["refused"]} == {"unavailable"}
                assert report["refused"][0]["message"] == (
                    f"too many clients of uid {uid}: it has 16 connected, the limit per uid is 16"
                )
            # A fourth uid finds only the slots kept for root.
            fourth = ask(daemon, NOBODY - 3, [users])
            assert fourth["error"]["message"] == (
                "too many clients: 48 connected, the last 16 of 64 are kept for root and "
                "the daemon's own user"
            )
            # Root gets through, to the remaining slots and not more.
            root = held.enter_context(crowd(daemon, 20))
            assert root["served"] == 16, root
            assert root["refused"][0]["message"] == (
                f"too many clients: 64 connected, the limit is 64 (RLIMIT_NOFILE {nofile} "
                f"minus {reserved_fds(1)} kept for the SSH lanes, the journal and metrics)"
            )
            assert open_fds(daemon) <= nofile
        # Released: served again.
        assert wait_for(lambda: ask(daemon, NOBODY, [users])["ok"])
        assert hosts(daemon) == ["esx1"]


def test_lanes_reconnect_while_clients_hold_every_slot(lab: Lab) -> None:
    with LabDaemon(lab, hosts=["esx1"], daemon=LONG_IDLE) as daemon:
        nofile = reserved_fds(1) + 64
        limit_nofile(daemon, nofile)
        before = sshd_sessions(lab.hosts["esx1"])
        ups = links_up(daemon)
        with crowd(daemon, 300) as report:  # far more than the descriptors left
            # (64 less the reload's connection, if the daemon has not seen it close yet.)
            assert report["served"] in (63, 64), report["served"]
            assert "the limit is 64 (" in report["refused"][0]["message"]
            for pid in before:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            # Both lanes come back while every client slot stays taken.
            assert wait_for(lambda: links_up(daemon) == ups + 2, timeout=30)
            assert open_fds(daemon) <= nofile
        assert wait_for(
            lambda: request(daemon, {"op": "status"})["result"]["hosts"][0]["state"] == "up"
        )
        assert "Too many open files" not in daemon.log_path.read_text(errors="replace")


def refused_limit(daemon: LabDaemon, count: int) -> str:
    """The message a root client over the total limit gets (`count` must exceed the limit)."""
    with crowd(daemon, count) as report:
        return str(report["refused"][0]["message"])


def test_reload_recomputes_the_client_limit_from_the_hosts(lab: Lab) -> None:
    with LabDaemon(lab, hosts=["esx1"], daemon=LONG_IDLE) as daemon:
        one = render_config(lab, daemon.socket, hosts=["esx1"], daemon=LONG_IDLE)
        two = render_config(lab, daemon.socket, hosts=["esx1", "esx2"], daemon=LONG_IDLE)
        # (The limit can only be lowered from outside: raising it needs CAP_SYS_RESOURCE.)
        daemon.config_path.write_text(two)
        limit_nofile(daemon, 300)
        assert hosts(daemon) == ["esx1", "esx2"]
        limit = 300 - reserved_fds(2)
        assert f"the limit is {limit} (RLIMIT_NOFILE 300 minus {reserved_fds(2)} " in (
            refused_limit(daemon, limit + 3)
        )
        daemon.config_path.write_text(one)
        assert request(daemon, {"op": "reload"})["result"]["removed"] == ["esx2"]
        limit = 300 - reserved_fds(1)
        assert f"the limit is {limit} (RLIMIT_NOFILE 300 minus {reserved_fds(1)} " in (
            refused_limit(daemon, limit + 3)
        )
        # Enough for one host and MIN_CLIENTS + 2 clients: a second host would leave 14.
        nofile = reserved_fds(1) + MIN_CLIENTS + 2
        limit_nofile(daemon, nofile)
        daemon.config_path.write_text(two)
        refused = request(daemon, {"op": "reload"})
        assert refused["error"]["code"] == "reload_failed"
        assert (
            f"RLIMIT_NOFILE is {nofile}: minus {reserved_fds(2)} descriptors kept for the SSH "
            f"lanes (4 per host), the journal and metrics, that leaves 14 for socket clients, "
            f"fewer than {MIN_CLIENTS}"
        ) in refused["error"]["message"]
        assert hosts(daemon) == ["esx1"]
        assert f"the limit is {MIN_CLIENTS + 2} (" in refused_limit(daemon, MIN_CLIENTS + 5)


def test_vmfencectl_shows_the_limit_not_a_broken_pipe(lab: Lab) -> None:
    """The daemon refuses at accept, usually before the client has sent its request."""
    with LabDaemon(lab, hosts=["esx1"], daemon=LONG_IDLE) as daemon:
        limit_nofile(daemon, reserved_fds(1) + MIN_CLIENTS)
        with crowd(daemon, MIN_CLIENTS + 1):
            for _ in range(20):
                code, _, err = ctl(daemon, "status")
                assert code == 1
                assert err.startswith(
                    f"vmfencectl: daemon error unavailable: too many clients: {MIN_CLIENTS} "
                    f"connected, the limit is {MIN_CLIENTS} (RLIMIT_NOFILE"
                ), err
