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


TITLE = "## Fault generator: a seeded random schedule, checked against the hosts"
DESCRIPTION = """\
`vmflab.chaos` draws a schedule from `random.Random(seed)` and runs it against a real daemon on
the real-sshd lab, some hosts in the daemon's config and one of each kind outside it: VMs
started (also outside the config), killed out of band (SIGKILL), migrated (start on the target
then kill on the source, or the reverse: brief twins either way; to a configured host or one
outside the config; the source unregistered or not), twins on two hosts, two VMs of one display
name on one host, a dead VM's PID or cartel ID reused by another VM or by an unrelated process,
hostile names (quotes, `& ' " < >`, each of `\\r \\v \\f \\x1c-\\x1e \\x85 U+2028 U+2029`
followed by text shaped like a record of the listing the daemon parses, naming a real VM and its
process), frozen hosts (every process SIGSTOPped for 0.3-2.5 s), sshd killed and restarted
0.3-2 s later, and `fence off` and `vm_status` requests, alone or concurrent (one VM or many,
sometimes while a lab operation runs).

The oracle (`vmflab.oracle`) reads the truth from the kernel's process table of each host's PID
namespace, from outside the host (no ssh, no shim, no parser shared with the daemon; it answers
while a host is frozen). A process is its outer PID and start time, so a reused PID is never
taken for the process the schedule started. Rules, checked right after each reply:
- `fence off` answered `killed` or `already_off`: no process of that VM name whose start had
  returned before the request was sent still runs on any lab host, in the config or not; else a
  **false success**;
- `vm_status` answered `off`: same check; else a **false OFF**;
- a process that died although the schedule did not kill it and no fence of its name was in
  flight while it lived: a **collateral kill** (a process that took a reused PID carries a name
  no fence uses).

Failures (`fence_failed`, `unknown_vm`, `bad_request` for a name the protocol refuses) are
allowed: doubt fails. Operations the lab cannot do yet (names it refuses, no candidate at that
moment) are counted as skipped. The seed fixes the draws; what they apply to also depends on
what the daemon killed and on how the threads of a burst interleaved, so two runs of one seed
are alike, not identical. A false answer may be counted under several situations.
A short run of the same generator is part of the test suite (`tests/faults/test_generator.py`,
a fixed seed, 100 operations on ESXi hosts and 50 on libvirt ones), where each of the three
counts must be 0.
"""


# Answers that follow the evidence rules while a VM runs on a host outside the config.
BEYOND_TITLE = (
    "not counted: the rules' answer while the VM runs outside the config (docs/safety.md, "
    "Known limits)"
)


def _table(title: str, counts: Counter[str]) -> list[str]:
    lines = [f"| {title} | count |", "| --- | ---: |"]
    lines += [f"| {_cell(key)} | {n} |" for key, n in sorted(counts.items())]
    return [*lines, f"| **total** | {sum(counts.values())} |", ""]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(
    tally: Tally, *, seed: int, seconds: float, hosts: str, command: str, revision: str = ""
) -> str:
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
        f"Seed {seed}: `{command}`"
        + (f" at commit {revision}" if revision else "")
        + f"; hosts: {hosts}.",
        "",
        *verdict,
        *(_table("false answers: situation", tally.findings) if tally.findings else []),
        *(_table(BEYOND_TITLE, tally.beyond) if tally.beyond else []),
        *_table("operation", tally.ops),
        *_table("request: answer", tally.replies),
        *_table("failure: reason class (doubt fails: allowed)", tally.failures),
    ]
    if tally.hostile:
        title = "hostile names: started (separator + record shape), or refused (character)"
        lines += _table(title, tally.hostile)
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
