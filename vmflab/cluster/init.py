"""PID 1 of one cluster node "machine" (stdlib only, run with ``python3 -I -S``).

Runs inside ``unshare --pid --fork --mount-proc --mount --uts --net --propagation private``,
so the node has its own process tree, hostname, network stack, ``/run``, ``/dev/shm`` and
Pacemaker/Corosync state directories: corosync and pacemaker use fixed paths and abstract unix
sockets, one set per namespace. It

* is bound to the node's VM: it inherits a pidfd of the VM's process and exits the moment that
  process dies. The kernel then SIGKILLs every process of the PID namespace, so killing the VM
  is a power cut of the node (corosync, pacemaker and any fence agent running there die with it);
* mounts a tmpfs on ``/run`` and ``/dev/shm``, bind-mounts the node's directories on
  ``/var/lib/pacemaker``, ``/var/log/pacemaker``, ``/var/lib/corosync`` and ``/etc/corosync``,
  overlays ``/usr/sbin`` read-only with the node's extra fence agents (visible to this node
  only: the real ``/usr/sbin`` is never written), and makes a Python package directory
  readable by every user of the node (see ``--python-dir``);
* reaps every orphan at once (this machine's PID 1 is slow to);
* starts corosync, then pacemakerd once corosync answers, and stops them, on request.

Protocol on stdin/stdout, one line each: after set-up it writes ``ready`` (or ``error TEXT`` and
exits); ``start`` -> ``started`` | ``error TEXT`` (pacemakerd launched; the cluster join is
watched from outside); ``stop`` -> ``stopped`` | ``error TEXT``; ``ping`` -> ``pong``.
EOF on stdin (the harness went away) ends the init, and with it the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import select
import selectors
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
NODE_PYTHON_DIR = "/run/vmflab/python"  # cluster.config.NODE_PYTHON_DIR
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
COROSYNC_WAIT_S = 30.0
STOP_TIMEOUT_S = 30.0
MAX_LINE = 4096
# Runs as a child of the init: waits until corosync's configuration API answers, then becomes
# pacemakerd (which would otherwise give up on a corosync that is still starting).
PACEMAKER_BOOT = (
    "i=0; until corosync-cfgtool -s >/dev/null 2>&1; do "
    'i=$((i + 1)); if [ "$i" -gt {tries} ]; then echo "corosync never answered" >&2; exit 69; fi; '
    "sleep 0.1; done; exec pacemakerd"
)


class InitError(Exception):
    """A request the init cannot carry out; the text goes back to the harness."""


class PowerCut(Exception):
    """The VM's process died: the machine must end now, whatever it was doing."""


@dataclass
class State:
    args: argparse.Namespace
    log: TextIO
    children: dict[str, int] = field(default_factory=dict)
    exits: dict[int, int] = field(default_factory=dict)
    stdin_buffer: bytes = b""


def log(state: State, text: str) -> None:
    state.log.write(f"{time.strftime('%H:%M:%S')} {text}\n")
    state.log.flush()


def reply(text: str) -> None:
    os.write(1, (text.replace("\n", " ") + "\n").encode())


def libc_call(name: str, *args: object) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}{args!r}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    libc_call(
        "mount",
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )


def set_up(args: argparse.Namespace) -> None:
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for source, target in (
        (args.lib_dir, "/var/lib/pacemaker"),
        (args.log_dir, "/var/log/pacemaker"),
        (args.corosync_lib, "/var/lib/corosync"),
        (args.corosync_etc, "/etc/corosync"),
    ):
        mount(source, target, None, MS_BIND, None)
    # Read-only overlay (no upper dir): the node's agents on top of the real /usr/sbin.
    mount("overlay", "/usr/sbin", "overlay", MS_RDONLY, f"lowerdir={args.sbin_dir}:/usr/sbin")
    if args.python_dir:
        # Pacemaker's controller runs agents as hacluster (for their metadata): a bind mount
        # lets that user import the agent's package even under a directory it cannot enter.
        Path(NODE_PYTHON_DIR).mkdir(mode=0o755, parents=True)
        mount(args.python_dir, NODE_PYTHON_DIR, None, MS_BIND, None)
        mount("none", NODE_PYTHON_DIR, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)
    name = args.hostname.encode()
    libc_call("sethostname", name, ctypes.c_size_t(len(name)))
    run_quiet(["ip", "link", "set", "lo", "up"])


def run_quiet(argv: list[str]) -> None:
    pid = spawn(argv, None)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise InitError(f"{' '.join(argv)} exited with {os.waitstatus_to_exitcode(status)}")


def spawn(argv: list[str], log_path: str | None, env: dict[str, str] | None = None) -> int:
    out = os.open(log_path or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        return os.posix_spawnp(
            argv[0],
            argv,
            {"PATH": PATH, "LANG": "C", **(env or {})},
            file_actions=[
                (os.POSIX_SPAWN_DUP2, null, 0),
                (os.POSIX_SPAWN_DUP2, out, 1),
                (os.POSIX_SPAWN_DUP2, out, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(out)
        os.close(null)


def reap(state: State) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        for name, child in state.children.items():
            if child == pid:
                code = os.waitstatus_to_exitcode(status)
                log(state, f"{name} {pid} exited with {code}")
                state.exits[pid] = code


def running(state: State, name: str) -> bool:
    pid = state.children.get(name)
    return pid is not None and pid not in state.exits


def start(state: State) -> None:
    if running(state, "corosync") or running(state, "pacemakerd"):
        raise InitError("the cluster stack is already running")
    state.children["corosync"] = spawn(["corosync", "-f"], state.args.stack_log)
    tries = int(COROSYNC_WAIT_S / 0.1)
    env = {
        "PCMK_logfile": "/var/log/pacemaker/pacemaker.log",
        "PCMK_logfacility": "none",
        "HOME": "/var/lib/pacemaker",
    }
    state.children["pacemakerd"] = spawn(
        ["sh", "-c", PACEMAKER_BOOT.format(tries=tries)], state.args.stack_log, env
    )
    log(state, f"started corosync {state.children['corosync']}, pacemakerd boot")


def stop_child(state: State, name: str, deadline: float) -> None:
    pid = state.children.get(name)
    if pid is None or pid in state.exits:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    while pid not in state.exits:
        reap(state)
        if time.monotonic() > deadline:
            raise InitError(f"{name} {pid} did not stop within {STOP_TIMEOUT_S} s")
        # Waits on the VM meanwhile: a stop never delays a power cut.
        if select.select([state.args.vm_pidfd], [], [], 0.01)[0]:
            raise PowerCut


def stop(state: State) -> None:
    """pacemakerd stops its daemons and leaves the cluster cleanly, then corosync stops."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    stop_child(state, "pacemakerd", deadline)
    stop_child(state, "corosync", deadline)


def handle_request(state: State, line: str) -> None:
    try:
        match line.split():
            case ["start"]:
                start(state)
                reply("started")
            case ["stop"]:
                stop(state)
                reply("stopped")
            case ["ping"]:
                reply("pong")
            case _:
                raise InitError(f"unknown request {line!r}")
    except (InitError, OSError) as exc:
        log(state, f"request {line!r} failed: {exc}")
        reply(f"error {exc}")


def run(state: State, selector: selectors.BaseSelector, wakeup_fd: int) -> str:
    """Serves until the VM dies or the harness goes away; returns why it ended."""
    try:
        return serve(state, selector, wakeup_fd)
    except PowerCut:
        return "the VM's process died during a request: power cut"


def serve(state: State, selector: selectors.BaseSelector, wakeup_fd: int) -> str:
    while True:
        for key, _ in selector.select():
            if key.data == "vm":
                return "the VM's process is gone: power cut"
            if key.data == "wakeup":
                with contextlib.suppress(BlockingIOError):
                    while os.read(wakeup_fd, 4096):
                        pass
                reap(state)
            elif key.data == "stdin":
                chunk = os.read(0, 65536)
                if not chunk:
                    return "the harness closed the control pipe"
                state.stdin_buffer += chunk
                *lines, state.stdin_buffer = state.stdin_buffer.split(b"\n")
                if len(state.stdin_buffer) > MAX_LINE:
                    state.stdin_buffer = b""
                for raw in lines:
                    handle_request(state, raw.decode(errors="replace"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vmflab-cluster-init")
    parser.add_argument("--hostname", required=True)
    parser.add_argument("--vm-pidfd", type=int, required=True, help="pidfd of the VM's process")
    parser.add_argument("--lib-dir", required=True, help="bind-mounted on /var/lib/pacemaker")
    parser.add_argument("--log-dir", required=True, help="bind-mounted on /var/log/pacemaker")
    parser.add_argument("--corosync-lib", required=True, help="bind-mounted on /var/lib/corosync")
    parser.add_argument("--corosync-etc", required=True, help="bind-mounted on /etc/corosync")
    parser.add_argument("--sbin-dir", required=True, help="overlaid on /usr/sbin")
    parser.add_argument("--python-dir", help=f"bind-mounted read-only on {NODE_PYTHON_DIR}")
    parser.add_argument("--log", required=True, help="this init's log")
    parser.add_argument("--stack-log", required=True, help="corosync/pacemakerd stdout+stderr")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.getpid() != 1:
        print("vmflab cluster init: must be PID 1 of its own PID namespace", file=sys.stderr)
        return 2
    with open(args.log, "a", encoding="utf-8") as log_file:
        state = State(args=args, log=log_file)
        selector = selectors.DefaultSelector()
        # Registered first: a VM that died during set-up must stop the boot.
        selector.register(args.vm_pidfd, selectors.EVENT_READ, "vm")
        wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(wakeup_r, False)
        os.set_blocking(wakeup_w, False)
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
        try:
            set_up(args)
        except (OSError, InitError) as exc:
            log(state, f"set-up failed: {exc}")
            reply(f"error {exc}")
            return 1
        selector.register(wakeup_r, selectors.EVENT_READ, "wakeup")
        selector.register(0, selectors.EVENT_READ, "stdin")
        log(state, f"init up as {args.hostname}")
        reply("ready")
        reap(state)
        why = run(state, selector, wakeup_r)
        log(state, f"ending the machine: {why}")
    # At once, without interpreter teardown: the kernel kills the rest of the namespace now.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
