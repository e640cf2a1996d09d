"""Errors of the standard-library clients (agent, vmfencectl): each carries its data."""

from __future__ import annotations

JsonObject = dict[str, object]


class ClientError(Exception):
    """Base of every error this client raises."""


class DaemonUnreachable(ClientError):
    """The socket could not be reached, or the connection broke before the request went out."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot reach vmfenced at {path}: {reason}")
        self.path = path
        self.reason = reason


class DaemonTimeout(ClientError):
    """No reply within the deadline. For a fence, the outcome is unknown."""

    def __init__(self, path: str, op: str, timeout_s: float) -> None:
        super().__init__(f"timed out after {timeout_s:g} s waiting for vmfenced ({op}) at {path}")
        self.path = path
        self.op = op
        self.timeout_s = timeout_s


class DaemonError(ClientError):
    """The daemon answered `ok: false`."""

    def __init__(self, code: str, message: str, vm: str | None = None) -> None:
        super().__init__(f"{code}: {message}" if vm is None else f"{code}: {message} (vm {vm})")
        self.code = code
        self.message = message
        self.vm = vm


class ProtocolViolation(ClientError):
    """The daemon's reply does not follow docs/protocol.md."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"protocol violation: {detail}")
        self.detail = detail
