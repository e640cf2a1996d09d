"""Socket clients for the socket tests: crowds of connections held by a forked child as any
uid with any groups, and requests that wait while the daemon frees the slots of closed ones."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import resource
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from tests.integration.conftest import lab_unavailable
from tests.waiting import wait_for
from vmflab import Lab
from vmflab.daemon import LabDaemon

NOBODY = 65534
GROUP = "users"  # gid 100 on Debian, no members listed: only a process's own groups count
LONG_IDLE = {"client_idle_timeout": 600}  # these tests hold idle clients on purpose
STATUS = b'{"op":"status"}\n'


def lab_of_two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A started lab of esx1 and esx2, for a module-scoped fixture."""
    reason = lab_unavailable()
    if reason:
        pytest.fail(reason)
    with Lab(tmp_path_factory.mktemp("lab"), ("esx1", "esx2")) as started:
        yield started


def fork_child(body: Callable[[], None], tell: Callable[[BaseException], object]) -> int:
    """Forks a child that runs `body`, then _exits: 0 if it returned, 1 if it raised, after
    `tell` told the parent why (the parent fails with it). Returns the child's PID."""
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery, only raw calls, then _exit
        code = 1
        try:
            body()
            code = 0
        except BaseException as exc:  # reported to the parent, which fails with it
            tell(exc)
        finally:
            os._exit(code)
    return pid


def child_output(pid: int, read_end: int) -> bytes:
    """All that the child wrote to the pipe, once it exited 0; else fails with it."""
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    return data


def gid_of(name: str) -> int:
    group = grp.getgrnam(name)
    # Members listed in the group database are granted by name: only a group without any
    # shows that the process's own groups (SO_PEERGROUPS) are what the daemon reads.
    assert not group.gr_mem, f"group {name} lists members: {group.gr_mem}"
    return group.gr_gid


def connect(sock: socket.socket, path: str) -> None:
    """A full listen backlog answers EAGAIN: retry until the daemon accepts."""
    deadline = time.monotonic() + 20
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            select.select([], [], [], 0.01)


def _crowd_child(
    path: str, count: int, uid: int, groups: Sequence[int], *, out: int, hold: int
) -> None:
    """In the forked child: become `uid`, open `count` connections that each ask for status,
    report which were served, hold them until the parent closes `hold`."""
    if uid != 0:
        os.setgroups(list(groups))
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(uid, uid, uid)
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(20)
        socks.append(sock)
        connect(sock, path)
        # A refused connection is closed at accept: our request may then meet a closed peer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(STATUS)
    served, refused = 0, []
    for sock in socks:
        reply = json.loads(sock.makefile("rb").readline())
        if reply["ok"]:
            served += 1
        else:
            refused.append(reply["error"])
    os.write(out, json.dumps({"served": served, "refused": refused}).encode())
    os.close(out)
    os.read(hold, 1)  # returns when the parent closes its end (or dies)


@contextlib.contextmanager
def crowd(
    daemon: LabDaemon, count: int, uid: int = 0, groups: Sequence[int] = ()
) -> Iterator[dict[str, Any]]:
    """`count` connections of `uid` held open by a forked child while the block runs."""
    out_r, out_w = os.pipe()
    hold_r, hold_w = os.pipe()

    def child() -> None:
        os.close(out_r)
        os.close(hold_w)
        _crowd_child(str(daemon.socket), count, uid, groups, out=out_w, hold=hold_r)

    def tell(exc: BaseException) -> None:
        with contextlib.suppress(OSError):
            os.write(out_w, json.dumps({"child": repr(exc)}).encode())

    pid = fork_child(child, tell)
    os.close(out_w)
    os.close(hold_r)
    try:
        with os.fdopen(out_r, "rb") as reader:
            report: dict[str, Any] = json.loads(reader.read() or b'{"child": "no report"}')
        assert "child" not in report, report
        yield report
    finally:
        os.close(hold_w)
        if not wait_for(lambda: os.waitpid(pid, os.WNOHANG) != (0, 0), timeout=20):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def ask(daemon: LabDaemon, uid: int, groups: Sequence[int] = ()) -> dict[str, Any]:
    with crowd(daemon, 1, uid, groups) as report:
        if report["served"]:
            return {"ok": True}
        (error,) = report["refused"]
        return {"ok": False, "error": error}


def request(daemon: LabDaemon, obj: dict[str, Any]) -> dict[str, Any]:
    """`daemon.request`, again while every slot is taken: the daemon frees the slots of closed
    clients as it reads their EOFs, not at once."""
    deadline = time.monotonic() + 20
    while True:
        reply = daemon.request(obj)
        full = not reply["ok"] and reply["error"]["message"].startswith("too many clients")
        if not full or time.monotonic() > deadline:
            return reply
        time.sleep(0.05)  # polling a condition with a deadline, not a synchronisation sleep


def hosts(daemon: LabDaemon) -> list[str]:
    return [h["name"] for h in request(daemon, {"op": "status"})["result"]["hosts"]]


def limit_nofile(daemon: LabDaemon, nofile: int) -> None:
    """Lower the running daemon's RLIMIT_NOFILE, and reload so that it recomputes its limits."""
    assert daemon.proc is not None
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_NOFILE, (nofile, nofile))
    reply = request(daemon, {"op": "reload"})
    assert reply["ok"], reply


def open_socket_to_others(daemon: LabDaemon) -> None:
    daemon.dir.chmod(0o711)  # the lab's private directory, passable by other uids


def read_until_eof(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def ask_then_change_groups(daemon: LabDaemon, before: list[int], after: list[int]) -> Any:
    """A child of uid nobody connects with groups `before` and asks for status, then changes to
    `after` while the daemon is stopped (so the daemon looks at it only afterwards, as it would
    at a process that took the PID over). Returns the reply."""
    assert daemon.proc is not None
    ready_r, ready_w = os.pipe()
    out_r, out_w = os.pipe()

    def child() -> None:
        os.setgroups(before)
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, 0)  # root kept as saved uid, to change groups
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(20)
            sock.connect(str(daemon.socket))  # the kernel records the credentials now
            sock.sendall(STATUS)
            os.seteuid(0)
            os.setgroups(after)
            os.seteuid(NOBODY)
            os.write(ready_w, b"+")
            os.write(out_w, sock.makefile("rb").readline())

    def tell(exc: BaseException) -> None:
        with contextlib.suppress(OSError):
            os.write(ready_w, b"+")
            os.write(out_w, f"child: {exc!r}".encode())

    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        pid = fork_child(child, tell)
        os.close(ready_w)
        os.close(out_w)
        with os.fdopen(ready_r, "rb") as ready:
            ready.read(1)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    return json.loads(child_output(pid, out_r))
