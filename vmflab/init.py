"""PID 1 of one lab ESXi host (stdlib only, run with ``python3 -I -S``).

Runs inside ``unshare --pid --fork --mount-proc --mount --propagation private``. It

* bind-mounts the host's directory on ``/vmfs`` (and, best effort, overlays ``/usr/lib`` so that
  ``/usr/lib/vmware/bin/vmdumper`` exists as on ESXi);
* reaps every orphan at once: a killed VM must vanish, not linger as a zombie the way it does
  under this machine's slow PID 1;
* starts and stops the host's sshd on request, relaying sshd's ``-e`` log to a file and telling
  the lab when sshd listens;
* sets ``ns_last_pid`` on request of the lab's shims (through the control FIFO), right before
  the fork that must get the PID (see ``LabHost.set_next_pid``).

Protocol on stdin/stdout, one line per request and one per reply:
``start-sshd`` -> ``ready`` | ``failed <status>`` | ``error <text>``;
``stop-sshd`` -> ``stopped`` | ``error <text>``; ``next-pid <N>`` (sets ns_last_pid = N - 1) and
``pid-free <N>`` (checks only) -> ``ok`` | ``error <text>``; ``ping`` -> ``pong``.
EOF on stdin (the lab went away) ends the init, and with it the namespace.
Control FIFO lines: ``nextpid <N> <reply fifo under the run dir>``; the reply is ``ok`` or
``error <text>``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import selectors
import signal
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

MS_BIND = 0x1000
MS_REC = 0x4000
SSHD = "/usr/sbin/sshd"
READY_MARK = "Server listening on"
STOP_DEADLINE_S = 10.0
MAX_LINE = 4096


class InitError(Exception):
    """A request the init cannot carry out; the text goes back to the requester."""


@dataclass
class Sshd:
    pid: int
    stderr_fd: int
    buffer: bytes = b""
    announced: bool = False


@dataclass
class State:
    args: argparse.Namespace
    log: TextIO
    selector: selectors.BaseSelector
    sshd: Sshd | None = None
    exits: dict[int, int] = field(default_factory=dict)
    stdin_buffer: bytes = b""
    ctl_buffer: bytes = b""
    stopping: bool = False


def log(state: State, text: str) -> None:
    state.log.write(f"{time.strftime('%H:%M:%S')} {text}\n")
    state.log.flush()


def reply(text: str) -> None:
    os.write(1, (text + "\n").encode())


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def reap(state: State) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        if state.sshd is not None and pid == state.sshd.pid:
            log(state, f"sshd {pid} exited with {code}")
            state.exits[pid] = code


def start_sshd(state: State) -> None:
    if state.sshd is not None and state.sshd.pid not in state.exits:
        raise InitError("sshd is already running")
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    null = os.open(os.devnull, os.O_RDWR)
    try:
        pid = os.posix_spawn(
            SSHD,
            [SSHD, "-D", "-e", "-f", state.args.sshd_config],
            {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"},
            file_actions=[
                (os.POSIX_SPAWN_DUP2, null, 0),
                (os.POSIX_SPAWN_DUP2, null, 1),
                (os.POSIX_SPAWN_DUP2, write_fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(write_fd)
        os.close(null)
    state.sshd = Sshd(pid=pid, stderr_fd=read_fd)
    state.selector.register(read_fd, selectors.EVENT_READ, state.sshd)
    log(state, f"sshd {pid} started")


def on_sshd_output(state: State, sshd: Sshd) -> None:
    try:
        chunk = os.read(sshd.stderr_fd, 65536)
    except BlockingIOError:
        return
    if chunk:
        sshd.buffer += chunk
        *lines, sshd.buffer = sshd.buffer.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            log(state, f"sshd: {line}")
            if not sshd.announced and READY_MARK in line:
                sshd.announced = True
                reply("ready")
        return
    # EOF: every sshd process holding the pipe is gone.
    state.selector.unregister(sshd.stderr_fd)
    os.close(sshd.stderr_fd)
    if not sshd.announced:
        sshd.announced = True
        deadline = time.monotonic() + 2.0
        while sshd.pid not in state.exits and time.monotonic() < deadline:
            reap(state)
            time.sleep(0.002)
        reply(f"failed {state.exits.get(sshd.pid, 'unknown')}")


def sshd_pids() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            continue
        if comm.startswith("sshd"):  # sshd, and sshd-session/sshd-auth of OpenSSH >= 9.8
            found.append(int(entry.name))
    return found


def stop_sshd(state: State) -> None:
    """SIGKILL every sshd of the host (listener and sessions) until none is left, even a zombie."""
    deadline = time.monotonic() + STOP_DEADLINE_S
    while True:
        pids = sshd_pids()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reap(state)
        if time.monotonic() > deadline:
            raise InitError(f"sshd processes survive SIGKILL: {pids}")
        time.sleep(0.001)


def check_free_pid(text: str) -> int:
    if not text.isdigit():
        raise InitError(f"not a PID: {text!r}")
    pid = int(text)
    with open("/proc/sys/kernel/pid_max", encoding="ascii") as handle:
        pid_max = int(handle.read())
    if not 2 <= pid < pid_max:
        raise InitError(f"PID {pid} outside 2..{pid_max - 1}")
    if Path(f"/proc/{pid}").exists():
        raise InitError(f"PID {pid} is in use")
    return pid


def set_next_pid(text: str) -> None:
    pid = check_free_pid(text)
    with open("/proc/sys/kernel/ns_last_pid", "w", encoding="ascii") as handle:
        handle.write(str(pid - 1))


def handle_request(state: State, line: str) -> None:
    words = line.split()
    try:
        match words:
            case ["start-sshd"]:
                start_sshd(state)  # replies once sshd listens or dies
            case ["stop-sshd"]:
                stop_sshd(state)
                reply("stopped")
            case ["next-pid", pid]:
                set_next_pid(pid)
                reply("ok")
            case ["pid-free", pid]:
                check_free_pid(pid)
                reply("ok")
            case ["ping"]:
                reply("pong")
            case _:
                raise InitError(f"unknown request {line!r}")
    except (InitError, OSError) as exc:
        log(state, f"request {line!r} failed: {exc}")
        reply(f"error {exc}")


def handle_ctl(state: State, line: str) -> None:
    words = line.split(" ")
    if len(words) != 3 or words[0] != "nextpid":
        log(state, f"bad control line {line!r}")
        return
    _, pid, reply_path = words
    run_dir = state.args.run_dir.rstrip("/") + "/"
    if not reply_path.startswith(run_dir) or "/../" in reply_path:
        log(state, f"control reply path outside {run_dir}: {reply_path!r}")
        return
    try:
        set_next_pid(pid)
        answer = "ok"
    except (InitError, OSError) as exc:
        answer = f"error {exc}"
    log(state, f"control nextpid {pid}: {answer}")
    try:
        if not stat.S_ISFIFO(os.lstat(reply_path).st_mode):
            return
        fd = os.open(reply_path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        log(state, f"control reply to {reply_path!r} failed: {exc}")
        return
    try:
        os.write(fd, (answer + "\n").encode())
    except OSError as exc:
        log(state, f"control reply to {reply_path!r} failed: {exc}")
    finally:
        os.close(fd)
    # Removed here: the requester must not fork between its request and its next fork.
    with contextlib.suppress(OSError):
        Path(reply_path).unlink()


def split_lines(buffer: bytes, chunk: bytes) -> tuple[list[str], bytes]:
    buffer += chunk
    *lines, rest = buffer.split(b"\n")
    if len(rest) > MAX_LINE:
        rest = b""
    return [raw.decode(errors="replace") for raw in lines], rest


def run(state: State, wakeup_fd: int, ctl_fd: int) -> None:
    while not state.stopping:
        for key, _ in state.selector.select():
            if key.data == "wakeup":
                try:
                    while os.read(wakeup_fd, 4096):
                        pass
                except BlockingIOError:
                    pass
                reap(state)
            elif key.data == "stdin":
                chunk = os.read(0, 65536)
                if not chunk:
                    log(state, "lab closed the control pipe: ending the host")
                    return
                lines, state.stdin_buffer = split_lines(state.stdin_buffer, chunk)
                for line in lines:
                    handle_request(state, line)
            elif key.data == "ctl":
                try:
                    chunk = os.read(ctl_fd, 65536)
                except BlockingIOError:
                    continue
                lines, state.ctl_buffer = split_lines(state.ctl_buffer, chunk)
                for line in lines:
                    handle_ctl(state, line)
            elif isinstance(key.data, Sshd):
                on_sshd_output(state, key.data)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vmflab-init")
    parser.add_argument("--vmfs", required=True, help="directory bind-mounted on /vmfs")
    parser.add_argument("--sshd-config", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--ctl", required=True, help="control FIFO (path inside the host)")
    parser.add_argument("--run-dir", required=True, help="run directory (path inside the host)")
    parser.add_argument("--usrlib-upper", help="overlay upper dir for /usr/lib (best effort)")
    parser.add_argument("--usrlib-work", help="overlay work dir for /usr/lib")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.getpid() != 1:
        print("vmflab init: must be PID 1 of its own PID namespace", file=sys.stderr)
        return 2
    with open(args.log, "a", encoding="utf-8") as log_file:
        selector = selectors.DefaultSelector()
        state = State(args=args, log=log_file, selector=selector)
        try:
            mount(args.vmfs, "/vmfs", None, MS_BIND | MS_REC, None)
        except OSError as exc:
            print(f"vmflab init: {exc}", file=sys.stderr)
            return 1
        if args.usrlib_upper and args.usrlib_work:
            options = f"lowerdir=/usr/lib,upperdir={args.usrlib_upper},workdir={args.usrlib_work}"
            try:
                mount("overlay", "/usr/lib", "overlay", 0, options)
            except OSError as exc:
                log(state, f"no /usr/lib/vmware ({exc}); the shims stay reachable by PATH")
        wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(wakeup_r, False)
        os.set_blocking(wakeup_w, False)
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)

        def stop(_signum: int, _frame: object) -> None:
            state.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        ctl_fd = os.open(args.ctl, os.O_RDWR | os.O_NONBLOCK)
        selector.register(wakeup_r, selectors.EVENT_READ, "wakeup")
        selector.register(0, selectors.EVENT_READ, "stdin")
        selector.register(ctl_fd, selectors.EVENT_READ, "ctl")
        log(state, "init up")
        reap(state)
        run(state, wakeup_r, ctl_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
