"""PID 1 of one lab libvirt host (run as ``python3 -m vmflab.libvirt_init``).

Runs inside ``unshare --pid --fork --mount-proc --mount --propagation private``. It

* gives the host its own libvirt state: a tmpfs on ``/run/libvirt`` and bind mounts of the host's
  directories on ``/etc/libvirt``, ``/var/lib/libvirt``, ``/var/log/libvirt`` and
  ``/var/cache/libvirt`` (and of an empty file on root's ``~/.bashrc``);
  ``/var/cache/libvirt/qemu`` (the capabilities cache) is shared by every host, so only the first
  libvirtd ever started pays for the probe;
* starts ``virtlogd`` and ``libvirtd`` in the foreground as its children and reaps every orphan
  at once: a qemu killed with ``kill -9`` must vanish, as under systemd, not linger as a zombie;
* starts and stops the host's sshd on request (the ESXi lab init's code, ``vmflab.init``);
* spawns processes with a chosen PID (``ns_last_pid``), to reproduce PID reuse.

Protocol on stdin/stdout, one line each way: ``start-sshd`` -> ``ready`` | ``failed <status>``;
``stop-sshd`` -> ``stopped``; ``wait-libvirtd <seconds>`` -> ``ready <seconds since libvirtd
started>`` | ``error <text>``; ``spawn <pid|0> <JSON argv>`` -> ``ok <pid>``; ``pid-free <N>``
-> ``ok``; ``ping`` -> ``pong``; any failure -> ``error <text>``. EOF on stdin ends the host.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vmflab.init import (
    MS_BIND,
    MS_REC,
    InitError,
    Sshd,
    State,
    check_free_pid,
    log,
    mount,
    on_sshd_output,
    reply,
    split_lines,
    start_sshd,
    stop_sshd,
)

DAEMON_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C", "HOME": "/root"}
VIRSH_PROBE = ["virsh", "-c", "qemu:///system", "version"]
PROBE_INTERVAL_S = 0.05


@dataclass
class Probe:
    """A pending ``wait-libvirtd``: ``virsh version`` run again until it succeeds."""

    deadline: float
    pid: int | None = None
    status: int | None = None
    next_at: float = 0.0


@dataclass
class Daemons:
    log_fd: int
    pids: dict[str, int] = field(default_factory=dict)
    exits: dict[str, int] = field(default_factory=dict)
    started: float = 0.0
    probe: Probe | None = None


def setup_mounts(root: Path, caps: Path) -> None:
    Path("/run/libvirt").mkdir(mode=0o755, exist_ok=True)
    mount("tmpfs", "/run/libvirt", "tmpfs", 0, "mode=0755")
    for source, target in (
        (root / "etc", "/etc/libvirt"),
        (root / "lib", "/var/lib/libvirt"),
        (root / "log", "/var/log/libvirt"),
        (root / "cache", "/var/cache/libvirt"),
        (caps, "/var/cache/libvirt/qemu"),
    ):
        mount(str(source), target, None, MS_BIND | MS_REC, None)
    # bash runs root's ~/.bashrc for every ssh command: mask it (not /root, which may hold the
    # Python running this very init).
    if Path("/root/.bashrc").is_file():
        mount(str(root / "bashrc"), "/root/.bashrc", None, MS_BIND, None)


def spawn(argv: list[str], *, out_fd: int, env: dict[str, str]) -> int:
    null = os.open(os.devnull, os.O_RDWR)
    try:
        return os.posix_spawnp(
            argv[0],
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, null, 0),
                (os.POSIX_SPAWN_DUP2, out_fd, 1),
                (os.POSIX_SPAWN_DUP2, out_fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(null)


def start_daemons(daemons: Daemons) -> None:
    # Their default pid files are in /run itself, which every host shares.
    virtlogd = ["virtlogd", "--pid-file", "/run/libvirt/virtlogd.pid"]
    daemons.pids["virtlogd"] = spawn(virtlogd, out_fd=daemons.log_fd, env=DAEMON_ENV)
    daemons.started = time.monotonic()
    libvirtd = ["libvirtd", "--pid-file", "/run/libvirt/libvirtd.pid"]
    daemons.pids["libvirtd"] = spawn(libvirtd, out_fd=daemons.log_fd, env=DAEMON_ENV)


def reap(state: State, daemons: Daemons) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        probe = daemons.probe
        if probe is not None and pid == probe.pid:
            probe.status = code
            probe.next_at = time.monotonic() + PROBE_INTERVAL_S
        if state.sshd is not None and pid == state.sshd.pid:
            log(state, f"sshd {pid} exited with {code}")
            state.exits[pid] = code
        for name, daemon_pid in list(daemons.pids.items()):
            if daemon_pid == pid:
                log(state, f"{name} {pid} exited with {code}")
                daemons.exits[name] = code
                del daemons.pids[name]


def wait_libvirtd(daemons: Daemons, text: str) -> None:
    """Starts answering ``wait-libvirtd``; ``tick_probe`` replies later.

    Never blocking: libvirtd's capability probe waits for its probe qemu to be reaped, by us.
    """
    try:
        deadline = time.monotonic() + float(text)
    except ValueError:
        raise InitError(f"not a number of seconds: {text!r}") from None
    if daemons.probe is not None:
        raise InitError("already waiting for libvirtd")
    daemons.probe = Probe(deadline=deadline)


def tick_probe(state: State, daemons: Daemons) -> None:
    probe = daemons.probe
    if probe is None:
        return
    now = time.monotonic()
    if probe.pid is not None and probe.status is None:
        if now < probe.deadline:
            return  # virsh still waiting for libvirtd
        with contextlib.suppress(ProcessLookupError):
            os.kill(probe.pid, signal.SIGKILL)
    if probe.status == 0:
        daemons.probe = None
        reply(f"ready {now - daemons.started:.3f}")
        return
    if "libvirtd" in daemons.exits or now >= probe.deadline:
        daemons.probe = None
        why = f"exited with {daemons.exits['libvirtd']}" if "libvirtd" in daemons.exits else ""
        log(state, f"libvirtd not ready: {why or 'timeout'}")
        reply(f"error libvirtd {why or 'not answering in time'}")
        return
    if now >= probe.next_at:
        null = os.open(os.devnull, os.O_RDWR)
        try:
            probe.pid = spawn(VIRSH_PROBE, out_fd=null, env=DAEMON_ENV)
        finally:
            os.close(null)
        probe.status = None


def spawn_with_pid(state: State, daemons: Daemons, pid_text: str, argv_json: str) -> str:
    try:
        argv = json.loads(argv_json)
    except ValueError:
        raise InitError("argv is not JSON") from None
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        raise InitError("argv must be a non-empty JSON list of strings")
    wanted = int(pid_text) if pid_text.isdigit() else -1
    if wanted < 0:
        raise InitError(f"not a PID: {pid_text!r}")
    if wanted:
        check_free_pid(pid_text)
        with open("/proc/sys/kernel/ns_last_pid", "w", encoding="ascii") as handle:
            handle.write(str(wanted - 1))
    null = os.open(os.devnull, os.O_RDWR)
    try:
        pid = spawn(argv, out_fd=null, env=DAEMON_ENV)
    finally:
        os.close(null)
    if wanted and pid != wanted:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        reap(state, daemons)
        raise InitError(f"wanted PID {wanted}, got {pid} (another fork came first)")
    log(state, f"spawned {pid}: {argv!r}")
    return f"ok {pid}"


def handle_request(state: State, daemons: Daemons, line: str) -> None:
    words = line.split(" ", 2)
    try:
        match words:
            case ["start-sshd"]:
                start_sshd(state)  # replies once sshd listens or dies
            case ["stop-sshd"]:
                stop_sshd(state)
                reply("stopped")
            case ["wait-libvirtd", seconds]:
                wait_libvirtd(daemons, seconds)  # tick_probe replies
            case ["spawn", pid, argv]:
                reply(spawn_with_pid(state, daemons, pid, argv))
            case ["pid-free", pid]:
                check_free_pid(pid)
                reply("ok")
            case ["ping"]:
                reply("pong")
            case _:
                raise InitError(f"unknown request {line[:200]!r}")
    except (InitError, OSError) as exc:
        log(state, f"request {line[:200]!r} failed: {exc}")
        reply(f"error {exc}")


def run(state: State, daemons: Daemons, wakeup_fd: int) -> None:
    while not state.stopping:
        tick_probe(state, daemons)
        timeout = None if daemons.probe is None else PROBE_INTERVAL_S
        for key, _ in state.selector.select(timeout):
            if key.data == "wakeup":
                with contextlib.suppress(BlockingIOError):
                    while os.read(wakeup_fd, 4096):
                        pass
                reap(state, daemons)
            elif key.data == "stdin":
                chunk = os.read(0, 65536)
                if not chunk:
                    log(state, "lab closed the control pipe: ending the host")
                    return
                lines, state.stdin_buffer = split_lines(state.stdin_buffer, chunk)
                for line in lines:
                    handle_request(state, daemons, line)
            elif isinstance(key.data, Sshd):
                on_sshd_output(state, key.data)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vmflab-libvirt-init")
    parser.add_argument("--root", required=True, type=Path, help="the host's directory")
    parser.add_argument("--caps", required=True, type=Path, help="shared capabilities cache")
    parser.add_argument("--sshd-config", required=True)
    parser.add_argument("--log", required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.getpid() != 1:
        print("vmflab libvirt init: must be PID 1 of its own PID namespace", file=sys.stderr)
        return 2
    with open(args.log, "a", encoding="utf-8") as log_file:
        selector = selectors.DefaultSelector()
        state = State(args=args, log=log_file, selector=selector)
        try:
            setup_mounts(args.root, args.caps)
        except OSError as exc:
            print(f"vmflab libvirt init: {exc}", file=sys.stderr)
            return 1
        wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(wakeup_r, False)
        os.set_blocking(wakeup_w, False)
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)

        def stop(_signum: int, _frame: object) -> None:
            state.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        daemons = Daemons(log_fd=log_file.fileno())
        try:
            start_daemons(daemons)
        except OSError as exc:
            print(f"vmflab libvirt init: cannot start libvirt: {exc}", file=sys.stderr)
            return 1
        selector.register(wakeup_r, selectors.EVENT_READ, "wakeup")
        selector.register(0, selectors.EVENT_READ, "stdin")
        log(state, f"init up, daemons {daemons.pids}")
        run(state, daemons, wakeup_r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
