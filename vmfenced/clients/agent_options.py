"""Options of `fence_vmfenced`: stdin `key=value` lines or a command line, validated.

Nothing here talks to the daemon; a problem found here means nothing is sent. Stdlib only.
"""

from __future__ import annotations

import re

from vmfenced.clients.agent_metadata import ACTIONS, PARAMS, Param
from vmfenced.clients.client import vm_name_problem
from vmfenced.clients.records import Record
from vmfenced.clients.text import printable

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing would cost every agent call its import time; only mypy needs it
    from collections.abc import Sequence
    from typing import Final

MAX_STDIN_BYTES = 1024 * 1024
MAX_NUMBER = 86400  # one day in seconds; also bounds retry_on
TARGET_ACTIONS = frozenset({"on", "off", "reboot", "status", "validate-all"})

_BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}
_BY_SHORT: dict[str, Param] = {p.short: p for p in PARAMS if p.short is not None}
_FLAGS = {"help": "h", "version": "V"}
# Keys Pacemaker passes that are not parameters: nodename is the plug's fallback.
_PACEMAKER_KEYS = frozenset({"nodename", "nodeid"})
_OLD_NAMES = {"debug": "debug_file"}
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_INTEGER = re.compile(r"[0-9]+")
_TRUE = frozenset({"1", "yes", "on", "true"})
_FALSE = frozenset({"", "0", "no", "off", "false"})


class UsageError(Exception):
    """The input cannot be understood; nothing is sent to the daemon."""


class Options(Record):
    __slots__ = _fields = (
        "action",
        "plug",
        "socket",
        "delay",
        "power_timeout",
        "power_wait",
        "retry_on",
        "missing_as_off",
        "verbose",
        "debug_file",
    )

    def __init__(
        self,
        *,
        action: str,
        plug: str | None,
        socket: str,
        delay: float,
        power_timeout: float,
        power_wait: float,
        retry_on: int,
        missing_as_off: bool,
        verbose: bool,
        debug_file: str | None,
    ) -> None:
        self.action: Final = action
        self.plug: Final = plug
        self.socket: Final = socket
        self.delay: Final = delay
        self.power_timeout: Final = power_timeout
        self.power_wait: Final = power_wait
        self.retry_on: Final = retry_on
        self.missing_as_off: Final = missing_as_off
        self.verbose: Final = verbose
        self.debug_file: Final = debug_file


def one_line(text: str, limit: int = 400) -> str:
    """`text` made safe for a one-line log message: control characters escaped, bounded."""
    safe = printable(text[:limit])
    return safe + ("..." if len(text) > limit else "")


def parse_stdin(data: bytes) -> tuple[dict[str, str], list[str]]:
    """`key=value` lines: `#` comments skipped, the last of a repeated key wins, `-` and `_`
    interchangeable. Returns the values and warnings about ignored keys."""
    if len(data) > MAX_STDIN_BYTES:
        raise UsageError(f"standard input is larger than {MAX_STDIN_BYTES} bytes")
    if b"\0" in data:
        raise UsageError("standard input contains a NUL byte: not key=value text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"standard input is not UTF-8 text (byte {exc.start})") from exc
    raw: dict[str, str] = {}
    warnings: list[str] = []
    for number, text_line in enumerate(text.splitlines(), 1):
        line = text_line.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        key = key.strip()
        # A line we cannot read might have been the action or the plug: refuse to guess.
        if not eq or not _KEY.fullmatch(key):
            raise UsageError(f"line {number} is not key=value: {one_line(line, 60)!r}")
        name = key.replace("-", "_")
        name = _OLD_NAMES.get(name, name)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]  # fencing.py strips one pair of double quotes too
        if name in _BY_NAME or name in _PACEMAKER_KEYS:
            raw[name] = value
        else:
            warnings.append(f"Parse error: Ignoring unknown option '{one_line(key, 60)}'")
    return raw, warnings


def parse_argv(argv: Sequence[str]) -> dict[str, str]:
    """Command-line options, as people testing by hand use them (`-o off -n vm1`)."""
    raw: dict[str, str] = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--") and len(arg) > 2:
            spelled, eq, value = arg[2:].partition("=")
            name = spelled.replace("-", "_")
            name = _OLD_NAMES.get(name, name)
            param = _BY_NAME.get(name)
            if name in _FLAGS or (param is not None and not param.takes_value):
                if eq:
                    raise UsageError(f"option --{spelled} takes no value")
                raw[name] = "1"
            elif param is None:
                raise UsageError(f"unknown option --{one_line(spelled, 60)}")
            elif eq:
                raw[name] = value
            elif args:
                raw[name] = args.pop(0)
            else:
                raise UsageError(f"option --{spelled} needs a value")
        elif arg.startswith("-") and len(arg) > 1 and not arg.startswith("--"):
            cluster = arg[1:]
            while cluster:
                letter, cluster = cluster[0], cluster[1:]
                flag = next((name for name, short in _FLAGS.items() if short == letter), None)
                param = _BY_SHORT.get(letter)
                if flag is not None:
                    raw[flag] = "1"
                elif param is None:
                    raise UsageError(f"unknown option -{one_line(letter)}")
                elif not param.takes_value:
                    raw[param.name] = "1"
                elif cluster:
                    raw[param.name], cluster = cluster, ""
                elif args:
                    raw[param.name] = args.pop(0)
                else:
                    raise UsageError(f"option -{letter} needs a value")
        else:
            raise UsageError(f"unexpected argument {one_line(arg, 60)!r}")
    return raw


def normalise_action(raw: dict[str, str]) -> str:
    action = raw.get("action", "reboot").strip().lower()
    return "metadata" if action == "meta-data" else action


def _number(raw: dict[str, str], name: str, errors: list[str]) -> float:
    value = raw.get(name, "").strip() or (_BY_NAME[name].default or "0")
    pattern = _INTEGER if _BY_NAME[name].kind == "integer" else _SECONDS
    if not pattern.fullmatch(value):
        what = "an integer" if pattern is _INTEGER else "a time in seconds"
        errors.append(f"the value of {name} is not {what}: {one_line(value, 60)!r}")
        return 0.0
    if float(value) > MAX_NUMBER:
        # Beyond this, sleep() and socket timeouts overflow; no sane setting gets near it.
        errors.append(f"the value of {name} is larger than {MAX_NUMBER}: {value[:60]}")
        return 0.0
    return float(value)


def _flag(raw: dict[str, str], name: str, errors: list[str]) -> bool:
    value = raw.get(name, "").strip().lower()
    if value not in _TRUE | _FALSE:
        errors.append(f"the value of {name} is not a boolean: {one_line(value, 60)!r}")
    return value in _TRUE


def _target(raw: dict[str, str], action: str, errors: list[str]) -> str | None:
    plug, port = raw.get("plug"), raw.get("port")
    if plug is not None and port is not None and plug != port:
        # Pacemaker writes its keys in hash order, so "last wins" would be a coin toss.
        errors.append(f"plug {one_line(plug, 60)!r} and port {one_line(port, 60)!r} disagree")
        return None
    target = plug if plug is not None else port
    if target is None:
        target = raw.get("nodename")
    if target is None:
        if action in TARGET_ACTIONS:
            errors.append(f"action {action} needs a plug (plug=VM, or port=VM)")
        return None
    problem = vm_name_problem(target)
    if problem is not None:
        errors.append(f"invalid plug {one_line(target, 60)!r}: {problem}")
        return None
    return target


def make_options(raw: dict[str, str]) -> tuple[Options | None, list[str]]:
    """Validate everything; return the options, or None and every problem found."""
    errors: list[str] = []
    action = normalise_action(raw)
    if action not in ACTIONS:
        errors.append(f"Unrecognised action '{one_line(action, 60)}'")
    plug = _target(raw, action, errors)
    socket_path = raw.get("socket", _BY_NAME["socket"].default or "").strip()
    if not socket_path:
        errors.append("socket is empty")
    options = Options(
        action=action,
        plug=plug,
        socket=socket_path,
        delay=_number(raw, "delay", errors),
        power_timeout=_number(raw, "power_timeout", errors),
        power_wait=_number(raw, "power_wait", errors),
        retry_on=int(_number(raw, "retry_on", errors)),
        missing_as_off=_flag(raw, "missing_as_off", errors),
        verbose=_flag(raw, "verbose", errors),
        debug_file=raw.get("debug_file") or None,
    )
    _number(raw, "login_timeout", errors)
    _number(raw, "shell_timeout", errors)
    return (None, errors) if errors else (options, [])
