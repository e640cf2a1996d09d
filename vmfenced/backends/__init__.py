"""Hypervisor backends: the shell commands a kind of host understands and parsers of their output.

A backend is pure: it builds command text and parses output text. Running commands belongs to
`link`, deciding what the answers mean for a fence belongs to `fence`.

Every host-side operation is one sh function taking validated positional arguments
(`ShFunction`): shell mode sends its definition and a call with quoted arguments; the
`vmfenced-host` helper (`backends.helper`) embeds the same definitions and calls them with the
arguments of a request. One text per operation, whichever way it reaches the host.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from vmfenced.backends.text import split_lines
from vmfenced.config import HostConfig
from vmfenced.errors import ParseError
from vmfenced.model import HoldOff, KillOutcome, RegisteredVM, RunningVM

RunningParser = Callable[[str], tuple[RunningVM, ...]]
# A positional argument: "num" a decimal number without leading zeros, "str" any text without
# control characters (a name, a path). The helper checks each against this grammar.
Param = Literal["num", "str"]
Arg = str | int


@dataclass(frozen=True)
class ShFunction:
    """One host-side operation: `body` defines the sh function `name` (and the private helpers
    it calls), which reads its arguments as "$1", "$2"... and never `exit`s: it runs in the
    lane's long-lived shell, or in the helper's."""

    name: str
    params: tuple[Param, ...]
    body: str

    def call(self, *args: Arg) -> str:
        """Shell mode: the definition, then one call with each argument quoted."""
        if len(args) != len(self.params):
            raise ValueError(f"{self.name} takes {len(self.params)} arguments, not {len(args)}")
        return f"{self.body}\n{self.name}" + "".join(f" {shlex.quote(str(a))}" for a in args)


@dataclass(frozen=True)
class Listing:
    function: ShFunction
    parse: RunningParser

    @property
    def command(self) -> str:
        return self.function.call()


@dataclass(frozen=True)
class Backend:
    kind: str
    # Run once when a shell opens (PATH, locale): never on the fence path. Given the host's
    # libvirt_uri (only libvirt hosts use it).
    setup: Callable[[str], str]
    # Running-VM listings, fastest first; the next is tried when one fails or cannot be parsed.
    listings: tuple[Listing, ...]
    registered: ShFunction
    parse_registered: Callable[[str], tuple[RegisteredVM, ...]]
    kill: ShFunction
    kill_args: Callable[[RunningVM, float], tuple[Arg, ...]]
    parse_kill: Callable[[str], KillOutcome]
    power_on: ShFunction
    power_on_args: Callable[[RegisteredVM], tuple[Arg, ...]]
    # Seconds a slow power-on may take on top of the fence budget.
    power_on_timeout: float
    # Proxmox: after `off` (kill confirmed, or already off), the operation that asks the VM's HA
    # stack to keep it stopped (argument: the VMID), and its parser; None for the other kinds.
    hold_off: ShFunction | None = None
    parse_hold_off: Callable[[str], HoldOff] | None = None
    # Shell mode's setup when it needs more of the host's entry than the libvirt URI (Proxmox:
    # the node name); the helper's setup stays `setup`, fixed when the program is printed.
    host_setup: Callable[[HostConfig], str] | None = None
    # Who a host of this kind is, as its helper answers `hello` and the daemon checks it: the
    # libvirt URI its setup fixes, the Proxmox node its setup reads from the hostname, or
    # nothing ("-").
    ident: Literal["libvirt-uri", "pve-node"] | None = None

    def session_setup(self, host: HostConfig) -> str:
        if self.host_setup is not None:
            return self.host_setup(host)
        return self.setup(host.libvirt_uri)

    def hold_off_command(self, vmid: str) -> str:
        if self.hold_off is None:
            raise ValueError(f"{self.kind} hosts have no HA hold-off")
        return self.hold_off.call(vmid)

    @property
    def registered_command(self) -> str:
        return self.registered.call()

    def kill_command(self, vm: RunningVM, budget: float) -> str:
        return self.kill.call(*self.kill_args(vm, budget))

    def power_on_command(self, vm: RegisteredVM) -> str:
        return self.power_on.call(*self.power_on_args(vm))


def parse_kill_marker(text: str) -> KillOutcome:
    """The guarded kill scripts end with one `vmf:<outcome>` line; anything else is an error.

    Lines end at "\n" only (as every host answer is read): a line holding another line or
    record separator is one line, never a marker of its own."""
    for line in reversed(split_lines(text)):
        if line.startswith("vmf:"):
            word = line[4:].strip()
            try:
                return KillOutcome(word)
            except ValueError:
                break
    raise ParseError("guarded kill", f"unexpected answer: {text.strip()[:300]!r}")
