"""`fence_vmfenced`: the Pacemaker fence agent (Fence Agent API) in front of vmfenced.

Pacemaker starts it for every fence, monitor and status, so it imports only the standard
library. Input is `key=value` lines on stdin when there are no arguments, else options.
Exit codes follow fence-agents' fencing.py: 0 success, 1 failure; `status` 2 means OFF.
"""

from __future__ import annotations

import io
import sys
import time

from vmfenced import __version__
from vmfenced.clients.agent_metadata import metadata_xml, usage_text
from vmfenced.clients.agent_options import (
    MAX_STDIN_BYTES,
    Options,
    UsageError,
    make_options,
    normalise_action,
    one_line,
    parse_argv,
    parse_stdin,
)
from vmfenced.clients.client import Client, ClientError, DaemonError, FenceResult, ProtocolViolation
from vmfenced.clients.process import exit_with

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing would cost every agent call its import time; only mypy needs it
    from collections.abc import Callable, Sequence
    from typing import BinaryIO, TextIO

    Sleep = Callable[[float], None]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_STATUS_OFF = 2
TIMEOUT_MARGIN_S = 5.0
DELAYED_ACTIONS = frozenset({"off", "reboot"})
# What a confirmed result may say; anything else cannot be trusted as success.
GOOD_OUTCOMES = {
    "off": frozenset({"killed", "already_off"}),
    "on": frozenset({"powered_on", "already_on"}),
    "reboot": frozenset({"rebooted", "off_only"}),
}


class Reporter:
    """Results on stdout; `Failed:`/`WARNING:`/`DEBUG:` lines on stderr and the debug file."""

    def __init__(self, stdout: TextIO, stderr: TextIO) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.verbose = False
        self.debug_file: TextIO | None = None

    def result(self, line: str) -> None:
        self.stdout.write(line + "\n")

    def _log(self, line: str) -> None:
        self.stderr.write(line + "\n")
        if self.debug_file is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self.debug_file.write(f"{stamp} {line}\n")

    def fail(self, message: str) -> None:
        self._log("Failed: " + one_line(message))

    def warn(self, message: str) -> None:
        self._log("WARNING: " + one_line(message))

    def debug(self, message: str) -> None:
        if self.verbose:
            self._log("DEBUG: " + one_line(message))


def _fence(client: Client, opts: Options, rep: Reporter, action: str) -> FenceResult:
    assert opts.plug is not None, "make_options requires a plug for fencing actions"
    rep.debug(f"request: fence {action} {opts.plug} via {client.path}")
    try:
        result = client.fence(opts.plug, action)
    except DaemonError as exc:
        if not (opts.missing_as_off and action != "on" and exc.code == "unknown_vm"):
            raise
        # fencing.py's missing_as_off: an unknown plug counts as already off.
        warning = f"{exc.message}: taken as OFF (missing_as_off)"
        rep.warn(warning)
        outcome = "already_off" if action == "off" else "off_only"
        return FenceResult(
            vm=opts.plug,
            action=action,
            outcome=outcome,
            host=None,
            cartel=None,
            elapsed_ms=None,
            joined=False,
            warning=warning,
        )
    rep.debug(f"reply: {result}")
    if result.action != action or result.outcome not in GOOD_OUTCOMES[action]:
        raise ProtocolViolation(f"fence {action} answered {result.action}/{result.outcome}")
    if result.warning:
        rep.warn(result.warning)
    if result.journal_warning:
        # The fence is done: the exit code says so. Pacemaker logs this line for the audit.
        rep.warn(f"vmfenced: {result.journal_warning}")
    return result


def _do_off(client: Client, opts: Options, rep: Reporter, sleep: Sleep) -> int:
    result = _fence(client, opts, rep, "off")
    if opts.power_wait:
        sleep(opts.power_wait)
    rep.result(
        "Success: Already OFF" if result.outcome == "already_off" else "Success: Powered OFF"
    )
    return EXIT_OK


def _power_on(client: Client, opts: Options, rep: Reporter) -> FenceResult:
    attempts = max(1, opts.retry_on)
    for attempt in range(1, attempts):
        try:
            return _fence(client, opts, rep, "on")
        except DaemonError as exc:
            rep.warn(f"power on, attempt {attempt} of {attempts}: {exc}")
    return _fence(client, opts, rep, "on")


def _do_on(client: Client, opts: Options, rep: Reporter, sleep: Sleep) -> int:
    result = _power_on(client, opts, rep)
    if opts.power_wait:
        sleep(opts.power_wait)
    rep.result("Success: Already ON" if result.outcome == "already_on" else "Success: Powered ON")
    return EXIT_OK


def _do_reboot(client: Client, opts: Options, rep: Reporter, sleep: Sleep) -> int:
    # The daemon answers off_only when the off was confirmed but the power-on failed. As in
    # fencing.py, the node is fenced, so that is a success; the reason is logged as a warning.
    result = _fence(client, opts, rep, "reboot")
    if result.outcome == "off_only" and not result.warning:
        rep.warn(f"{opts.plug} is confirmed OFF but was not powered ON again")
    rep.result("Success: Rebooted")
    return EXIT_OK


def _do_status(client: Client, opts: Options, rep: Reporter, sleep: Sleep) -> int:
    assert opts.plug is not None, "make_options requires a plug for status"
    try:
        state = client.vm_status(opts.plug).state
    except DaemonError as exc:
        if not (opts.missing_as_off and exc.code == "unknown_vm"):
            raise
        rep.warn(f"{exc.message}: taken as OFF (missing_as_off)")
        state = "off"
    rep.result(f"Status: {state.upper()}")
    return EXIT_STATUS_OFF if state == "off" else EXIT_OK


def _do_list(client: Client, opts: Options, rep: Reporter, sleep: Sleep) -> int:
    for vm in client.list_vms():
        fields = [one_line(vm.name), one_line(vm.alias or "")]
        if opts.action == "list-status":
            fields.append(vm.state.upper() if vm.state in ("on", "off") else "UNKNOWN")
        rep.result(",".join(fields))
    return EXIT_OK


def _do_monitor(client: Client, opts: Options, rep: Reporter, sleep: Sleep) -> int:
    hosts = client.status().hosts
    not_up = [
        f"{h.name} ({h.state}{': ' + h.reason if h.reason else ''})"
        for h in hosts
        if h.state != "up"
    ]
    if len(not_up) == len(hosts):
        rep.fail("no hypervisor host is up: " + (", ".join(not_up) or "none configured"))
        return EXIT_FAILED
    if not_up:
        rep.warn("hypervisor hosts not up: " + ", ".join(not_up))
    return EXIT_OK


_HANDLERS: dict[str, Callable[[Client, Options, Reporter, Sleep], int]] = {
    "off": _do_off,
    "on": _do_on,
    "reboot": _do_reboot,
    "status": _do_status,
    "list": _do_list,
    "list-status": _do_list,
    "monitor": _do_monitor,
}


def _act(opts: Options, rep: Reporter, sleep: Sleep, timeout_margin_s: float) -> int:
    if opts.action in DELAYED_ACTIONS and opts.delay > 0:
        rep.debug(f"delay {opts.delay:g} s before fencing")
        sleep(opts.delay)
    timeout = None if opts.power_timeout == 0 else opts.power_timeout + timeout_margin_s
    with Client(opts.socket, timeout_s=timeout) as client:
        try:
            return _HANDLERS[opts.action](client, opts, rep, sleep)
        except ClientError as exc:
            rep.fail(str(exc))
            return EXIT_FAILED


def run(
    argv: Sequence[str],
    stdin: BinaryIO,
    stdout: TextIO,
    stderr: TextIO,
    *,
    sleep: Sleep = time.sleep,
    timeout_margin_s: float = TIMEOUT_MARGIN_S,
) -> int:
    """The whole agent, without exiting: returns the exit code."""
    rep = Reporter(stdout, stderr)
    try:
        if argv:
            raw = parse_argv(argv)
        else:
            raw, warnings = parse_stdin(stdin.read(MAX_STDIN_BYTES + 1))
            for warning in warnings:
                rep.warn(warning)
    except UsageError as exc:
        rep.fail(str(exc))
        return EXIT_FAILED
    if "help" in raw:
        stdout.write(usage_text())
        return EXIT_OK
    if "version" in raw:
        rep.result(__version__)
        return EXIT_OK
    if normalise_action(raw) in ("metadata", "manpage"):
        stdout.write(metadata_xml())
        return EXIT_OK
    opts, errors = make_options(raw)
    if opts is None:
        for error in errors:
            rep.fail(error)
        return EXIT_FAILED
    if opts.action == "validate-all":
        return EXIT_OK
    rep.verbose = opts.verbose
    try:
        if opts.debug_file is not None:
            try:
                rep.debug_file = open(opts.debug_file, "a", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                # A debug file is no reason not to fence.
                rep.warn(f"cannot open debug_file {opts.debug_file}: {exc.strerror}")
        return _act(opts, rep, sleep, timeout_margin_s)
    finally:
        if rep.debug_file is not None:
            rep.debug_file.close()


def main() -> None:
    # fd 0 may be closed when started by hand from odd places: read nothing then.
    stdin = sys.stdin.buffer if sys.stdin is not None else io.BytesIO()
    exit_with(lambda: run(sys.argv[1:], stdin, sys.stdout, sys.stderr), EXIT_FAILED)


if __name__ == "__main__":
    main()
