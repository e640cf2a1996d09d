"""Hypervisor backends: the shell commands a kind of host understands and parsers of their output.

A backend is pure: it builds command text and parses output text. Running commands belongs to
`link`, deciding what the answers mean for a fence belongs to `fence`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vmfenced.backends.text import split_lines
from vmfenced.config import HostConfig
from vmfenced.errors import ParseError
from vmfenced.model import HoldOff, KillOutcome, RegisteredVM, RunningVM

RunningParser = Callable[[str], tuple[RunningVM, ...]]


@dataclass(frozen=True)
class Listing:
    command: str
    parse: RunningParser


@dataclass(frozen=True)
class Backend:
    kind: str
    # Run once when a shell opens (PATH, locale, per-host settings): never on the fence path.
    session_setup: Callable[[HostConfig], str]
    # Running-VM listings, fastest first; the next is tried when one fails or cannot be parsed.
    listings: tuple[Listing, ...]
    registered_command: str
    parse_registered: Callable[[str], tuple[RegisteredVM, ...]]
    kill_command: Callable[[RunningVM, float], str]
    parse_kill: Callable[[str], KillOutcome]
    power_on_command: Callable[[RegisteredVM], str]
    # Seconds a slow power-on may take on top of the fence budget.
    power_on_timeout: float
    # Proxmox: after `off` (kill confirmed, or already off), the command that asks the VM's HA
    # stack to keep it stopped (argument: the VMID), and its parser; None for the other kinds.
    hold_off_command: Callable[[str], str] | None = None
    parse_hold_off: Callable[[str], HoldOff] | None = None


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
