"""Blocking stdlib client for the daemon's unix socket (docs/protocol.md).

Used by `fence_vmfenced` and `vmfencectl`, which start as a new process on every call: this
module imports nothing outside the standard library, so they start fast.
"""

from __future__ import annotations

import json
import socket
import time

from vmfenced.clients.errors import (
    ClientError,
    DaemonError,
    DaemonTimeout,
    DaemonUnreachable,
    JsonObject,
    ProtocolViolation,
)
from vmfenced.clients.records import (
    DaemonInfo,
    FenceResult,
    HistoryEntry,
    HistoryResult,
    HostInfo,
    ReloadResult,
    StatusResult,
    VmInfo,
    VmState,
)
from vmfenced.clients.replies import (
    parse_fence,
    parse_history,
    parse_list,
    parse_metrics,
    parse_reload,
    parse_status,
    parse_vm_status,
)
from vmfenced.wire import DEFAULT_SOCKET, FENCE_ACTIONS, MAX_REQUEST_BYTES, MAX_VM_NAME

# The errors and result types are part of this module's interface for the agent and ctl.
__all__ = [
    "DEFAULT_SOCKET",
    "FENCE_ACTIONS",
    "Client",
    "ClientError",
    "DaemonError",
    "DaemonInfo",
    "DaemonTimeout",
    "DaemonUnreachable",
    "FenceResult",
    "HistoryEntry",
    "HistoryResult",
    "HostInfo",
    "JsonObject",
    "ProtocolViolation",
    "ReloadResult",
    "StatusResult",
    "VmInfo",
    "VmState",
    "parse_fence",
    "parse_history",
    "parse_list",
    "parse_metrics",
    "parse_reload",
    "parse_status",
    "parse_vm_status",
    "vm_name_problem",
]

# A status reply for a thousand VMs is a few hundred KiB; the bound only stops a runaway peer.
MAX_REPLY_BYTES = 16 * 1024 * 1024


def vm_name_problem(name: str) -> str | None:
    """Why `name` cannot be sent as `vm` (the daemon's own rule), or None if it can."""
    if not name:
        return "the VM name is empty"
    if len(name) > MAX_VM_NAME:
        return f"the VM name is longer than {MAX_VM_NAME} characters"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name):
        return "the VM name contains control characters"
    return None


class Client:
    """One connection; any number of sequential requests on it.

    `timeout_s` bounds each request (connect + send + reply); None waits forever.
    After any failure other than a `DaemonError` the connection is closed, since the
    reply stream can no longer be matched to requests.
    """

    def __init__(
        self,
        path: str = DEFAULT_SOCKET,
        timeout_s: float | None = 10.0,
        max_reply_bytes: int = MAX_REPLY_BYTES,
    ) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.max_reply_bytes = max_reply_bytes
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._next_id = 1

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer.clear()

    def call(self, op: str, **fields: object) -> JsonObject:
        """Send one request and return its `result` object; raise on anything else."""
        request_id = self._next_id
        self._next_id += 1
        line = json.dumps({"op": op, "id": request_id, **fields}, ensure_ascii=False)
        data = line.encode("utf-8") + b"\n"
        if len(data) > MAX_REQUEST_BYTES:
            raise ValueError(f"request of {len(data)} bytes exceeds {MAX_REQUEST_BYTES}")
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        try:
            sock = self._connected(op, deadline)
            try:
                self._send(sock, op, data, deadline)
            except DaemonUnreachable:
                # A daemon that refuses a client (a connection limit, permission) writes one
                # line and closes without reading: that line, not the broken pipe, says why.
                refusal = self._line_already_sent(sock)
                if refusal is None:
                    raise
                self.close()
                reply = refusal
            else:
                reply = self._read_line(sock, op, deadline)
        except ClientError:
            self.close()
            raise
        try:
            return _parse_reply(reply, request_id)
        except ProtocolViolation:
            self.close()
            raise

    def status(self) -> StatusResult:
        return parse_status(self.call("status"))

    def list_vms(self) -> tuple[VmInfo, ...]:
        return parse_list(self.call("list"))

    def vm_status(self, vm: str) -> VmState:
        return parse_vm_status(self.call("vm_status", vm=vm))

    def fence(self, vm: str, action: str) -> FenceResult:
        return parse_fence(self.call("fence", vm=vm, action=action))

    def reload(self) -> ReloadResult:
        return parse_reload(self.call("reload"))

    def history(
        self, vm: str | None = None, since: float | None = None, limit: int = 100
    ) -> HistoryResult:
        fields: JsonObject = {"limit": limit}
        if vm is not None:
            fields["vm"] = vm
        if since is not None:
            fields["since"] = since
        return parse_history(self.call("history", **fields))

    def metrics(self) -> str:
        return parse_metrics(self.call("metrics"))

    def _timeout(self, op: str) -> DaemonTimeout:
        return DaemonTimeout(self.path, op, self.timeout_s if self.timeout_s is not None else 0.0)

    def _remaining(self, op: str, deadline: float | None) -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._timeout(op)
        return left

    def _connected(self, op: str, deadline: float | None) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self._remaining(op, deadline))
            sock.connect(self.path)
        except TimeoutError as exc:
            sock.close()
            raise self._timeout(op) from exc
        except (OSError, ValueError) as exc:
            sock.close()
            raise DaemonUnreachable(self.path, _connect_problem(exc)) from exc
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        return sock

    def _send(self, sock: socket.socket, op: str, data: bytes, deadline: float | None) -> None:
        try:
            sock.settimeout(self._remaining(op, deadline))
            sock.sendall(data)
        except TimeoutError as exc:
            raise self._timeout(op) from exc
        except OSError as exc:
            raise DaemonUnreachable(self.path, f"connection lost while sending: {exc}") from exc

    def _line_already_sent(self, sock: socket.socket) -> bytes | None:
        """A complete line the daemon sent before closing, read without waiting; else None."""
        try:
            sock.setblocking(False)
            while b"\n" not in self._buffer and len(self._buffer) <= self.max_reply_bytes:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                self._buffer += chunk
        except OSError:
            pass  # nothing queued (EAGAIN), or the reset that follows the data
        end = self._buffer.find(b"\n")
        if end < 0:
            return None
        return bytes(self._buffer[:end])

    def _read_line(self, sock: socket.socket, op: str, deadline: float | None) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > self.max_reply_bytes:
                raise ProtocolViolation(f"reply longer than {self.max_reply_bytes} bytes")
            try:
                sock.settimeout(self._remaining(op, deadline))
                chunk = sock.recv(65536)
            except TimeoutError as exc:
                raise self._timeout(op) from exc
            except OSError as exc:
                raise DaemonUnreachable(self.path, f"connection lost: {exc}") from exc
            if not chunk:
                raise ProtocolViolation(f"connection closed before the reply to {op!r}")
            self._buffer += chunk


def _connect_problem(exc: OSError | ValueError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such socket (is vmfenced running?)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is vmfenced running?)"
    if isinstance(exc, PermissionError):
        return "permission denied (run as root or as a member of socket_group)"
    # ValueError: a path too long for sun_path or holding a NUL byte.
    return str(exc) or type(exc).__name__


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _parse_reply(line: bytes, request_id: int) -> JsonObject:
    try:
        reply = json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolViolation(f"reply is not a JSON line: {line[:120]!r}") from exc
    if not isinstance(reply, dict):
        raise ProtocolViolation(f"reply is not an object: {line[:120]!r}")
    ok = reply.get("ok")
    if not isinstance(ok, bool):
        raise ProtocolViolation("reply has no boolean 'ok'")
    reply_id = reply.get("id")
    # A request the daemon could not parse is answered with id null.
    if reply_id != request_id and not (reply_id is None and not ok):
        raise ProtocolViolation(f"reply id {reply_id!r} does not match request id {request_id}")
    if ok:
        result = reply.get("result")
        if not isinstance(result, dict):
            raise ProtocolViolation("successful reply has no 'result' object")
        return result
    error = reply.get("error")
    if not isinstance(error, dict):
        raise ProtocolViolation("failed reply has no 'error' object")
    code, message, vm = error.get("code"), error.get("message"), error.get("vm")
    if not isinstance(code, str) or not isinstance(message, str):
        raise ProtocolViolation("error object lacks string 'code' and 'message'")
    if vm is not None and not isinstance(vm, str):
        raise ProtocolViolation("error 'vm' is not a string")
    raise DaemonError(code, message, vm)


# Typed views of the results. Unknown keys are ignored so that a newer daemon may add fields.
