"""What the lab's PID 1 asks of the kernel: mounts, processes in sessions of their own, chosen
PIDs (``ns_last_pid``), the host's sshd processes. Standard library only (see ``core``)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
# The environment of every process PID 1 starts: nothing of the lab's own leaks in.
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C", "HOME": "/root"}


class InitError(Exception):
    """A request the init cannot carry out; the text goes back to the requester."""


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


def spawn(
    argv: list[str], *, out_fd: int | None = None, err_fd: int | None = None, env: dict[str, str]
) -> int:
    """Starts ``argv`` (looked up in env's PATH) in a session of its own, stdin /dev/null,
    stdout on ``out_fd`` and stderr on ``err_fd`` (default: where stdout goes)."""
    null = os.open(os.devnull, os.O_RDWR)
    out = null if out_fd is None else out_fd
    try:
        return os.posix_spawnp(
            argv[0],
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, null, 0),
                (os.POSIX_SPAWN_DUP2, out, 1),
                (os.POSIX_SPAWN_DUP2, out if err_fd is None else err_fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(null)


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


def set_next_pid(text: str) -> int:
    """The next fork of this namespace gets PID ``text`` (unless another fork comes first)."""
    pid = check_free_pid(text)
    with open("/proc/sys/kernel/ns_last_pid", "w", encoding="ascii") as handle:
        handle.write(str(pid - 1))
    return pid


# sshd, and the per-session programs of OpenSSH >= 9.8.
SSHD_COMMS = frozenset({b"sshd", b"sshd-session", b"sshd-auth"})


def sshd_pids() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_bytes().removesuffix(b"\n")
        except OSError:
            continue
        if comm in SSHD_COMMS:
            found.append(int(entry.name))
    return found
