"""`vmfencectl`: look at and drive the vmfenced daemon from a shell.

    vmfencectl [--socket PATH] [--timeout S] status [--json]
    vmfencectl [--socket PATH] list [--json]
    vmfencectl [--socket PATH] vm-status VM [--json]
    vmfencectl [--socket PATH] fence VM [--action off|on|reboot] [--json]
    vmfencectl [--socket PATH] reload [--json]
    vmfencectl [--socket PATH] history [--vm VM] [--since T] [--limit N] [--json]
    vmfencectl [--socket PATH] metrics

Exit status: 0 success, 1 the daemon failed or could not be reached, 2 usage error.
Standard library only, like the fence agent: it starts as a new process on every call.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from datetime import UTC, datetime

from vmfenced import __version__
from vmfenced.clients import hosthelper, replies
from vmfenced.clients.client import (
    DEFAULT_SOCKET,
    FENCE_ACTIONS,
    Client,
    ClientError,
    DaemonError,
    HostInfo,
    JsonObject,
    vm_name_problem,
)
from vmfenced.clients.ctl_proxmox import render_missing_nodes
from vmfenced.clients.ctl_vsphere import fence_paths, render_warnings
from vmfenced.clients.process import exit_with
from vmfenced.clients.records import JournalInfo
from vmfenced.clients.text import printable
from vmfenced.wire import MAX_HISTORY

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing would cost every vmfencectl call its import time; only mypy needs it
    from collections.abc import Callable, Sequence
    from typing import NoReturn, TextIO

    Clock = Callable[[], float]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_TIMEOUT_S = 30.0
# A reload waits for fences in flight and for new hosts' first connection.
RELOAD_TIMEOUT_S = 120.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")


class UsageError(Exception):
    """Bad arguments: exit status 2, nothing sent."""


class _Exit(Exception):
    """argparse finished early (--help, --version) with this status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    # argparse prints and exits; raising instead keeps `run` free of exits.
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self._print_message(message, sys.stderr)
        raise _Exit(status)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vmfencectl", description="Query and drive the vmfenced daemon.")
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help=f"default {DEFAULT_SOCKET}")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"seconds to wait for each reply (default {DEFAULT_TIMEOUT_S:g}, "
        f"reload {RELOAD_TIMEOUT_S:g})",
    )
    parser.add_argument("--version", action="version", version=f"vmfencectl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the daemon's result as JSON")
    sub.add_parser("status", parents=[common], help="hosts and VMs as the daemon sees them")
    sub.add_parser("list", parents=[common], help="every known VM with its alias and state")
    vm_status = sub.add_parser("vm-status", parents=[common], help="ask the hosts live")
    vm_status.add_argument("vm", metavar="VM")
    fence = sub.add_parser("fence", parents=[common], help="fence a VM")
    fence.add_argument("vm", metavar="VM")
    fence.add_argument("--action", choices=FENCE_ACTIONS, default="off")
    sub.add_parser(
        "reload", parents=[common], help="re-read the config file (like systemctl reload)"
    )
    history = sub.add_parser("history", parents=[common], help="fences from the journal")
    history.add_argument("--vm", metavar="VM", help="only this VM (alias or VM name)")
    history.add_argument(
        "--since",
        metavar="T",
        help="only from T on: 2025-11-24T16:00:00Z, 2025-11-24, a Unix time, or an age: 90s, "
        "15m, 2h, 3d, 1w",
    )
    history.add_argument(
        "--limit", type=int, default=100, help="at most this many, the newest (default 100)"
    )
    sub.add_parser("metrics", help="the Prometheus metrics, as text")
    hosthelper.add_parser(sub)
    return parser


def parse_since(text: str, now: float) -> float:
    """--since as a Unix time: ISO 8601 (naive = local time), a Unix time, or an age like 2h."""
    value = text.strip()
    relative = _RELATIVE.match(value)
    if relative:
        return now - float(relative.group(1)) * _UNITS[relative.group(2)]
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if math.isfinite(number):
            return number
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise UsageError(
            f"--since {value!r}: expected a date/time like 2025-11-24T16:00:00Z, "
            "a Unix time, or an age like 90s, 15m, 2h, 3d, 1w"
        ) from None


def _clean(text: object) -> str:
    """A table cell: control characters escaped so one VM name cannot forge lines."""
    return printable("-" if text is None else str(text)) or "-"


def format_age(seconds: float | None) -> str:
    """A duration the way people read it: 42s, 5m07s, 3h12m, 2d04h."""
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(header)] + [[_clean(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines) + "\n"


def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _address_column(h: HostInfo) -> str:
    """The address the fence lane uses now; marked when it is not the configured primary."""
    text = _endpoint(h.fence_address or h.address, h.port)
    if h.fence_address is not None and h.fence_address != h.address:
        text += " (fallback)"
    if h.inventory_address is not None and h.inventory_address != h.fence_address:
        text += f" inv {h.inventory_address}"
    return text


def _mode(h: HostInfo) -> str:
    """`shell`, or `helper` with the version the host answered (`?` until it has); `api` for
    a vSphere API entry, which has no SSH mode."""
    if h.kind == "vsphere" and h.mode is None:
        return "api"
    if h.mode != "helper":
        return h.mode or "shell"
    return f"helper {h.helper_version or '?'}"


def _listing(problem: str | None) -> str | None:
    return None if problem is None else f"listing fails: {problem}"


def render_status(result: JsonObject, now: float) -> str:
    status = replies.parse_status(result)
    d = status.daemon
    head = f"vmfenced {_clean(d.version)}, pid {d.pid}, up {format_age(d.uptime_s)}\n"
    if status.journal is not None:
        head += f"journal {_journal_line(status.journal, now)}\n"
    head += "\n"
    hosts = table(
        ("HOST", "ADDRESS", "MODE", "STATE", "SINCE", "RTT", "INVENTORY", "VMS", "REASON"),
        [
            (
                h.name,
                _address_column(h),
                _mode(h),
                h.state,
                "-" if h.since is None else format_age(now - h.since) + " ago",
                "-" if h.rtt_ms is None else f"{h.rtt_ms:.2f} ms",
                "-" if h.inventory_age_s is None else format_age(h.inventory_age_s) + " ago",
                h.vm_count,
                h.reason if h.state != "up" else _listing(h.listing_problem),
            )
            for h in status.hosts
        ],
    )
    rows: list[tuple[object, ...]] = [
        (v.name, v.alias, v.host, v.state, v.cartel) for v in status.vms
    ]
    header: tuple[str, ...] = ("VM", "ALIAS", "HOST", "STATE", "CARTEL")
    paths = fence_paths(status.hosts, status.vms)
    if paths is not None:
        header += ("FENCE PATH",)
        rows = [(*row, path) for row, path in zip(rows, paths, strict=True)]
    text = head + hosts + render_warnings(status.hosts) + "\n" + table(header, rows)
    text += render_missing_nodes(status.missing_nodes)
    if any(v.state == "unconfirmable" for v in status.vms):
        text += (
            "\nunconfirmable: the VM's host does not answer, so no fence of it can be "
            "confirmed.\nCheck that host (power, network); once you know the VM is down, "
            "confirm it by hand: stonith_admin --confirm NODE\n"
        )
    return text


def _journal_line(j: JournalInfo, now: float) -> str:
    if j.state == "ok":
        text = f"ok, {_clean(j.path)}"
    else:
        since = "" if j.since is None else f" for {format_age(now - j.since)}"
        text = f"FAILING{since}: {_clean(j.error)}; {j.backlog} fence record(s) wait in memory"
        text += f" (at most {j.backlog_max})"
    if j.dropped:
        text += f"; {j.dropped} record(s) dropped (backlog full): see the daemon's log"
    return text


def render_list(result: JsonObject) -> str:
    return table(
        ("VM", "ALIAS", "HOST", "STATE"),
        [(v.name, v.alias, v.host, v.state) for v in replies.parse_list(result)],
    )


def render_vm_status(result: JsonObject) -> str:
    s = replies.parse_vm_status(result)
    where = f" on {_clean(s.host)}" if s.host else ""
    cartel = f" (cartel {s.cartel})" if s.cartel is not None else ""
    return f"{_clean(s.vm)}: {s.state}{where}{cartel}\n"


def render_fence(result: JsonObject) -> str:
    f = replies.parse_fence(result)
    parts = [f"{_clean(f.vm)}: {f.action} -> {_clean(f.outcome)}"]
    if f.host:
        parts.append(f"on {_clean(f.host)}")
    if f.cartel is not None:
        parts.append(f"(cartel {f.cartel})")
    if f.elapsed_ms is not None:
        parts.append(f"in {f.elapsed_ms:.1f} ms")
    if f.joined:
        parts.append("[joined a fence already in flight]")
    if f.ha is not None:
        parts.append(f"HA: {_clean(f.ha)}")
    text = " ".join(parts) + "\n"
    if f.warning:
        text += f"warning: {_clean(f.warning)}\n"
    if f.journal_warning:
        text += f"journal warning: {_clean(f.journal_warning)}\n"
    return text


def render_reload(result: JsonObject) -> str:
    r = replies.parse_reload(result)
    if not r.changed:
        return "reloaded: no change\n"
    parts = [
        f"{what} {', '.join(_clean(n) for n in names)}"
        for what, names in (
            ("added", r.added),
            ("removed", r.removed),
            ("replaced", r.replaced),
            ("changed", r.settings),
        )
        if names
    ]
    kept = f" (links kept: {', '.join(_clean(n) for n in r.unchanged)})" if r.unchanged else ""
    return "reloaded: " + "; ".join(parts) + kept + "\n"


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def render_history(result: JsonObject, now: float) -> str:
    h = replies.parse_history(result)
    rows = []
    for e in h.entries:
        vm = e.vm if e.vm == e.target else f"{e.vm} -> {e.target}"
        took = e.total_ms if e.total_ms is not None else e.elapsed_ms
        rows.append(
            (
                _utc(e.t),
                vm,
                e.action,
                e.result + (" (joined)" if e.joined else ""),
                e.host,
                e.cartel,
                "-" if took is None else f"{took:.1f}",
                f"uid={e.peer_uid} pid={e.peer_pid}" if e.peer_uid is not None else None,
                e.reason,
            )
        )
    text = table(
        ("TIME (UTC)", "VM", "ACTION", "RESULT", "HOST", "CARTEL", "MS", "ASKED BY", "REASON"),
        rows,
    )
    if h.skipped:
        text += f"({h.skipped} unreadable journal line(s) skipped, e.g. torn by a crash)\n"
    j = h.journal_state
    if j is not None and (j.backlog or j.state != "ok" or j.dropped):
        text += f"(journal {_journal_line(j, now)}: not listed above)\n"
    return text


def _request(client: Client, args: argparse.Namespace) -> JsonObject:
    if args.command == "status":
        return client.call("status")
    if args.command == "list":
        return client.call("list")
    if args.command == "vm-status":
        return client.call("vm_status", vm=args.vm)
    if args.command == "reload":
        return client.call("reload")
    if args.command == "history":
        fields: JsonObject = {"limit": args.limit}
        if args.vm is not None:
            fields["vm"] = args.vm
        if args.since_t is not None:
            fields["since"] = args.since_t
        return client.call("history", **fields)
    if args.command == "metrics":
        return client.call("metrics")
    return client.call("fence", vm=args.vm, action=args.action)


def _render(args: argparse.Namespace, result: JsonObject, now: float) -> str:
    if args.command == "metrics":
        return replies.parse_metrics(result)
    if args.json:
        return json.dumps(result, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    if args.command == "status":
        return render_status(result, now)
    if args.command == "list":
        return render_list(result)
    if args.command == "vm-status":
        return render_vm_status(result)
    if args.command == "reload":
        return render_reload(result)
    if args.command == "history":
        return render_history(result, now)
    return render_fence(result)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str], now: float) -> argparse.Namespace:
    args = parser.parse_args(list(argv))
    if getattr(args, "vm", None) is not None:
        problem = vm_name_problem(args.vm)
        if problem is not None:
            raise UsageError(problem)
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError("--timeout must be a positive number of seconds")
    if args.command == "history":
        if not 1 <= args.limit <= MAX_HISTORY:
            raise UsageError(f"--limit must be 1 to {MAX_HISTORY}")
        args.since_t = None if args.since is None else parse_since(args.since, now)
    return args


def run(argv: Sequence[str], stdout: TextIO, stderr: TextIO, *, clock: Clock = time.time) -> int:
    """The whole command, without exiting: returns the exit status."""
    parser = build_parser()
    now = clock()
    try:
        args = _parse(parser, argv, now)
    except _Exit as exc:
        return exc.status
    except UsageError as exc:
        stderr.write(parser.format_usage())
        stderr.write(f"vmfencectl: error: {exc}\n")
        return EXIT_USAGE
    if args.command == "host-helper":  # prints text; asks no daemon
        return hosthelper.run(args, stdout, stderr)
    timeout = args.timeout
    if timeout is None:
        timeout = RELOAD_TIMEOUT_S if args.command == "reload" else DEFAULT_TIMEOUT_S
    try:
        with Client(args.socket, timeout_s=timeout) as client:
            result = _request(client, args)
            stdout.write(_render(args, result, now))
    except DaemonError as exc:
        stderr.write(f"vmfencectl: daemon error {_clean(exc)}\n")
        return EXIT_FAILED
    except ClientError as exc:
        stderr.write(f"vmfencectl: {_clean(exc)}\n")
        return EXIT_FAILED
    return EXIT_OK


def main() -> None:
    exit_with(lambda: run(sys.argv[1:], sys.stdout, sys.stderr), EXIT_FAILED)


if __name__ == "__main__":
    main()
