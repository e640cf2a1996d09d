"""sd_notify: one datagram per message on $NOTIFY_SOCKET (a leading '@' is the abstract namespace).

The protocol is newline-separated KEY=VALUE fields in one AF_UNIX datagram; no library needed.
Sending is best effort: systemd's absence or a full queue must never stop the daemon.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    def __init__(self, address: str | None) -> None:
        self._address = address
        self._sock: socket.socket | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, *fields: str) -> bool:
        """Send the fields as one message; False when there is nobody to tell or it failed."""
        if not self._address:
            return False
        address = self._address
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A full receive queue must never block the event loop.
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(fields).encode(), address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={_one_line(status)}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (>= 253, Type=notify-reload) tie READY=1 to this reload.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={_one_line(status)}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    # A newline would start a new field: STATUS text must never forge READY=1 or WATCHDOG=1.
    return " ".join(text.split())


def watchdog_interval(
    environ: Mapping[str, str] = os.environ, pid: int | None = None
) -> float | None:
    """Seconds within which systemd wants WATCHDOG=1 (WatchdogSec=), or None when it does not.

    WATCHDOG_PID, when set, names the process meant: a child that inherited the environment
    must not ping on its parent's behalf.
    """
    usec_text = environ.get("WATCHDOG_USEC", "")
    if not usec_text.isascii() or not usec_text.isdigit() or int(usec_text) == 0:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text:
        me = os.getpid() if pid is None else pid
        if not pid_text.isdigit() or int(pid_text) != me:
            return None
    return int(usec_text) / 1_000_000
