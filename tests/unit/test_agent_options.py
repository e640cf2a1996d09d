"""fence_vmfenced's input: stdin key=value lines, command-line options, validation."""

from __future__ import annotations

import pytest

from vmfenced.clients.agent_options import UsageError, make_options, parse_argv, parse_stdin

# -- stdin parsing ---------------------------------------------------------------------------


def test_stdin_comments_blank_lines_last_key_wins_and_dashes() -> None:
    raw, warnings = parse_stdin(
        b'# a comment\n\naction=on\n  action = off  \npower-timeout=7\nplug="vm 1"\n'
    )
    assert raw == {"action": "off", "power_timeout": "7", "plug": "vm 1"}
    assert warnings == []


def test_stdin_unknown_keys_warn_without_echoing_the_value() -> None:
    raw, warnings = parse_stdin(b"action=off\npasswd=secret\nnodename=node1\nnodeid=3\n")
    assert raw == {"action": "off", "nodename": "node1", "nodeid": "3"}
    assert warnings == ["Parse error: Ignoring unknown option 'passwd'"]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x00\x01\x02binary", "NUL byte"),
        (b"action=off\n\xff\xfe\x80\n", "not UTF-8"),
        (b"action=off\njust words\n", "line 2 is not key=value"),
        (b"=off\n", "line 1 is not key=value"),
        (b"act ion=off\n", "not key=value"),
        (b"x" * (1024 * 1024 + 1), "larger than"),
    ],
)
def test_malformed_stdin_is_refused(data: bytes, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        parse_stdin(data)


# -- command line ----------------------------------------------------------------------------


def test_command_line_short_long_and_underscore_forms() -> None:
    raw = parse_argv(
        ["-o", "off", "-nvm1", "--power_timeout=3", "--delay", "2", "-vv", "--socket=/s"]
    )
    assert raw == {
        "action": "off",
        "plug": "vm1",
        "power_timeout": "3",
        "delay": "2",
        "verbose": "1",
        "socket": "/s",
    }
    assert parse_argv(["--action=status", "--port", "vm2", "--missing-as-off"]) == {
        "action": "status",
        "port": "vm2",
        "missing_as_off": "1",
    }
    assert parse_argv(["-ooff", "-D", "/tmp/f", "-h", "-V"]) == {
        "action": "off",
        "debug_file": "/tmp/f",
        "help": "1",
        "version": "1",
    }


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--bogus"], "unknown option --bogus"),
        (["-x"], "unknown option -x"),
        (["-o"], "needs a value"),
        (["--plug"], "needs a value"),
        (["--verbose=1"], "takes no value"),
        (["off"], "unexpected argument"),
    ],
)
def test_command_line_errors(argv: list[str], fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        parse_argv(argv)


# -- option validation -----------------------------------------------------------------------


def test_defaults() -> None:
    opts, errors = make_options({"plug": "vm1"})
    assert errors == []
    assert opts is not None
    assert (opts.action, opts.plug, opts.socket) == ("reboot", "vm1", "/run/vmfenced/vmfenced.sock")
    assert (opts.delay, opts.power_timeout, opts.power_wait, opts.retry_on) == (0, 20, 0, 1)
    assert not opts.verbose and not opts.missing_as_off and opts.debug_file is None


def test_numbers_and_booleans_are_parsed() -> None:
    opts, _ = make_options(
        {"plug": "v", "delay": "7.5", "power_timeout": "3", "retry_on": "2", "verbose": "yes"}
    )
    assert opts is not None
    assert (opts.delay, opts.power_timeout, opts.retry_on, opts.verbose) == (7.5, 3, 2, True)


def plug_of(raw: dict[str, str]) -> str | None:
    opts, errors = make_options(raw)
    assert opts is not None, errors
    return opts.plug


def test_nodename_is_only_a_fallback() -> None:
    assert plug_of({"nodename": "node1"}) == "node1"
    assert plug_of({"nodename": "node1", "plug": "vm-a"}) == "vm-a"
    assert plug_of({"nodename": "node1", "port": "vm-b"}) == "vm-b"
    assert plug_of({"plug": "vm-a", "port": "vm-a"}) == "vm-a"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"action": "explode", "plug": "v"}, "Unrecognised action 'explode'"),
        ({"action": "off"}, "needs a plug"),
        ({"action": "off", "plug": ""}, "empty"),
        ({"action": "off", "plug": "", "nodename": "node1"}, "empty"),
        ({"action": "off", "plug": "a\x1bb"}, "control characters"),
        ({"action": "off", "plug": "v" * 300}, "longer than 256"),
        ({"action": "off", "plug": "vm-a", "port": "vm-b"}, "disagree"),
        ({"plug": "v", "delay": "soon"}, "delay is not a time"),
        ({"plug": "v", "delay": "-1"}, "delay is not a time"),
        ({"plug": "v", "power_timeout": "1e3"}, "power_timeout"),
        ({"plug": "v", "delay": "9" * 30}, "delay is larger than 86400"),
        ({"plug": "v", "retry_on": "100000"}, "retry_on is larger"),
        ({"plug": "v", "retry_on": "1.5"}, "retry_on is not an integer"),
        ({"plug": "v", "login_timeout": "x"}, "login_timeout"),
        ({"plug": "v", "verbose": "maybe"}, "verbose is not a boolean"),
        ({"plug": "v", "socket": ""}, "socket is empty"),
    ],
)
def test_invalid_options(raw: dict[str, str], fragment: str) -> None:
    opts, errors = make_options(raw)
    assert opts is None
    assert any(fragment in e for e in errors), errors
