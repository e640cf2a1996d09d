"""Reading host output: lines split on "\\n" only, and names that cannot be trusted.

`str.splitlines()` also breaks on \\r, \\v, \\f, \\x1c-\\x1e, \\x85, U+2028 and U+2029, which a
host's tools treat as ordinary name characters: a VM name holding one of them, followed by text
shaped like a listing record, would be read as a second record. Hosts end lines with "\\n", so
that is the only separator; and a name holding any control or line-separator character is not
parsed into anything: it is a doubt for the host that listed it.
"""

from __future__ import annotations

import re

from vmfenced.errors import ParseError

# Exactly the Unicode categories Cc (C0, DEL, C1), Zl (U+2028) and Zp (U+2029), which are fixed
# sets; a test checks this class against unicodedata over every code point. A regular
# expression, because calling unicodedata.category per character made parsing a vmdumper
# listing of 87 VMs take 1.2 ms instead of 0.7 (every fence parses every host's listing).
_UNTRUSTED = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def split_lines(text: str) -> list[str]:
    """Lines of host output, split on "\\n" only (a final newline ends the last line)."""
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def untrusted_chars(name: str) -> list[str]:
    """The characters of `name` no listing can carry unambiguously: C0/C1 controls, DEL, and
    the Unicode line and paragraph separators (categories Cc, Zl, Zp)."""
    return _UNTRUSTED.findall(name)


def check_name(what: str, name: str) -> str:
    """`name` itself, or ParseError naming the command whose output held it."""
    bad = untrusted_chars(name)
    if bad:
        shown = ", ".join(sorted({f"U+{ord(c):04X}" for c in bad}))
        raise ParseError(
            what, f"a VM name holds control or line-separator characters ({shown}): {name!r:.200}"
        )
    return name
