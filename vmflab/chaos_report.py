"""The fault generator's summary as markdown, and its own section of docs/faults.md.

The section sits between two markers; the scenario table that tests/faults/conftest.py writes
above it keeps the section when it rewrites the file, and this module replaces only the section.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from vmflab.oracle import Tally

BEGIN = "<!-- fault generator: begin (written by bench/faults.py) -->"
END = "<!-- fault generator: end -->"


def _table(title: str, counts: Counter[str]) -> list[str]:
    lines = [f"| {title} | count |", "| --- | ---: |"]
    lines += [f"| {_cell(key)} | {n} |" for key, n in sorted(counts.items())]
    return [*lines, f"| **total** | {sum(counts.values())} |", ""]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(tally: Tally, *, seed: int, seconds: float, hosts: str, command: str) -> str:
    """The summary: verdict first, then operations, replies, failures, skips, examples."""
    verdict = [
        "| check | count |",
        "| --- | ---: |",
        f"| false successes (`fence off` ok while the VM runs) | {tally.false_successes} |",
        f"| false OFF (`vm_status` off while the VM runs) | {tally.false_off} |",
        f"| collateral kills | {tally.collateral} |",
        f"| process instances started and checked | {tally.instances} |",
        f"| operations done | {sum(tally.ops.values())} |",
        f"| requests answered | {sum(tally.replies.values())} |",
        f"| seconds | {seconds:.1f} |",
        "",
    ]
    lines = [
        f"Seed {seed}: `{command}`; hosts: {hosts}.",
        "",
        *verdict,
        *(_table("false answers: situation", tally.findings) if tally.findings else []),
        *_table("operation", tally.ops),
        *_table("request: answer", tally.replies),
        *_table("failure: reason class (doubt fails: allowed)", tally.failures),
    ]
    if tally.hostile:
        lines += _table("hostile names started: separator + record shape", tally.hostile)
    if tally.skipped:
        lines += _table("skipped: why", tally.skipped)
    if tally.examples:
        lines += ["First findings:", ""]
        lines += [f"- `{_cell(e)}`" for e in tally.examples] + [""]
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    """Replaces the generator's section of ``path`` (appended if it has none yet)."""
    text = path.read_text() if path.exists() else ""
    section = f"{BEGIN}\n{body.rstrip()}\n{END}\n"
    head, begin, rest = text.partition(BEGIN)
    if begin:
        _, end, tail = rest.partition(END)
        text = head + section + (tail.lstrip("\n") if end else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def kept_section(path: Path) -> str:
    """The generator's section of ``path`` with its markers, "" if none (for conftest.py)."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    _, begin, rest = text.partition(BEGIN)
    body, end, _ = rest.partition(END)
    return f"{BEGIN}{body}{END}\n" if begin and end else ""
