"""A real vmfenced process configured for a lab: config file, READY=1 wait, teardown by PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmflab.lab import Lab
from vmflab.lifecycle import Started


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(str(value), ensure_ascii=False)


def render_config(
    lab: Lab,
    socket_path: Path,
    *,
    aliases: Mapping[str, str] | None = None,
    hosts: list[str] | None = None,
    daemon: Mapping[str, Any] | None = None,
    ssh: Mapping[str, Any] | None = None,
    extra: str = "",
) -> str:
    """``extra``: TOML appended as is (hosts of kinds the lab has no host object for, such as
    a vcsim entry)."""
    daemon_keys = {
        "socket": str(socket_path),
        "socket_mode": "0660",
        "inventory_interval": 30,
        "fence_timeout": 5,
        # The fence journal of a lab daemon stays with the lab, never in /var/lib/vmfenced.
        "state_directory": str(socket_path.parent / "state"),
        **(daemon or {}),
    }
    ssh_keys = {
        "username": lab.username,
        "client_keys": [str(lab.client_key)],
        "known_hosts": str(lab.known_hosts),
        "connect_timeout": 3,
        "keepalive_interval": 1,
        "keepalive_count_max": 3,
        **(
            {"mode": "helper", "client_keys": [str(lab.helper_key)]} if lab.mode == "helper" else {}
        ),
        **(ssh or {}),
    }
    lines = ["[daemon]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in daemon_keys.items()]
    lines += ["", "[ssh]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in ssh_keys.items()]
    for name in hosts if hosts is not None else lab.host_names():
        host = lab.host(name)
        lines += ["", "[[hosts]]", f"name = {toml_value(name)}"]
        lines += [f"address = {toml_value(host.address)}", f"port = {host.port}"]
        lines += [f"kind = {toml_value(host.kind)}"]
        if host.username != lab.username:
            lines += [f"username = {toml_value(host.username)}"]
        fallbacks = getattr(host, "fallback_addresses", ())
        if fallbacks:
            lines += [f"fallback_addresses = {toml_value(list(fallbacks))}"]
    lines += ["", "[aliases]"]
    lines += [f"{toml_value(k)} = {toml_value(v)}" for k, v in (aliases or {}).items()]
    return "\n".join(lines) + "\n" + (f"\n{extra}\n" if extra else "")


class LabDaemon(Started):
    """`python -m vmfenced.daemon` against a lab; start() returns once it sent READY=1."""

    def __init__(self, lab: Lab, **config: Any) -> None:
        # Unix socket paths are limited to 108 bytes: keep them short, outside pytest's tmp tree.
        self.dir = Path(tempfile.mkdtemp(prefix="vmfd-", dir="/tmp"))
        self.socket = self.dir / "vmfenced.sock"
        self.config_path = self.dir / "vmfenced.toml"
        self.log_path = self.dir / "vmfenced.log"
        self.config_path.write_text(render_config(lab, self.socket, **config))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_level = "debug"  # set before start(): a benchmark logs as in production
        # time.perf_counter() at the spawn and at READY=1, for startup benchmarks.
        self.spawned_at: float | None = None
        self.ready_at: float | None = None

    def start(self, timeout: float = 30) -> LabDaemon:
        notify_path = self.dir / "notify.sock"
        notify_path.unlink(missing_ok=True)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        with self.log_path.open("ab") as log:
            self.spawned_at = time.perf_counter()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vmfenced.daemon",
                    "--config",
                    str(self.config_path),
                    "--log-format",
                    "json",
                    "--log-level",
                    self.log_level,
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"vmfenced sent no READY=1 in {timeout} s:\n{self.log()}")
                notify.settimeout(min(remaining, 0.5))
                try:
                    message = notify.recv(4096).decode()
                except TimeoutError:
                    if self.proc.poll() is not None:
                        raise RuntimeError(
                            f"vmfenced exited {self.proc.returncode}:\n{self.log()}"
                        ) from None
                    continue
                if "READY=1" in message.split("\n"):
                    self.ready_at = time.perf_counter()
                    return self
        except BaseException:
            self.kill()
            raise
        finally:
            notify.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def request(self, obj: Mapping[str, Any], timeout: float = 30) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.socket))
            sock.sendall(json.dumps(obj).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        reply: dict[str, Any] = json.loads(data)
        return reply

    def status(self) -> dict[str, Any]:
        reply = self.request({"op": "status"})
        assert reply["ok"], reply
        result: dict[str, Any] = reply["result"]
        return result

    def host_state(self, name: str) -> str:
        for host in self.status()["hosts"]:
            if host["name"] == name:
                return str(host["state"])
        raise KeyError(name)

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
