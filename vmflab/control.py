"""The lab's errors and its line protocol with each host's init (see ``vmflab.pid1.core``)."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import threading
import time
from pathlib import Path


class LabError(Exception):
    """The lab could not do what was asked; ``host`` names the lab host concerned, if any."""

    def __init__(self, message: str, *, host: str | None = None) -> None:
        Exception.__init__(self, f"{host}: {message}" if host else message)
        self.message = message
        self.host = host


class SshCommandError(LabError, subprocess.CalledProcessError):
    """A command run with ``LabHost.ssh(check=True)`` exited non-zero (255: ssh itself failed)."""

    def __init__(
        self, *, host: str, command: str, returncode: int, stdout: str, stderr: str
    ) -> None:
        subprocess.CalledProcessError.__init__(self, returncode, command, stdout, stderr)
        LabError.__init__(
            self,
            f"ssh command {command!r} exited with {returncode}: {stderr.strip()[-2000:]}",
            host=host,
        )
        self.command = command

    def __str__(self) -> str:
        return LabError.__str__(self)


class InitControl:
    """Requests to a host's init over its stdin, replies read from its stdout (one line each)."""

    def __init__(self, proc: subprocess.Popen[bytes], *, host: str, err_file: Path) -> None:
        if proc.stdin is None or proc.stdout is None:
            raise LabError("init started without control pipes", host=host)
        self._stdin = proc.stdin
        self._stdout_fd = proc.stdout.fileno()
        self._stdout = proc.stdout
        self._host = host
        self._err_file = err_file
        self._buffer = b""
        self._lock = threading.Lock()

    def send(self, line: str) -> None:
        try:
            self._stdin.write(line.encode() + b"\n")
            self._stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise LabError(f"init is gone ({exc}){self._init_errors()}", host=self._host) from exc

    def read_reply(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError(f"init did not answer within {timeout} s", host=self._host)
            ready, _, _ = select.select([self._stdout_fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._stdout_fd, 4096)
            if not chunk:
                raise LabError(f"init exited{self._init_errors()}", host=self._host)
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode(errors="replace")

    def request(self, line: str, timeout: float) -> str:
        with self._lock:
            self.send(line)
            return self.read_reply(timeout)

    def close(self) -> None:
        for stream in (self._stdin, self._stdout):
            with contextlib.suppress(OSError):
                stream.close()

    def _init_errors(self) -> str:
        try:
            text = self._err_file.read_text(errors="replace").strip()
        except OSError:
            return ""
        return f": {text[-2000:]}" if text else ""
