"""The socket's pure parts: client limits from the descriptor budget, SO_PEERGROUPS decoding,
and the client_idle_timeout config key."""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Any

import pytest

from vmfenced.config import parse
from vmfenced.daemon import peercred
from vmfenced.daemon.clientlimits import (
    BASE_FDS,
    FDS_PER_HOST,
    MAX_CLIENTS,
    MIN_CLIENTS,
    ClientLimits,
    reserved_fds,
)
from vmfenced.daemon.peercred import decode_groups, peer_of, read_groups
from vmfenced.errors import ConfigError, StartupError

# -- client limits -----------------------------------------------------------------------------


def test_reserved_fds_grow_with_hosts() -> None:
    assert reserved_fds(0) == BASE_FDS
    # Two lanes per host, each with room for a reconnect beside the connection it replaces.
    assert FDS_PER_HOST >= 4
    assert reserved_fds(10) - reserved_fds(9) == FDS_PER_HOST


def test_clients_are_what_the_lanes_leave() -> None:
    limits = ClientLimits.compute(1024, reserved_fds(100))
    assert limits.clients == 1024 - BASE_FDS - 100 * FDS_PER_HOST
    assert limits.reserved + limits.clients == limits.nofile


def test_clients_never_exceed_max_clients() -> None:
    limits = ClientLimits.compute(65536, reserved_fds(2))
    assert limits.clients == MAX_CLIENTS


def test_one_uid_never_holds_every_slot_and_root_keeps_some() -> None:
    for nofile in (BASE_FDS + MIN_CLIENTS, 300, 1024, 65536):
        limits = ClientLimits.compute(nofile, BASE_FDS)
        assert 1 <= limits.per_uid < limits.clients
        assert 1 <= limits.kept < limits.clients
        # Other uids together leave `kept` slots to root; one uid leaves room to others too.
        assert limits.clients - limits.kept >= limits.per_uid


def test_too_few_descriptors_for_the_hosts_is_refused_precisely() -> None:
    with pytest.raises(StartupError) as info:
        ClientLimits.compute(1024, reserved_fds(250))
    message = str(info.value)
    assert "RLIMIT_NOFILE is 1024" in message
    assert f"minus {reserved_fds(250)} descriptors kept for the SSH lanes" in message
    assert f"fewer than {MIN_CLIENTS}" in message
    assert "LimitNOFILE=" in message


def test_the_smallest_budget_that_starts() -> None:
    assert ClientLimits.compute(BASE_FDS + MIN_CLIENTS, BASE_FDS).clients == MIN_CLIENTS
    with pytest.raises(StartupError):
        ClientLimits.compute(BASE_FDS + MIN_CLIENTS - 1, BASE_FDS)


# -- SO_PEERGROUPS -----------------------------------------------------------------------------


def gids(*values: int) -> bytes:
    return b"".join(struct.pack("=I", v) for v in values)


def test_decode_groups() -> None:
    assert decode_groups(b"") == frozenset()
    assert decode_groups(gids(0, 4, 27, 65534)) == {0, 4, 27, 65534}
    # gid_t is unsigned: the largest value is a gid, not -1.
    assert decode_groups(gids(0xFFFFFFFE)) == {0xFFFFFFFE}


@pytest.mark.parametrize("size", [1, 3, 5, 7])
def test_a_torn_buffer_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match=f"{size} bytes"):
        decode_groups(gids(1, 2)[:size])


def test_erange_retries_with_a_larger_buffer() -> None:
    many = list(range(1000, 1600))  # 2,400 bytes: past CPython's 1,024-byte getsockopt
    asked: list[int] = []

    def getopt(buflen: int) -> bytes:
        asked.append(buflen)
        if buflen < len(many) * 4:
            raise OSError(errno.ERANGE, os.strerror(errno.ERANGE))
        return gids(*many)

    assert read_groups(getopt) == frozenset(many)
    assert asked == [256, 1024, 4096]


def test_other_errors_are_not_retried() -> None:
    asked: list[int] = []

    def getopt(buflen: int) -> bytes:
        asked.append(buflen)
        raise OSError(errno.ENOPROTOOPT, os.strerror(errno.ENOPROTOOPT))

    with pytest.raises(OSError) as info:
        read_groups(getopt)
    assert info.value.errno == errno.ENOPROTOOPT
    assert asked == [256]


def test_erange_at_ngroups_max_gives_up() -> None:
    def getopt(buflen: int) -> bytes:
        raise OSError(errno.ERANGE, os.strerror(errno.ERANGE))

    with pytest.raises(OSError):
        read_groups(getopt, buflen=peercred.NGROUPS_MAX * peercred.GID_SIZE)


def test_peer_of_a_socketpair_is_this_process() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        peer = peer_of(left)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())
    # The kernel's copy of our supplementary groups, as getgroups(2) lists them.
    assert peer.groups == frozenset(os.getgroups())


def test_libc_path_reads_what_python_reads() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        via_python = left.getsockopt(socket.SOL_SOCKET, peercred.SO_PEERGROUPS, 1024)
        via_libc = peercred._libc_getsockopt(
            left.fileno(), socket.SOL_SOCKET, peercred.SO_PEERGROUPS, 8192
        )
    assert via_libc == via_python


# -- config ------------------------------------------------------------------------------------


def config(**daemon: Any) -> dict[str, Any]:
    return {"daemon": daemon, "hosts": [{"name": "esx1", "address": "192.0.2.11"}]}


def test_client_idle_timeout_default_and_value() -> None:
    assert parse(config()).daemon.client_idle_timeout == 10
    assert parse(config(client_idle_timeout=0.5)).daemon.client_idle_timeout == 0.5


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "daemon.client_idle_timeout: Input should be greater than or equal to 0.1"),
        (-5, "daemon.client_idle_timeout: Input should be greater than or equal to 0.1"),
        (7200, "daemon.client_idle_timeout: Input should be less than or equal to 3600"),
        ("soon", "daemon.client_idle_timeout: Input should be a valid number"),
    ],
)
def test_bad_client_idle_timeout_is_named(value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(config(client_idle_timeout=value))
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


# -- what the bundled client makes of a refusal ------------------------------------------------


def test_client_reads_the_refusal_of_a_daemon_that_closed_before_the_request() -> None:
    """The daemon refuses at accept and closes: the client's send then breaks, but the one
    line already sent is the answer (not `connection lost while sending: Broken pipe`)."""
    from vmfenced.clients.client import Client
    from vmfenced.clients.errors import DaemonError
    from vmfenced.protocol import reply_error

    ours, daemons = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    message = "too many clients of uid 1000: it has 256 connected, the limit per uid is 256"
    daemons.sendall(reply_error(None, "unavailable", message))
    daemons.close()
    client = Client("/nonexistent", timeout_s=5)
    client._sock = ours  # as if connected: the refusal came before our request
    with pytest.raises(DaemonError) as info:
        client.status()
    assert (info.value.code, info.value.message) == ("unavailable", message)
    assert client._sock is None  # that connection is over


def test_client_without_a_refusal_still_reports_the_broken_connection() -> None:
    from vmfenced.clients.client import Client
    from vmfenced.clients.errors import DaemonUnreachable

    ours, daemons = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    daemons.close()
    client = Client("/nonexistent", timeout_s=5)
    client._sock = ours
    with pytest.raises(DaemonUnreachable, match="connection lost while sending"):
        client.status()
