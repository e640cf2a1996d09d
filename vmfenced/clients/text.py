"""Text from the daemon or a host, made safe for one line of a terminal or a log (stdlib only)."""

from __future__ import annotations


def printable(text: str) -> str:
    """Control and line-separator characters escaped (`\\x1b`, `\\x85`, `\\u2028`…): a VM or
    host name must never forge a line of a report, or move the cursor."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
