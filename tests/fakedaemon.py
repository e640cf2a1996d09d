"""A stand-in for vmfenced on a unix socket: canned replies per op, every request recorded.

Stdlib threads only. The script maps an op (or `fence:ACTION`, tried first for fences) to one
response or a list of them, used in turn, the last one repeating. Each connection gets its own
thread; `stop()` wakes every thread through a socketpair and joins them.

Also here: `imported_modules` / `assert_stdlib_only`, which check that a client process loads
nothing beyond the standard library.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmfenced.clients.ctl import run as ctl_run


@dataclass(frozen=True)
class Ok:
    result: dict[str, object]


@dataclass(frozen=True)
class Err:
    code: str
    message: str
    vm: str | None = None


@dataclass(frozen=True)
class Raw:
    """Bytes sent as they are instead of a reply."""

    data: bytes


@dataclass(frozen=True)
class Close:
    """Close the connection without replying."""


@dataclass(frozen=True)
class Hang:
    """Never reply (until the fake daemon stops)."""


Response = Ok | Err | Raw | Close | Hang
Script = Mapping[str, Response | Sequence[Response]]


class FakeDaemon:
    def __init__(self, path: Path, script: Script | None = None) -> None:
        # sun_path holds 107 bytes; pytest's tmp_path stays well under that.
        assert len(str(path)) < 100, path
        self.path = path
        self.requests: list[dict[str, object]] = []
        self.connections = 0
        self._script: dict[str, list[Response]] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        for key, responses in (script or {}).items():
            self.set(key, responses)

    def set(self, key: str, responses: Response | Sequence[Response]) -> None:
        listed = [responses] if isinstance(responses, Response) else list(responses)
        assert listed, "at least one response"
        with self._lock:
            self._script[key] = listed

    @property
    def fences(self) -> list[dict[str, object]]:
        return [r for r in self.requests if r.get("op") == "fence"]

    def start(self) -> FakeDaemon:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        listener.listen(16)
        self._listener = listener
        self._spawn(self._accept_loop, listener)
        return self

    def stop(self) -> None:
        self._wake_w.send(b"x")
        # The accept loop may spawn one last thread while we join: loop until none is left.
        while True:
            with self._lock:
                pending = [t for t in self._threads if t.is_alive()]
            if not pending:
                break
            for thread in pending:
                thread.join(timeout=10)
                assert not thread.is_alive(), "fake daemon thread did not stop"
        if self._listener is not None:
            self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> FakeDaemon:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()  # stops whether the block raised or not, and lets what it raised through

    def _spawn(self, target: Callable[[socket.socket], None], arg: socket.socket) -> None:
        thread = threading.Thread(target=target, args=(arg,), daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _woken(self, sock: socket.socket) -> bool:
        """Wait until `sock` is readable; True if stop() was called instead."""
        readable, _, _ = select.select([sock, self._wake_r], [], [])
        return self._wake_r in readable

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._woken(listener):
            conn, _ = listener.accept()
            with self._lock:
                self.connections += 1
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        # The client may give up first (a bounded reply, a timeout): not the fake's problem.
        with conn, contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._serve_lines(conn)

    def _serve_lines(self, conn: socket.socket) -> None:
        buffer = b""
        while True:
            while b"\n" not in buffer:
                if self._woken(conn):
                    return
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            line, _, buffer = buffer.partition(b"\n")
            if not self._answer(conn, line):
                return

    def _answer(self, conn: socket.socket, line: bytes) -> bool:
        try:
            request = json.loads(line)
        except ValueError:
            request = {"_raw": line.decode("utf-8", "replace")}
        if not isinstance(request, dict):
            request = {"_raw": request}
        with self._lock:
            self.requests.append(request)
        response = self._next(request)
        request_id = request.get("id")
        if isinstance(response, Ok):
            reply: dict[str, object] = {"id": request_id, "ok": True, "result": response.result}
        elif isinstance(response, Err):
            error: dict[str, object] = {"code": response.code, "message": response.message}
            if response.vm is not None:
                error["vm"] = response.vm
            reply = {"id": request_id, "ok": False, "error": error}
        elif isinstance(response, Raw):
            conn.sendall(response.data)
            return True
        elif isinstance(response, Close):
            return False
        else:
            self._woken(self._wake_r)
            return False
        conn.sendall(json.dumps(reply).encode() + b"\n")
        return True

    def _next(self, request: dict[str, object]) -> Response:
        op = str(request.get("op"))
        keys = [f"{op}:{request.get('action')}", op] if op == "fence" else [op]
        with self._lock:
            for key in keys:
                responses = self._script.get(key)
                if responses:
                    return responses.pop(0) if len(responses) > 1 else responses[0]
        return Err("internal", f"fake daemon has no reply for {op!r}")


# Canned results, shaped like docs/protocol.md's examples. Fresh dicts on every call.


def host(name: str, state: str = "up", **extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": name,
        "address": "192.0.2.11",
        "port": 22,
        "kind": "esxi",
        "state": state,
        "since": 1764000000.0,
        "reason": None if state == "up" else "connection refused",
        "lanes": {"fence": state, "inventory": state},
        "rtt_ms": 0.31 if state == "up" else None,
        "inventory_age_s": 4.2 if state == "up" else None,
        "vm_count": 2 if state == "up" else 0,
    }
    base.update(extra)
    return base


def vm(
    name: str, alias: str | None, host_name: str = "esx1", state: str = "on"
) -> dict[str, object]:
    return {
        "name": name,
        "alias": alias,
        "host": host_name,
        "state": state,
        "cartel": 68761 if state == "on" else None,
        "world": 68762 if state == "on" else None,
        "uuid": None,
        "config_file": f"/vmfs/volumes/ds1/{name}/{name}.vmx",
    }


def status_result(*hosts: dict[str, object]) -> dict[str, object]:
    return {
        "daemon": {"version": "0.1.0", "pid": 1234, "uptime_s": 12.5},
        "hosts": list(hosts) or [host("esx1"), host("esx2", "down")],
        "vms": [vm("gfs-node1", "node1"), vm("gfs-node2", None, "esx1", "off")],
    }


def list_result() -> dict[str, object]:
    return {
        "vms": [
            {"name": "gfs-node1", "alias": "node1", "host": "esx1", "state": "on"},
            {"name": "gfs-node2", "alias": None, "host": "esx1", "state": "off"},
            {"name": "gfs-node3", "alias": "node3", "host": "esx2", "state": "unknown"},
        ]
    }


def fence_result(
    action: str = "off", outcome: str = "killed", **extra: object
) -> dict[str, object]:
    base: dict[str, object] = {
        "vm": "gfs-node1",
        "action": action,
        "outcome": outcome,
        "host": "esx1",
        "cartel": 68761,
        "elapsed_ms": 1.9,
        "joined": False,
    }
    base.update(extra)
    return base


def vm_status_result(state: str = "on") -> dict[str, object]:
    return {"vm": "gfs-node1", "state": state, "host": "esx1", "cartel": 68761}


# The clients start as a new process on every call: they must import the standard library only.
# The import contracts (pyproject.toml) forbid the daemon and its dependencies statically; a
# running agent also shows a dependency nobody thought to forbid.

REPO = Path(__file__).resolve().parents[1]


def imported_modules(args: list[str], stdin: bytes = b"") -> tuple[int, str, set[str]]:
    """Run `python -X importtime ARGS`; return exit code, stderr and top-level modules."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        input=stdin,
        capture_output=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
        check=False,
    )
    stderr = proc.stderr.decode()
    names = {
        line.split("|")[-1].strip().split(".")[0]
        for line in stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return proc.returncode, stderr, names


def forbidden_packages() -> set[str]:
    """The third-party packages the clients' import contract forbids (pyproject.toml)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    (clients,) = [c for c in contracts if c["id"] == "clients"]
    return {name for name in clients["forbidden_modules"] if not name.startswith("vmfenced")}


def assert_stdlib_only(names: set[str]) -> None:
    assert "vmfenced" in names and "socket" in names
    # Never loaded, even where a .pth file or sitecustomize would load it for everyone.
    forbidden = forbidden_packages()
    assert "pydantic" in forbidden and not names & forbidden, sorted(names & forbidden)
    # Whatever site and .pth files load in a bare interpreter is not ours to judge; `org` is
    # copy.py's probe for Jython, which the import log lists although it fails.
    baseline = imported_modules(["-c", "pass"])[2]
    ours = names - baseline - {"vmfenced", "org"}
    assert ours <= set(sys.stdlib_module_names), sorted(ours - set(sys.stdlib_module_names))


# Five minutes after the canned hosts' `since`: vmfencectl's ages read the same in every run.
NOW = 1764000300.0


def run_ctl(daemon: FakeDaemon | None, *argv: str) -> tuple[int, str, str]:
    """vmfencectl in this process against `daemon` (or its default socket), at NOW."""
    out, err = io.StringIO(), io.StringIO()
    prefix = ["--socket", str(daemon.path)] if daemon is not None else []
    code = ctl_run([*prefix, *argv], out, err, clock=lambda: NOW)
    return code, out.getvalue(), err.getvalue()
