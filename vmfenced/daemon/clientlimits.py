"""How many socket clients the daemon serves at once, from its file descriptor budget.

Every client holds one descriptor, and so does every SSH lane: the clients get RLIMIT_NOFILE
minus what the lanes and the rest of the daemon need, so no number of idle or hostile clients
can keep a lane from reconnecting.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from vmfenced.errors import StartupError

# Clients served at once, whatever RLIMIT_NOFILE allows: keeps the daemon's memory bounded.
MAX_CLIENTS = 1024
# Below this many client slots the daemon refuses to start (or a reload is refused): the
# fence agent, vmfencectl and the watchdog's own probe must always fit.
MIN_CLIENTS = 16
# Descriptors the daemon needs besides clients and lanes: stdio, the listening socket, the
# event loop's epoll and wake-up fds, the journal (two while it rotates), the notify socket,
# the metrics listener and its clients (metrics.MAX_HTTP_CLIENTS), and what the thread pool
# opens for a moment (getaddrinfo's resolver sockets, key, known_hosts and NSS files).
BASE_FDS = 128
# Two lanes per host, each with its live connection and one more while a reconnect (or the
# next fallback address) is opened before the dropped one is closed.
FDS_PER_HOST = 4


def reserved_fds(hosts: int) -> int:
    """Descriptors kept out of the clients' reach for `hosts` configured hosts."""
    return BASE_FDS + hosts * FDS_PER_HOST


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """How many clients the socket serves at once, and how the slots are shared."""

    nofile: int  # RLIMIT_NOFILE (soft) when computed
    reserved: int  # descriptors kept for the lanes, the journal, metrics...
    clients: int  # all clients together
    per_uid: int  # one uid other than root and the daemon's own
    kept: int  # slots only root and the daemon's own uid may use

    @classmethod
    def compute(cls, nofile: int, reserved: int) -> ClientLimits:
        clients = min(MAX_CLIENTS, nofile - reserved)
        if clients < MIN_CLIENTS:
            raise StartupError(
                f"RLIMIT_NOFILE is {nofile}: minus {reserved} descriptors kept for the SSH lanes "
                f"({FDS_PER_HOST} per host), the journal and metrics, that leaves {clients} for "
                f"socket clients, fewer than {MIN_CLIENTS}; raise LimitNOFILE= in the unit "
                "(or ulimit -n)"
            )
        # A quarter for root (the fence agent runs as root), and no other uid more than that.
        share = max(1, clients // 4)
        return cls(nofile, reserved, clients, share, share)


def nofile_for(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE toward `wanted` (never past the hard limit); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted or (hard != resource.RLIM_INFINITY and soft >= hard):
        return soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft  # a seccomp filter may refuse (the unit sets the limit instead)
    return target
