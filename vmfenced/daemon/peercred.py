"""Who is on the other end of a unix socket: the kernel's record of the peer's credentials.

Everything comes from the socket (SO_PEERCRED, SO_PEERGROUPS), captured by the kernel when the
peer called connect(); nothing from /proc/PID, where a PID may have been reused by then.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int
    # Supplementary groups, from the kernel's copy of the peer's credentials at connect();
    # None when they could not be read (a kernel before 4.13): then they grant nothing.
    groups: frozenset[int] | None = None


# SO_PEERGROUPS (Linux 4.13) is missing from Python's socket module: its number on Linux.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
NGROUPS_MAX = 65536
GID_SIZE = 4  # gid_t is an unsigned 32-bit integer on Linux
# CPython's getsockopt() refuses buffers over 1024 bytes (256 groups): beyond, libc directly.
_PY_GETSOCKOPT_MAX = 1024


def decode_groups(data: bytes) -> frozenset[int]:
    """SO_PEERGROUPS' buffer (native-order gid_t values) as a set; ValueError if torn."""
    if len(data) % GID_SIZE:
        raise ValueError(f"SO_PEERGROUPS gave {len(data)} bytes, not a whole number of gids")
    return frozenset(gid for (gid,) in struct.iter_unpack("=I", data))


def read_groups(getopt: Callable[[int], bytes], buflen: int = 256) -> frozenset[int]:
    """Call `getopt(buflen)` for SO_PEERGROUPS, with a larger buffer each time it says ERANGE."""
    while True:
        try:
            return decode_groups(getopt(buflen))
        except OSError as exc:
            if exc.errno != errno.ERANGE or buflen >= NGROUPS_MAX * GID_SIZE:
                raise
            buflen = min(buflen * 4, NGROUPS_MAX * GID_SIZE)


_libc = ctypes.CDLL(None, use_errno=True)


def _libc_getsockopt(fd: int, level: int, option: int, buflen: int) -> bytes:
    buffer = ctypes.create_string_buffer(buflen)
    size = ctypes.c_uint32(buflen)  # socklen_t
    if _libc.getsockopt(fd, level, option, buffer, ctypes.byref(size)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return buffer.raw[: size.value]


def peer_groups(sock: socket.socket) -> frozenset[int]:
    """The peer's supplementary groups as the kernel recorded them when it connected.

    Not /proc/PID/status: by the time it is read the PID may belong to another process."""

    def getopt(buflen: int) -> bytes:
        if buflen <= _PY_GETSOCKOPT_MAX:
            return sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, buflen)
        return _libc_getsockopt(sock.fileno(), socket.SOL_SOCKET, SO_PEERGROUPS, buflen)

    return read_groups(getopt)


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    try:
        groups: frozenset[int] | None = peer_groups(sock)
    except (OSError, ValueError):
        groups = None
    return Peer(pid, uid, gid, groups)
