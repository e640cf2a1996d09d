"""PID 1 of every lab host: what all kinds share (stdlib only; run by ``vmflab.nsproc``).

It runs inside ``unshare --pid --fork --mount-proc --mount --propagation private`` (plus
``--uts --net`` for cluster nodes) as ``python3 -I -S -c BOOT PACKAGE_PARENT MODULE:CLASS ARGS``:
``-I -S`` keep this machine's site-packages and the caller's environment out, so the program
imports only the standard library and its own modules. ``CLASS`` is the host kind's layer, an
``Init`` subclass (``vmflab.pid1.esxi``, ``vmflab.pid1.libvirt``, ``vmflab.cluster.pid1``).

The common part

* reaps every orphan at once: a killed VM must vanish, not linger as a zombie the way it does
  under this machine's slow PID 1;
* starts and stops the host's sshd on request, relaying sshd's ``-e`` log to the host log and
  telling the lab when sshd listens;
* spawns processes, with a chosen PID if asked (``ns_last_pid``), to reproduce PID reuse;
* ends on EOF of stdin (the lab went away), on SIGTERM/SIGINT, or when the kind says so, and
  with it the whole PID namespace.

Protocol on stdin/stdout, one line per request and one per reply: ``start-sshd`` -> ``ready`` |
``failed <status>``; ``stop-sshd`` -> ``stopped``; ``pid-free <N>`` -> ``ok``; ``spawn <pid|0>
<JSON argv>`` -> ``ok <pid>``; ``ping`` -> ``pong``; any failure -> ``error <text>``. A kind adds
its own verbs. A set-up failure is answered ``error <text>`` before the init exits.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import selectors
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TextIO

from vmflab.pid1.system import (
    ENV,
    InitError,
    check_free_pid,
    set_next_pid,
    spawn,
    sshd_pids,
)

SSHD = "/usr/sbin/sshd"
READY_MARK = "Server listening on"
STOP_DEADLINE_S = 10.0
MAX_LINE = 4096

# What the launcher runs with ``python3 -I -S -c``: the package's parent directory and the
# kind come as arguments, so that the command line holds no quotes.
BOOT = "import sys; sys.path.insert(0, sys.argv.pop(1)); from vmflab.pid1.core import boot; boot()"


class HostEnds(Exception):
    """The host must end now, whatever the init was doing; the text says why."""


def split_lines(buffer: bytes, chunk: bytes) -> tuple[list[str], bytes]:
    buffer += chunk
    *lines, rest = buffer.split(b"\n")
    if len(rest) > MAX_LINE:
        rest = b""
    return [raw.decode(errors="replace") for raw in lines], rest


def drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass


@dataclass
class Sshd:
    pid: int
    stderr_fd: int
    buffer: bytes = b""
    announced: bool = False


class Init:
    """PID 1 of a lab host; a kind subclasses it and overrides the hooks below."""

    ready_unasked: ClassVar[bool] = False  # True: says ``ready`` after set-up, unasked

    def __init__(self, args: argparse.Namespace, log_file: TextIO) -> None:
        self.args = args
        self._log = log_file
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, str] = {}  # PID -> name, of the children whose exit counts
        self.current: dict[str, int] = {}  # name -> PID of its latest start
        self.exits: dict[int, int] = {}
        self.stopping = False
        self._stdin_buffer = b""

    # --------------------------------------------------------------- kind hooks
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The kind's command-line options."""

    def set_up(self) -> None:
        """Mounts and daemons of the kind, before the first request."""

    def request(self, words: list[str]) -> bool:
        """Serves a request of the kind's own; False if it is none."""
        del words
        return False

    def on_exit(self, pid: int, code: int) -> None:
        """A child has been reaped."""

    def timeout(self) -> float | None:
        """How long the loop may wait without calling ``tick``."""
        return None

    def tick(self) -> None:
        """Called on every turn of the loop."""

    # ------------------------------------------------------------------- basics
    def log(self, text: str) -> None:
        self._log.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self._log.flush()

    @staticmethod
    def reply(text: str) -> None:
        os.write(1, (text.replace("\n", " ") + "\n").encode())

    def watch(self, fd: int, callback: Callable[[], str | None]) -> None:
        """``callback`` runs when ``fd`` is readable; a text it returns ends the host."""
        self.selector.register(fd, selectors.EVENT_READ, callback)

    def started(self, name: str, pid: int) -> None:
        # The lab reuses PIDs on purpose: an exit recorded for an earlier owner of this PID
        # is not this child's.
        self.exits.pop(pid, None)
        self.children[pid] = name
        self.current[name] = pid
        self.log(f"{name} {pid} started")

    def running(self, name: str) -> int | None:
        """PID of the last child called ``name``, if it has not exited."""
        pid = self.current.get(name)
        return pid if pid is not None and pid not in self.exits else None

    def exit_code(self, name: str) -> int | None:
        """Exit code of the last child called ``name``, if it has exited."""
        pid = self.current.get(name)
        return None if pid is None else self.exits.get(pid)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if pid in self.children:
                self.log(f"{self.children[pid]} {pid} exited with {code}")
                self.exits[pid] = code
            self.on_exit(pid, code)

    # --------------------------------------------------------------------- sshd
    def start_sshd(self) -> None:
        """Replies once sshd listens (``ready``) or has died (``failed <status>``)."""
        if self.args.sshd_config is None:
            raise InitError("this host has no sshd")
        if self.running("sshd") is not None:
            raise InitError("sshd is already running")
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        try:
            argv = [SSHD, "-D", "-e", "-f", self.args.sshd_config]
            pid = spawn(argv, err_fd=write_fd, env=ENV)
        finally:
            os.close(write_fd)
        sshd = Sshd(pid=pid, stderr_fd=read_fd)
        self.started("sshd", pid)
        self.watch(read_fd, lambda: self.on_sshd_output(sshd))

    def on_sshd_output(self, sshd: Sshd) -> None:
        try:
            chunk = os.read(sshd.stderr_fd, 65536)
        except BlockingIOError:
            return
        if chunk:
            sshd.buffer += chunk
            *lines, sshd.buffer = sshd.buffer.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                self.log(f"sshd: {line}")
                if not sshd.announced and READY_MARK in line:
                    sshd.announced = True
                    self.reply("ready")
            return
        # EOF: every sshd process holding the pipe is gone.
        self.selector.unregister(sshd.stderr_fd)
        os.close(sshd.stderr_fd)
        if not sshd.announced:
            sshd.announced = True
            deadline = time.monotonic() + 2.0
            while sshd.pid not in self.exits and time.monotonic() < deadline:
                self.reap()
                time.sleep(0.002)
            self.reply(f"failed {self.exits.get(sshd.pid, 'unknown')}")

    def stop_sshd(self) -> None:
        """SIGKILL every sshd of the host (listener and sessions) until none is left, even a
        zombie."""
        deadline = time.monotonic() + STOP_DEADLINE_S
        while True:
            pids = sshd_pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.reap()
            if time.monotonic() > deadline:
                raise InitError(f"sshd processes survive SIGKILL: {pids}")
            time.sleep(0.001)

    # ---------------------------------------------------------------- processes
    def spawn_with_pid(self, pid_text: str, argv_json: str) -> int:
        try:
            argv = json.loads(argv_json)
        except ValueError:
            raise InitError("argv is not JSON") from None
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise InitError("argv must be a non-empty JSON list of strings")
        wanted = set_next_pid(pid_text) if pid_text != "0" else 0
        pid = spawn(argv, env=ENV)
        if wanted and pid != wanted:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self.reap()
            raise InitError(f"wanted PID {wanted}, got {pid} (another fork came first)")
        self.log(f"spawned {pid}: {argv!r}")
        return pid

    # ----------------------------------------------------------------- requests
    def handle(self, line: str) -> None:
        words = line.split(" ", 2)
        try:
            if not self.request(words):
                match words:
                    case ["start-sshd"]:
                        self.start_sshd()  # replies once sshd listens or dies
                    case ["stop-sshd"]:
                        self.stop_sshd()
                        self.reply("stopped")
                    case ["pid-free", pid]:
                        check_free_pid(pid)
                        self.reply("ok")
                    case ["spawn", pid, argv]:
                        self.reply(f"ok {self.spawn_with_pid(pid, argv)}")
                    case ["ping"]:
                        self.reply("pong")
                    case _:
                        raise InitError(f"unknown request {line[:200]!r}")
        except (InitError, OSError) as exc:
            self.log(f"request {line[:200]!r} failed: {exc}")
            self.reply(f"error {exc}")

    def on_stdin(self) -> str | None:
        chunk = os.read(0, 65536)
        if not chunk:
            return "the lab closed the control pipe"
        lines, self._stdin_buffer = split_lines(self._stdin_buffer, chunk)
        for line in lines:
            self.handle(line)
        return None

    # --------------------------------------------------------------------- loop
    def catch_signals(self) -> None:
        """SIGCHLD wakes the loop up (to reap); SIGTERM and SIGINT end the host."""
        wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(wakeup_r, False)
        os.set_blocking(wakeup_w, False)
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)

        def stop(_signum: int, _frame: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

        def on_wakeup() -> None:
            drain(wakeup_r)
            self.reap()

        self.watch(wakeup_r, on_wakeup)

    def serve(self) -> str:
        """Serves until the host must end; returns why."""
        try:
            while not self.stopping:
                self.tick()
                for key, _ in self.selector.select(self.timeout()):
                    why = key.data()
                    if why is not None:
                        return str(why)
            return "stopped by a signal"
        except HostEnds as exc:
            return str(exc)


def main(kind: type[Init], argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"vmflab-init {kind.__name__}")
    parser.add_argument("--log", required=True, help="this init's log")
    parser.add_argument("--sshd-config", help="the host's sshd (none: no sshd verbs)")
    kind.add_arguments(parser)
    args = parser.parse_args(argv)
    if os.getpid() != 1:
        print("vmflab init: must be PID 1 of its own PID namespace", file=sys.stderr)
        return 2
    with open(args.log, "a", encoding="utf-8") as log_file:
        init = kind(args, log_file)
        init.catch_signals()
        try:
            init.set_up()
        except (InitError, OSError) as exc:
            init.log(f"set-up failed: {exc}")
            print(f"vmflab init: {exc}", file=sys.stderr)
            init.reply(f"error {exc}")
            return 1
        init.watch(0, init.on_stdin)
        init.log(f"init up ({kind.__name__})")
        if kind.ready_unasked:
            init.reply("ready")
        init.reap()
        why = init.serve()
        init.log(f"ending the host: {why}")
    # At once, without interpreter teardown: the kernel kills the rest of the namespace now.
    os._exit(0)


def boot() -> None:
    """Entry point of ``BOOT``: ``sys.argv[1]`` names the kind as ``module:Class``."""
    module, _, name = sys.argv.pop(1).partition(":")
    kind = getattr(importlib.import_module(module), name)
    sys.exit(main(kind, sys.argv[1:]))
