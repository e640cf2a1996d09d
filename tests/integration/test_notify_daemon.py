"""What the real daemon tells systemd, read from a real datagram socket: READY=1 and STATUS=,
WATCHDOG=1 while healthy (and not when it is not), RELOADING=1 around SIGHUP, STOPPING=1."""

from __future__ import annotations

import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.waiting import wait_for
from vmflab import Lab
from vmflab.daemon import LabDaemon

pytestmark = pytest.mark.integration


class Systemd:
    """The daemon started like systemd would: NOTIFY_SOCKET and WATCHDOG_USEC set."""

    def __init__(self, lab: Lab, state: Path, watchdog_usec: int) -> None:
        self.daemon = LabDaemon(lab, daemon={"state_directory": str(state)})
        self.path = self.daemon.dir / "systemd-notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self.messages: list[list[str]] = []
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "NOTIFY_SOCKET": str(self.path),
            "WATCHDOG_USEC": str(watchdog_usec),
        }
        with self.daemon.log_path.open("ab") as log:
            self.daemon.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "vmfenced.daemon"),
                    *("--config", str(self.daemon.config_path), "--log-level", "debug"),
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.daemon.proc is not None
        return self.daemon.proc

    def drain(self) -> list[list[str]]:
        got: list[list[str]] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                self.messages += got
                return got
            got.append(data.decode().split("\n"))

    def wait_message(self, wanted: Callable[[list[str]], bool], timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.drain():
                if wanted(message):
                    return message
            assert self.proc.poll() is None, self.daemon.log()
            # Wait for the next datagram (or a bounded moment to look at the process again).
            select.select([self.sock], [], [], max(0.0, min(0.5, deadline - time.monotonic())))
        raise AssertionError(f"no such message in {timeout} s; got {self.messages}")

    def log_count(self, text: str) -> int:
        return self.daemon.log_path.read_text(errors="replace").count(text)

    def close(self) -> None:
        self.daemon.close()
        self.sock.close()


@pytest.fixture
def systemd(lab: Lab, tmp_path: Path) -> Iterator[Systemd]:
    started = Systemd(lab, tmp_path / "state", watchdog_usec=400_000)
    try:
        yield started
    finally:
        started.close()


def test_notify_messages_through_a_daemon_life(systemd: Systemd, lab: Lab) -> None:
    ready = systemd.wait_message(lambda m: "READY=1" in m)
    status = [f for f in ready if f.startswith("STATUS=")]
    assert len(status) == 1 and re.fullmatch(r"STATUS=[0-3]/3 hosts up", status[0]), ready
    if status != ["STATUS=3/3 hosts up"]:
        systemd.wait_message(lambda m: m == ["STATUS=3/3 hosts up"])
    # WATCHDOG_USEC=0.4 s: a ping every 0.2 s from the event loop.
    systemd.wait_message(lambda m: m == ["WATCHDOG=1"])
    systemd.wait_message(lambda m: m == ["WATCHDOG=1"])

    systemd.proc.send_signal(signal.SIGHUP)
    reloading = systemd.wait_message(lambda m: "RELOADING=1" in m)
    assert re.fullmatch(r"MONOTONIC_USEC=\d+", reloading[1]), reloading
    systemd.wait_message(lambda m: "READY=1" in m)
    assert wait_for(lambda: systemd.log_count('"reloaded"') == 1)
    assert '"origin": "SIGHUP"' in systemd.daemon.log()

    lab.hosts["esx2"].stop_sshd()
    systemd.wait_message(lambda m: m == ["STATUS=2/3 hosts up"])
    lab.hosts["esx2"].start_sshd()
    systemd.wait_message(lambda m: m == ["STATUS=3/3 hosts up"])

    systemd.proc.send_signal(signal.SIGTERM)
    systemd.wait_message(lambda m: m == ["STOPPING=1"])
    assert systemd.proc.wait(timeout=30) == 0


def test_watchdog_pings_stop_while_the_socket_is_gone(systemd: Systemd) -> None:
    systemd.wait_message(lambda m: "READY=1" in m)
    systemd.wait_message(lambda m: m == ["WATCHDOG=1"])
    systemd.daemon.socket.unlink()  # say, a cleanup job removed it: clients cannot connect
    withheld = '"watchdog ping withheld"'
    assert wait_for(lambda: systemd.log_count(withheld) >= 1)
    assert '"problem": "socket ' in systemd.daemon.log()
    # Every ping sent before the first withheld tick is queued by now; none may follow.
    systemd.drain()
    seen = systemd.log_count(withheld)
    assert wait_for(lambda: systemd.log_count(withheld) >= seen + 2)
    assert ["WATCHDOG=1"] not in systemd.drain()
    assert systemd.log_count('"unhealthy: watchdog ping withheld"') == 1
