"""The daemon's typed errors: each carries the data a caller needs to decide and to explain."""

from __future__ import annotations

from collections.abc import Sequence


class VmfencedError(Exception):
    """Base of every error the daemon raises on purpose."""


class ConfigError(VmfencedError):
    """A configuration that cannot be used; `problems` holds one line per fault, key first."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = tuple(problems)
        super().__init__(f"{source}: " + "; ".join(self.problems))


class StartupError(VmfencedError):
    """The daemon cannot start (socket in use, unreadable key...): one clear line."""


class LinkError(VmfencedError):
    """A command could not be run, or its answer not read, over a host's warm shell."""

    def __init__(self, host: str, lane: str, reason: str) -> None:
        self.host = host
        self.lane = lane
        self.reason = reason
        super().__init__(f"{host} ({lane} lane): {reason}")


class LinkDown(LinkError):
    """The lane is not connected: nothing was sent."""


class ListingDoubt(LinkError):
    """The host answered, but no listing of its running VMs could be read whole (a name no
    line can carry, a process that cannot be judged). Unlike a host that went silent, a host
    in doubt runs on: what it ran at its last readable listing says nothing of now."""


class CommandTimeout(LinkError):
    """The command was sent but its end marker did not come back in time.

    The command may still be running on the host: the lane is reset so that its late output
    can never be read as the answer to a later command.
    """


class ParseError(VmfencedError):
    """A hypervisor answered something the backend cannot make sense of."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"{what}: {reason}")


class UnknownVM(VmfencedError):
    def __init__(self, vm: str) -> None:
        self.vm = vm
        super().__init__(f"unknown VM {vm!r}: no alias names it and no host runs or registers it")


class FenceFailed(VmfencedError):
    """The action could not be confirmed. The VM may still be running."""

    def __init__(self, vm: str, reason: str, host: str | None = None) -> None:
        self.vm = vm
        self.reason = reason
        self.host = host
        super().__init__(f"{vm}: {reason}")
