"""Blocking stdlib client for the daemon's unix socket (docs/protocol.md).

Used by `fence_vmfenced` and `vmfencectl`, which start as a new process on every call: this
module imports nothing outside the standard library, so they start fast.
"""

from __future__ import annotations

import json
import math
import socket
import time
from types import TracebackType
from typing import NamedTuple, TypeVar

DEFAULT_SOCKET = "/run/vmfenced/vmfenced.sock"
# A status reply for a thousand VMs is a few hundred KiB; the bound only stops a runaway peer.
MAX_REPLY_BYTES = 16 * 1024 * 1024
MAX_REQUEST_BYTES = 64 * 1024
MAX_VM_NAME = 256
FENCE_ACTIONS = ("off", "on", "reboot")

JsonObject = dict[str, object]
_T = TypeVar("_T")


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

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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
            self._send(sock, op, data, deadline)
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


class DaemonInfo(NamedTuple):
    version: str
    pid: int
    uptime_s: float


class HostInfo(NamedTuple):
    name: str
    address: str
    port: int
    kind: str
    state: str
    since: float | None
    reason: str | None
    rtt_ms: float | None
    inventory_age_s: float | None
    vm_count: int
    # Address the fence lane reaches now (a fallback when the primary is unreachable).
    fence_address: str | None = None
    inventory_address: str | None = None


class VmInfo(NamedTuple):
    name: str
    alias: str | None
    host: str | None
    state: str
    cartel: int | None


class StatusResult(NamedTuple):
    daemon: DaemonInfo
    hosts: tuple[HostInfo, ...]
    vms: tuple[VmInfo, ...]


class VmState(NamedTuple):
    vm: str
    state: str
    host: str | None
    cartel: int | None


class FenceResult(NamedTuple):
    vm: str
    action: str
    outcome: str
    host: str | None
    cartel: int | None
    elapsed_ms: float | None
    joined: bool
    warning: str | None = None


def _get(obj: JsonObject, key: str, kind: type[_T], where: str) -> _T:
    value = obj.get(key)
    # bool is an int subclass; a JSON true is never a count or a time.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolViolation(f"{where}: {key!r} is {value!r}, expected {kind.__name__}")
    return value


def _str(obj: JsonObject, key: str, where: str) -> str:
    return _get(obj, key, str, where)


def _opt_str(obj: JsonObject, key: str, where: str) -> str | None:
    return None if obj.get(key) is None else _str(obj, key, where)


def _int(obj: JsonObject, key: str, where: str) -> int:
    return _get(obj, key, int, where)


def _opt_int(obj: JsonObject, key: str, where: str) -> int | None:
    return None if obj.get(key) is None else _int(obj, key, where)


def _num(obj: JsonObject, key: str, where: str) -> float:
    value = obj.get(key)
    # JSON's 1e400 parses as infinity: no time or count the daemon sends can be that.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProtocolViolation(f"{where}: {key!r} is {value!r}, expected a finite number")
    return float(value)


def _opt_num(obj: JsonObject, key: str, where: str) -> float | None:
    return None if obj.get(key) is None else _num(obj, key, where)


def _lane_address(host: JsonObject, lane: str) -> str | None:
    """`connected_address.<lane>`; absent from daemons older than fallback addresses."""
    if host.get("connected_address") is None:
        return None
    addresses: JsonObject = _get(host, "connected_address", dict, "status host")
    return _opt_str(addresses, lane, "status host connected_address")


def _objects(obj: JsonObject, key: str, where: str) -> list[JsonObject]:
    items: list[object] = _get(obj, key, list, where)
    objects = [item for item in items if isinstance(item, dict)]
    if len(objects) != len(items):
        raise ProtocolViolation(f"{where}: {key!r} holds a non-object")
    return objects


def _vm(obj: JsonObject, where: str) -> VmInfo:
    return VmInfo(
        name=_str(obj, "name", where),
        alias=_opt_str(obj, "alias", where),
        host=_opt_str(obj, "host", where),
        state=_str(obj, "state", where),
        cartel=_opt_int(obj, "cartel", where),
    )


def parse_status(result: JsonObject) -> StatusResult:
    daemon: JsonObject = _get(result, "daemon", dict, "status")
    hosts = tuple(
        HostInfo(
            name=_str(h, "name", "status host"),
            address=_str(h, "address", "status host"),
            port=_int(h, "port", "status host"),
            kind=_str(h, "kind", "status host"),
            state=_str(h, "state", "status host"),
            since=_opt_num(h, "since", "status host"),
            reason=_opt_str(h, "reason", "status host"),
            rtt_ms=_opt_num(h, "rtt_ms", "status host"),
            inventory_age_s=_opt_num(h, "inventory_age_s", "status host"),
            vm_count=_int(h, "vm_count", "status host"),
            fence_address=_lane_address(h, "fence"),
            inventory_address=_lane_address(h, "inventory"),
        )
        for h in _objects(result, "hosts", "status")
    )
    return StatusResult(
        daemon=DaemonInfo(
            version=_str(daemon, "version", "status daemon"),
            pid=_int(daemon, "pid", "status daemon"),
            uptime_s=_num(daemon, "uptime_s", "status daemon"),
        ),
        hosts=hosts,
        vms=tuple(_vm(v, "status vm") for v in _objects(result, "vms", "status")),
    )


def parse_list(result: JsonObject) -> tuple[VmInfo, ...]:
    return tuple(_vm(v, "list vm") for v in _objects(result, "vms", "list"))


def parse_vm_status(result: JsonObject) -> VmState:
    state = _str(result, "state", "vm_status")
    # The agent's exit code hangs on this value: anything but on/off is a broken reply.
    if state not in ("on", "off"):
        raise ProtocolViolation(f"vm_status: state {state!r} is neither 'on' nor 'off'")
    return VmState(
        vm=_str(result, "vm", "vm_status"),
        state=state,
        host=_opt_str(result, "host", "vm_status"),
        cartel=_opt_int(result, "cartel", "vm_status"),
    )


class ReloadResult(NamedTuple):
    changed: bool
    added: tuple[str, ...]
    removed: tuple[str, ...]
    replaced: tuple[str, ...]
    unchanged: tuple[str, ...]
    settings: tuple[str, ...]
    elapsed_ms: float | None


class HistoryEntry(NamedTuple):
    t: float
    vm: str
    target: str
    action: str
    result: str
    ok: bool
    host: str | None
    cartel: int | None
    reason: str | None
    joined: bool
    elapsed_ms: float | None
    total_ms: float | None
    peer_uid: int | None
    peer_pid: int | None


class HistoryResult(NamedTuple):
    entries: tuple[HistoryEntry, ...]
    skipped: int
    journal: str | None


def _names(obj: JsonObject, key: str, where: str) -> tuple[str, ...]:
    items: list[object] = _get(obj, key, list, where)
    if not all(isinstance(item, str) for item in items):
        raise ProtocolViolation(f"{where}: {key!r} holds a non-string")
    return tuple(str(item) for item in items)


def parse_reload(result: JsonObject) -> ReloadResult:
    return ReloadResult(
        changed=_get(result, "changed", bool, "reload"),
        added=_names(result, "added", "reload"),
        removed=_names(result, "removed", "reload"),
        replaced=_names(result, "replaced", "reload"),
        unchanged=_names(result, "unchanged", "reload"),
        settings=_names(result, "settings", "reload"),
        elapsed_ms=_opt_num(result, "elapsed_ms", "reload"),
    )


def _history_entry(obj: JsonObject) -> HistoryEntry:
    where = "history entry"
    peer = obj.get("peer")
    peer = peer if isinstance(peer, dict) else {}
    joined = obj.get("joined")
    return HistoryEntry(
        t=_num(obj, "t", where),
        vm=_str(obj, "vm", where),
        target=_str(obj, "target", where),
        action=_str(obj, "action", where),
        result=_str(obj, "result", where),
        ok=_get(obj, "ok", bool, where),
        host=_opt_str(obj, "host", where),
        cartel=_opt_int(obj, "cartel", where),
        reason=_opt_str(obj, "reason", where),
        joined=joined is True,
        elapsed_ms=_opt_num(obj, "elapsed_ms", where),
        total_ms=_opt_num(obj, "total_ms", where),
        peer_uid=_opt_int(peer, "uid", where),
        peer_pid=_opt_int(peer, "pid", where),
    )


def parse_history(result: JsonObject) -> HistoryResult:
    skipped = result.get("skipped")
    return HistoryResult(
        entries=tuple(_history_entry(e) for e in _objects(result, "entries", "history")),
        skipped=skipped if isinstance(skipped, int) and not isinstance(skipped, bool) else 0,
        journal=_opt_str(result, "journal", "history"),
    )


def parse_metrics(result: JsonObject) -> str:
    return _str(result, "text", "metrics")


def parse_fence(result: JsonObject) -> FenceResult:
    joined = result.get("joined")
    joined = False if joined is None else joined
    if not isinstance(joined, bool):
        raise ProtocolViolation(f"fence: 'joined' is {joined!r}, expected a boolean")
    return FenceResult(
        vm=_str(result, "vm", "fence"),
        action=_str(result, "action", "fence"),
        outcome=_str(result, "outcome", "fence"),
        host=_opt_str(result, "host", "fence"),
        cartel=_opt_int(result, "cartel", "fence"),
        elapsed_ms=_opt_num(result, "elapsed_ms", "fence"),
        joined=joined,
        warning=_opt_str(result, "warning", "fence"),
    )
