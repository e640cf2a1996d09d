"""Value records of the standard-library clients, and the typed results of the socket protocol.

`replies` parses the daemon's JSON into these; `fence_vmfenced` and `vmfencectl` read them.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing would cost every agent call its import time; only mypy needs it
    from typing import ClassVar, Final


class Record:
    """Base of an immutable value: its fields are its class's `__slots__`, in order.

    Not typing.NamedTuple: Pacemaker starts the agent as a new process for every fence and
    monitor, and importing typing plus building a NamedTuple class (an exec each) was a third
    of the agent's start-up. Fields are `Final`, so mypy keeps them read-only; equality and
    the hash follow the fields, as they did for the tuples. Subclass one level only.
    """

    __slots__ = ()
    # The field order (repr, equality); a subclass sets `__slots__ = _fields = (...)`.
    _fields: ClassVar[tuple[str, ...]] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record) or type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({fields})"


class DaemonInfo(Record):
    __slots__ = _fields = ("version", "pid", "uptime_s")

    def __init__(self, version: str, pid: int, uptime_s: float) -> None:
        self.version: Final = version
        self.pid: Final = pid
        self.uptime_s: Final = uptime_s


class HostInfo(Record):
    __slots__ = _fields = (
        "name",
        "address",
        "port",
        "kind",
        "state",
        "since",
        "reason",
        "rtt_ms",
        "inventory_age_s",
        "vm_count",
        "fence_address",
        "inventory_address",
        "listing_problem",
        "mode",
        "helper_version",
        "path",
        "warnings",
    )

    def __init__(
        self,
        *,
        name: str,
        address: str,
        port: int,
        kind: str,
        state: str,
        since: float | None,
        reason: str | None,
        rtt_ms: float | None,
        inventory_age_s: float | None,
        vm_count: int,
        fence_address: str | None = None,
        inventory_address: str | None = None,
        listing_problem: str | None = None,
        mode: str | None = None,
        helper_version: str | None = None,
        path: str | None = None,
        warnings: tuple[str, ...] = (),
    ) -> None:
        self.name: Final = name
        self.address: Final = address
        self.port: Final = port
        self.kind: Final = kind
        self.state: Final = state
        self.since: Final = since
        self.reason: Final = reason
        self.rtt_ms: Final = rtt_ms
        self.inventory_age_s: Final = inventory_age_s
        self.vm_count: Final = vm_count
        # Address the fence lane reaches now (a fallback when the primary is unreachable).
        self.fence_address: Final = fence_address
        self.inventory_address: Final = inventory_address
        # Why the host's process listing fails while its link is up (fences needing it fail).
        self.listing_problem: Final = listing_problem
        # "shell" or "helper" (None from daemons older than the helper), and the helper
        # version the host answered at its fence lane's connection.
        self.mode: Final = mode
        self.helper_version: Final = helper_version
        # vSphere: the way a fence of a VM on this host goes now ("ssh:HOST" or "api:ENTRY"),
        # and the session's warnings (TLS not verified); None/() for the SSH-only kinds.
        self.path: Final = path
        self.warnings: Final = warnings


class VmInfo(Record):
    __slots__ = _fields = ("name", "alias", "host", "state", "cartel")

    def __init__(
        self, name: str, alias: str | None, host: str | None, state: str, cartel: int | None
    ) -> None:
        self.name: Final = name
        self.alias: Final = alias
        self.host: Final = host
        self.state: Final = state
        self.cartel: Final = cartel


class JournalInfo(Record):
    """The fence journal's health: `ok`, or `failing` since `since` with `error`."""

    __slots__ = _fields = ("path", "state", "error", "since", "backlog", "backlog_max", "dropped")

    def __init__(
        self,
        *,
        path: str,
        state: str,
        error: str | None,
        since: float | None,
        backlog: int,
        backlog_max: int,
        dropped: int,
    ) -> None:
        self.path: Final = path
        self.state: Final = state
        self.error: Final = error
        self.since: Final = since  # Unix time of the first failed write
        self.backlog: Final = backlog  # records waiting in memory
        self.backlog_max: Final = backlog_max
        self.dropped: Final = dropped  # records lost to a full backlog since the daemon started


class MissingNode(Record):
    """A Proxmox node that owns VMs (`vms`: their VMIDs) but is not in the configuration."""

    __slots__ = _fields = ("node", "vms")

    def __init__(self, node: str, vms: tuple[str, ...]) -> None:
        self.node: Final = node
        self.vms: Final = vms


class StatusResult(Record):
    __slots__ = _fields = ("daemon", "hosts", "vms", "journal", "missing_nodes")

    def __init__(
        self,
        daemon: DaemonInfo,
        hosts: tuple[HostInfo, ...],
        vms: tuple[VmInfo, ...],
        journal: JournalInfo | None = None,  # None from daemons older than the backlog
        missing_nodes: tuple[MissingNode, ...] = (),  # () from daemons before Proxmox
    ) -> None:
        self.daemon: Final = daemon
        self.hosts: Final = hosts
        self.vms: Final = vms
        self.journal: Final = journal
        self.missing_nodes: Final = missing_nodes


class VmState(Record):
    __slots__ = _fields = ("vm", "state", "host", "cartel")

    def __init__(self, vm: str, state: str, host: str | None, cartel: int | None) -> None:
        self.vm: Final = vm
        self.state: Final = state
        self.host: Final = host
        self.cartel: Final = cartel


class FenceResult(Record):
    __slots__ = _fields = (
        "vm",
        "action",
        "outcome",
        "host",
        "cartel",
        "elapsed_ms",
        "joined",
        "warning",
        "journal_warning",
        "ha",
    )

    def __init__(
        self,
        *,
        vm: str,
        action: str,
        outcome: str,
        host: str | None,
        cartel: int | None,
        elapsed_ms: float | None,
        joined: bool,
        warning: str | None = None,
        journal_warning: str | None = None,
        ha: str | None = None,
    ) -> None:
        self.vm: Final = vm
        self.action: Final = action
        self.outcome: Final = outcome
        self.host: Final = host
        self.cartel: Final = cartel
        self.elapsed_ms: Final = elapsed_ms
        self.joined: Final = joined
        self.warning: Final = warning
        # The fence succeeded but its journal record is not on disk (yet): never a failure.
        self.journal_warning: Final = journal_warning
        # Proxmox: the HA stack's answer after `off` (docs/proxmox.md); None for other kinds.
        self.ha: Final = ha


class ReloadResult(Record):
    __slots__ = _fields = (
        "changed",
        "added",
        "removed",
        "replaced",
        "unchanged",
        "settings",
        "elapsed_ms",
    )

    def __init__(
        self,
        *,
        changed: bool,
        added: tuple[str, ...],
        removed: tuple[str, ...],
        replaced: tuple[str, ...],
        unchanged: tuple[str, ...],
        settings: tuple[str, ...],
        elapsed_ms: float | None,
    ) -> None:
        self.changed: Final = changed
        self.added: Final = added
        self.removed: Final = removed
        self.replaced: Final = replaced
        self.unchanged: Final = unchanged
        self.settings: Final = settings
        self.elapsed_ms: Final = elapsed_ms


class HistoryEntry(Record):
    __slots__ = _fields = (
        "t",
        "vm",
        "target",
        "action",
        "result",
        "ok",
        "host",
        "cartel",
        "reason",
        "joined",
        "elapsed_ms",
        "total_ms",
        "peer_uid",
        "peer_pid",
    )

    def __init__(
        self,
        *,
        t: float,
        vm: str,
        target: str,
        action: str,
        result: str,
        ok: bool,
        host: str | None,
        cartel: int | None,
        reason: str | None,
        joined: bool,
        elapsed_ms: float | None,
        total_ms: float | None,
        peer_uid: int | None,
        peer_pid: int | None,
    ) -> None:
        self.t: Final = t
        self.vm: Final = vm
        self.target: Final = target
        self.action: Final = action
        self.result: Final = result
        self.ok: Final = ok
        self.host: Final = host
        self.cartel: Final = cartel
        self.reason: Final = reason
        self.joined: Final = joined
        self.elapsed_ms: Final = elapsed_ms
        self.total_ms: Final = total_ms
        self.peer_uid: Final = peer_uid
        self.peer_pid: Final = peer_pid


class HistoryResult(Record):
    __slots__ = _fields = ("entries", "skipped", "journal", "journal_state")

    def __init__(
        self,
        entries: tuple[HistoryEntry, ...],
        skipped: int,
        journal: str | None,
        journal_state: JournalInfo | None = None,
    ) -> None:
        self.entries: Final = entries
        self.skipped: Final = skipped
        self.journal: Final = journal
        # The entries are what is on disk; this says what still waits in memory.
        self.journal_state: Final = journal_state
