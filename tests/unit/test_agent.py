"""fence_vmfenced: every action and exit code, against the fake daemon."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fakedaemon import (
    Close,
    Err,
    FakeDaemon,
    Hang,
    Ok,
    Raw,
    assert_stdlib_only,
    fence_result,
    host,
    imported_modules,
    list_result,
    status_result,
    vm_status_result,
)
from vmfenced import __version__
from vmfenced.clients.agent import run
from vmfenced.clients.agent_install import install
from vmfenced.clients.agent_metadata import metadata_xml

RNG = Path("/usr/share/cluster/relaxng/metadata.rng")
# Never loaded by the agent as installed: each costs every Pacemaker call milliseconds
# (typing pulls contextlib in). collections and types stay: json, re and socket load them.
AGENT_NEVER_IMPORTS = frozenset({"typing", "contextlib", "dataclasses"})


class Outcome:
    def __init__(self, code: int, stdout: str, stderr: str, sleeps: list[float]) -> None:
        self.code = code
        self.stdout = stdout
        self.stderr = stderr
        self.sleeps = sleeps


def agent(
    stdin: bytes | str = b"", *argv: str, margin: float = 5.0, record: list[int] | None = None
) -> Outcome:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    out, err, sleeps = io.StringIO(), io.StringIO(), []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    code = run(argv, io.BytesIO(data), out, err, sleep=sleep, timeout_margin_s=margin)
    return Outcome(code, out.getvalue(), err.getvalue(), sleeps)


def feed(daemon: FakeDaemon, *lines: str) -> Outcome:
    """Pacemaker's way: key=value lines, pointed at the fake daemon."""
    return agent("\n".join([*lines, f"socket={daemon.path}"]) + "\n")


# -- fencing actions -------------------------------------------------------------------------


def test_off_killed(daemon: FakeDaemon) -> None:
    daemon.set("fence", Ok(fence_result("off", "killed")))
    result = feed(daemon, "action=off", "plug=node1", "nodename=node1")
    assert (result.code, result.stdout, result.stderr) == (0, "Success: Powered OFF\n", "")
    assert daemon.fences == [{"op": "fence", "id": 1, "vm": "node1", "action": "off"}]


def test_off_already_off(daemon: FakeDaemon) -> None:
    daemon.set("fence", Ok(fence_result("off", "already_off", host=None, cartel=None)))
    result = feed(daemon, "action=off", "plug=node1")
    assert (result.code, result.stdout) == (0, "Success: Already OFF\n")


def test_pacemaker_style_input_fences_the_plug(daemon: FakeDaemon) -> None:
    daemon.set("fence", Ok(fence_result("off")))
    result = feed(
        daemon, "action=off", "nodename=node1", "nodeid=1", "plug=gfs-node1", "pcmk_x=ignored"
    )
    assert result.code == 0
    assert daemon.fences[0]["vm"] == "gfs-node1"
    assert "pcmk_x" in result.stderr and "nodeid" not in result.stderr


def test_nodename_fallback_fences_the_node_name(daemon: FakeDaemon) -> None:
    daemon.set("fence", Ok(fence_result("off")))
    assert feed(daemon, "action=off", "nodename=node1").code == 0
    assert daemon.fences[0]["vm"] == "node1"


@pytest.mark.parametrize("action", ["off", "reboot", "on"])
def test_fence_failure_exits_1(daemon: FakeDaemon, action: str) -> None:
    daemon.set("fence", Err("fence_failed", "esx2 is down: cannot confirm", "gfs-node2"))
    result = feed(daemon, f"action={action}", "plug=node2")
    assert result.code == 1
    assert result.stdout == ""
    assert result.stderr == ("Failed: fence_failed: esx2 is down: cannot confirm (vm gfs-node2)\n")


@pytest.mark.parametrize(
    "result",
    [
        fence_result("off", "powered_on"),
        fence_result("on", "killed"),
        fence_result("off", "maybe"),
        {"vm": "gfs-node1"},
    ],
)
def test_off_with_an_unexpected_result_fails(daemon: FakeDaemon, result: dict[str, object]) -> None:
    daemon.set("fence", Ok(result))
    outcome = feed(daemon, "action=off", "plug=node1")
    assert outcome.code == 1
    assert outcome.stderr.startswith("Failed: protocol violation")


@pytest.mark.parametrize(
    ("outcome", "line"), [("powered_on", "Powered ON"), ("already_on", "Already ON")]
)
def test_on(daemon: FakeDaemon, outcome: str, line: str) -> None:
    daemon.set("fence", Ok(fence_result("on", outcome)))
    result = feed(daemon, "action=on", "plug=node1")
    assert (result.code, result.stdout) == (0, f"Success: {line}\n")
    assert daemon.fences[0]["action"] == "on"


def test_on_retries_up_to_retry_on(daemon: FakeDaemon) -> None:
    daemon.set("fence", [Err("fence_failed", "busy"), Ok(fence_result("on", "powered_on"))])
    result = feed(daemon, "action=on", "plug=node1", "retry_on=2")
    assert (result.code, result.stdout) == (0, "Success: Powered ON\n")
    assert "attempt 1 of 2" in result.stderr
    assert len(daemon.fences) == 2


def test_on_gives_up_after_retry_on(daemon: FakeDaemon) -> None:
    daemon.set("fence", Err("fence_failed", "busy"))
    result = feed(daemon, "action=on", "plug=node1", "retry_on=3")
    assert result.code == 1
    assert len(daemon.fences) == 3


def test_reboot(daemon: FakeDaemon) -> None:
    daemon.set("fence", Ok(fence_result("reboot", "rebooted")))
    result = feed(daemon, "action=reboot", "plug=node1")
    assert (result.code, result.stdout, result.stderr) == (0, "Success: Rebooted\n", "")
    assert [f["action"] for f in daemon.fences] == ["reboot"]


def test_reboot_with_off_confirmed_but_on_failed_is_a_success(daemon: FakeDaemon) -> None:
    # fencing.py: the node is fenced; the failed power-on is only logged.
    daemon.set(
        "fence",
        Ok(fence_result("reboot", "off_only", warning="off confirmed, power-on failed: no host")),
    )
    result = feed(daemon, "action=reboot", "plug=node1")
    assert (result.code, result.stdout) == (0, "Success: Rebooted\n")
    assert result.stderr == "WARNING: off confirmed, power-on failed: no host\n"


def test_no_action_means_reboot(daemon: FakeDaemon) -> None:
    daemon.set("fence", Ok(fence_result("reboot", "rebooted")))
    assert feed(daemon, "plug=node1").code == 0
    assert daemon.fences[0]["action"] == "reboot"


def test_missing_as_off(daemon: FakeDaemon) -> None:
    daemon.set("fence", Err("unknown_vm", "no host runs or has registered ghost", "ghost"))
    daemon.set("vm_status", Err("unknown_vm", "unknown", "ghost"))
    assert feed(daemon, "action=off", "plug=ghost").code == 1
    off = feed(daemon, "action=off", "plug=ghost", "missing_as_off=1")
    assert (off.code, off.stdout) == (0, "Success: Already OFF\n")
    assert "missing_as_off" in off.stderr
    reboot = feed(daemon, "action=reboot", "plug=ghost", "missing_as_off=1")
    assert (reboot.code, reboot.stdout) == (0, "Success: Rebooted\n")
    status = feed(daemon, "action=status", "plug=ghost", "missing_as_off=1")
    assert (status.code, status.stdout) == (2, "Status: OFF\n")
    on = feed(daemon, "action=on", "plug=ghost", "missing_as_off=1")
    assert on.code == 1


# -- delay and timeouts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "delayed"), [("off", True), ("reboot", True), ("on", False), ("status", False)]
)
def test_delay_applies_to_off_and_reboot_only(
    daemon: FakeDaemon, action: str, delayed: bool
) -> None:
    daemon.set(
        "fence",
        Ok(fence_result(action, {"off": "killed", "reboot": "rebooted"}.get(action, "powered_on"))),
    )
    daemon.set("vm_status", Ok(vm_status_result()))
    result = feed(daemon, f"action={action}", "plug=node1", "delay=7")
    assert result.code == 0
    assert result.sleeps == ([7.0] if delayed else [])


def test_delay_zero_does_not_sleep(daemon: FakeDaemon) -> None:
    daemon.set("fence", Ok(fence_result("off")))
    result = feed(daemon, "action=off", "plug=node1", "delay=0", "power_wait=0")
    assert (result.code, result.sleeps) == (0, [])


def test_power_wait_after_a_confirmed_off(daemon: FakeDaemon) -> None:
    daemon.set("fence", Ok(fence_result("off")))
    result = feed(daemon, "action=off", "plug=node1", "delay=1", "power_wait=2")
    assert (result.code, result.sleeps) == (0, [1.0, 2.0])


def test_silent_daemon_times_out_after_power_timeout(daemon: FakeDaemon) -> None:
    daemon.set("fence", Hang())
    result = agent(f"action=off\nplug=node1\npower_timeout=0.2\nsocket={daemon.path}\n", margin=0)
    assert result.code == 1
    assert result.stderr.startswith("Failed: timed out after 0.2 s")


# -- status, list, monitor -------------------------------------------------------------------


@pytest.mark.parametrize(("state", "code"), [("on", 0), ("off", 2)])
def test_status(daemon: FakeDaemon, state: str, code: int) -> None:
    daemon.set("vm_status", Ok(vm_status_result(state)))
    result = feed(daemon, "action=status", "plug=node1")
    assert (result.code, result.stdout) == (code, f"Status: {state.upper()}\n")
    assert daemon.requests == [{"op": "vm_status", "id": 1, "vm": "node1"}]


@pytest.mark.parametrize(
    "response",
    [
        Err("fence_failed", "esx2 did not answer"),
        Err("unknown_vm", "unknown"),
        Ok({**vm_status_result(), "state": "unknown"}),
        Raw(b"garbage\n"),
        Close(),
    ],
)
def test_status_errors_exit_1(daemon: FakeDaemon, response: Err | Ok | Raw | Close) -> None:
    daemon.set("vm_status", response)
    result = feed(daemon, "action=status", "plug=node1")
    assert (result.code, result.stdout) == (1, "")
    assert result.stderr.startswith("Failed: ")
    assert result.stderr.count("\n") == 1


def test_list_and_list_status(daemon: FakeDaemon) -> None:
    daemon.set("list", Ok(list_result()))
    listed = feed(daemon, "action=list")
    assert (listed.code, listed.stdout) == (0, "gfs-node1,node1\ngfs-node2,\ngfs-node3,node3\n")
    with_status = feed(daemon, "action=list-status")
    assert with_status.stdout == "gfs-node1,node1,ON\ngfs-node2,,OFF\ngfs-node3,node3,UNKNOWN\n"


def test_list_escapes_control_characters(daemon: FakeDaemon) -> None:
    daemon.set("list", Ok({"vms": [{"name": "a\nb", "alias": None, "host": "h", "state": "on"}]}))
    assert feed(daemon, "action=list").stdout == "a\\x0ab,\n"


def test_monitor_healthy_warns_about_down_hosts(daemon: FakeDaemon) -> None:
    daemon.set("status", Ok(status_result()))
    result = feed(daemon, "action=monitor")
    assert (result.code, result.stdout) == (0, "")
    assert result.stderr == "WARNING: hypervisor hosts not up: esx2 (down: connection refused)\n"


def test_monitor_all_up_is_silent(daemon: FakeDaemon) -> None:
    daemon.set("status", Ok(status_result(host("esx1"), host("esx2"))))
    result = feed(daemon, "action=monitor")
    assert (result.code, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize(
    "response",
    [
        Ok({**status_result(), "hosts": [host("esx1", "down"), host("esx2", "connecting")]}),
        Ok({**status_result(), "hosts": []}),
        Err("unavailable", "shutting down"),
        Raw(b"{}\n"),
    ],
)
def test_monitor_unhealthy(daemon: FakeDaemon, response: Ok | Err | Raw) -> None:
    daemon.set("status", response)
    result = feed(daemon, "action=monitor")
    assert result.code == 1
    assert result.stderr.startswith("Failed: ")


# -- no daemon needed ------------------------------------------------------------------------


def test_unreachable_daemon_exits_1(tmp_path: Path) -> None:
    for action in ("off", "on", "reboot", "status", "list", "monitor"):
        result = agent(f"action={action}\nplug=node1\nsocket={tmp_path}/none.sock\n")
        assert result.code == 1, action
        assert result.stderr.startswith("Failed: cannot reach vmfenced")


@pytest.mark.parametrize(
    "stdin",
    [
        b"\x00\xff\xfe garbage \x80\x81",
        b"\x89PNG\r\n\x1a\n",
        b"action=off\nplug=node1\nrm -rf /\n",
        b"action=explode\nplug=node1\n",
        b"action=off\nplug=\n",
        b"action=off\nplug=\nnodename=node1\n",
        b"action=off\n",
        b"",
        b"action=off\nplug=node1\ndelay=later\n",
    ],
)
def test_malformed_input_never_fences(daemon: FakeDaemon, stdin: bytes) -> None:
    daemon.set("fence", Ok(fence_result("off")))
    result = agent(stdin + f"\nsocket={daemon.path}\n".encode())
    assert result.code == 1
    assert result.stderr.startswith("Failed: ")
    assert daemon.requests == []


@pytest.mark.parametrize("action", ["metadata", "meta-data", "manpage"])
def test_metadata_needs_no_daemon(action: str) -> None:
    result = agent(f"action={action}\nsocket=/nonexistent\n")
    assert (result.code, result.stdout) == (0, metadata_xml())


def test_metadata_declares_parameters_and_actions() -> None:
    xml = metadata_xml()
    for name in ("plug", "port", "action", "socket", "delay", "power_timeout", "verbose"):
        assert f'<parameter name="{name}"' in xml
    assert '<parameter name="plug" unique="0" required="1" obsoletes="port">' in xml
    assert '<parameter name="port" unique="0" required="1" deprecated="1">' in xml
    assert '<action name="on" automatic="0" />' in xml
    actions = re.findall(r'<action name="([a-z-]+)"', xml)
    assert actions == [
        "on", "off", "reboot", "status", "list", "list-status", "monitor", "metadata",
        "manpage", "validate-all",
    ]  # fmt: skip


def test_metadata_validates_with_xmllint(tmp_path: Path) -> None:
    if shutil.which("xmllint") is None or not RNG.exists():
        pytest.skip("xmllint or fence-agents' metadata.rng is not installed")
    path = tmp_path / "metadata.xml"
    path.write_text(agent("", "-o", "metadata").stdout)
    check = subprocess.run(
        ["xmllint", "--noout", "--relaxng", str(RNG), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stderr


def test_validate_all(daemon: FakeDaemon) -> None:
    valid = feed(daemon, "action=validate-all", "plug=node1", "delay=3")
    assert (valid.code, valid.stdout, valid.stderr) == (0, "", "")
    invalid = feed(daemon, "action=validate-all", "delay=x", "power_timeout=-")
    assert invalid.code == 1
    assert invalid.stderr.count("Failed: ") == 3  # no plug, bad delay, bad power_timeout
    assert daemon.requests == []


def test_command_line_use(daemon: FakeDaemon) -> None:
    daemon.set("fence", Ok(fence_result("off")))
    result = agent(
        b"ignored when there are arguments",
        "-o",
        "off",
        "-n",
        "node1",
        "--socket",
        str(daemon.path),
    )
    assert (result.code, result.stdout) == (0, "Success: Powered OFF\n")
    assert agent(b"", "--bogus").code == 1


def test_help_and_version() -> None:
    assert agent(b"", "-h").stdout.startswith("Usage:")
    assert agent(b"", "--version").stdout == f"{__version__}\n"


def test_verbose_and_debug_file(daemon: FakeDaemon, tmp_path: Path) -> None:
    daemon.set("fence", Ok(fence_result("off")))
    log = tmp_path / "debug.log"
    result = feed(daemon, "action=off", "plug=node1", "verbose=1", f"debug_file={log}")
    assert result.code == 0
    assert "DEBUG: request: fence off node1" in result.stderr
    assert "DEBUG: request: fence off node1" in log.read_text()


def test_unwritable_debug_file_does_not_stop_a_fence(daemon: FakeDaemon, tmp_path: Path) -> None:
    daemon.set("fence", Ok(fence_result("off")))
    result = feed(daemon, "action=off", "plug=node1", f"debug_file={tmp_path}/no/such/dir/log")
    assert result.code == 0
    assert "cannot open debug_file" in result.stderr


# -- the real process ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stdin",
    [b"action=metadata\n", b"action=status\nplug=node1\n", b"action=off\nplug=node1\n"],
)
def test_agent_process_imports_only_the_standard_library(daemon: FakeDaemon, stdin: bytes) -> None:
    daemon.set("vm_status", Ok(vm_status_result()))
    daemon.set("fence", Ok(fence_result("off")))
    code, stderr, names = imported_modules(
        ["-m", "vmfenced.clients.agent"], stdin + f"socket={daemon.path}\n".encode()
    )
    assert code == 0, stderr[-2000:]
    assert_stdlib_only(names)


@pytest.mark.parametrize(
    "stdin",
    [b"action=metadata\n", b"action=status\nplug=node1\n", b"action=off\nplug=node1\n"],
)
def test_installed_agent_loads_no_typing(daemon: FakeDaemon, tmp_path: Path, stdin: bytes) -> None:
    daemon.set("vm_status", Ok(vm_status_result()))
    daemon.set("fence", Ok(fence_result("off")))
    wrapper = install(tmp_path / "fence_vmfenced")
    # The wrapper's own interpreter flags, as its shebang line gives them: no site, isolated.
    code, stderr, names = imported_modules(
        ["-IS", str(wrapper)], stdin + f"socket={daemon.path}\n".encode()
    )
    assert code == 0, stderr[-2000:]
    assert {"vmfenced", "json", "socket"} <= names
    assert_stdlib_only(names)
    assert not names & AGENT_NEVER_IMPORTS, sorted(names & AGENT_NEVER_IMPORTS)
