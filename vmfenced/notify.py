"""sd_notify: one datagram on $NOTIFY_SOCKET (a leading '@' is the abstract namespace)."""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None) -> None:
        self._address = address
        self._sock: socket.socket | None = None

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls(os.environ.get("NOTIFY_SOCKET") or None)

    def send(self, *fields: str) -> bool:
        """Best effort: systemd's absence or a full queue must never stop the daemon."""
        if not self._address:
            return False
        address = self._address
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
