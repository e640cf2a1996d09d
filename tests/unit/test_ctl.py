"""vmfencectl: tables, JSON output, exit statuses, against the fake daemon."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fakedaemon import (
    NOW,
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
    vm,
    vm_status_result,
)
from tests.fakedaemon import run_ctl as ctl
from vmfenced import __version__
from vmfenced.clients.ctl import format_age


def test_status_table(daemon: FakeDaemon) -> None:
    result = status_result(
        host("esx1", mode="helper", helper_version="1-0123abcd"),
        host("esx2", "down", address="2001:db8::2", since=NOW - 12, mode="helper"),
        host("esx3", "connecting", reason=None, since=NOW - 7200),
    )
    result["vms"] = [vm("gfs-node1", "node1"), vm("gfs-node2", None, "esx1", "off")]
    daemon.set("status", Ok(result))
    code, out, err = ctl(daemon, "status")
    assert (code, err) == (0, "")
    assert out == (
        "vmfenced 0.1.0, pid 1234, up 12s\n"
        "\n"
        "HOST  ADDRESS           MODE               STATE       SINCE      RTT      INVENTORY  VMS  REASON\n"
        "esx1  192.0.2.11:22     helper 1-0123abcd  up          5m00s ago  0.31 ms  4s ago     2    -\n"
        "esx2  [2001:db8::2]:22  helper ?           down        12s ago    -        -          0    connection refused\n"
        "esx3  192.0.2.11:22     shell              connecting  2h00m ago  -        -          0    -\n"
        "\n"
        "VM         ALIAS  HOST  STATE  CARTEL\n"
        "gfs-node1  node1  esx1  on     68761\n"
        "gfs-node2  -      esx1  off    -\n"
    )
    assert daemon.requests == [{"op": "status", "id": 1}]


def test_status_says_which_vms_are_unconfirmable_and_why_a_listing_fails(
    daemon: FakeDaemon,
) -> None:
    result = status_result(
        host("esx1", listing_problem="cannot list running VMs: a VM name holds U+2028"),
        host("esx2", "down"),
    )
    result["vms"] = [vm("gfs-node2", "node2", "esx2", "unconfirmable")]
    daemon.set("status", Ok(result))
    code, out, _ = ctl(daemon, "status")
    assert code == 0
    assert "listing fails: cannot list running VMs: a VM name holds U+2028" in out
    assert "gfs-node2  node2  esx2  unconfirmable  -" in out
    assert "stonith_admin --confirm NODE" in out


def test_status_json_is_the_result_with_sorted_keys(daemon: FakeDaemon) -> None:
    daemon.set("status", Ok(status_result()))
    code, out, _ = ctl(daemon, "status", "--json")
    assert code == 0
    assert json.loads(out) == status_result()
    assert out == json.dumps(status_result(), sort_keys=True, indent=2) + "\n"
    keys = list(json.loads(out)["hosts"][0])
    assert keys == sorted(keys)


def test_list_table_and_json(daemon: FakeDaemon) -> None:
    daemon.set("list", Ok(list_result()))
    code, out, _ = ctl(daemon, "list")
    assert code == 0
    assert out == (
        "VM         ALIAS  HOST  STATE\n"
        "gfs-node1  node1  esx1  on\n"
        "gfs-node2  -      esx1  off\n"
        "gfs-node3  node3  esx2  unknown\n"
    )
    assert json.loads(ctl(daemon, "list", "--json")[1]) == list_result()


def test_table_cells_cannot_forge_lines(daemon: FakeDaemon) -> None:
    daemon.set(
        "list", Ok({"vms": [{"name": "a\nb\x1b[31m", "alias": None, "host": "h", "state": "on"}]})
    )
    code, out, _ = ctl(daemon, "list")
    assert code == 0
    assert out.splitlines()[1] == "a\\x0ab\\x1b[31m  -      h     on"


def test_vm_status(daemon: FakeDaemon) -> None:
    daemon.set("vm_status", Ok(vm_status_result("on")))
    assert ctl(daemon, "vm-status", "node1") == (0, "gfs-node1: on on esx1 (cartel 68761)\n", "")
    assert daemon.requests == [{"op": "vm_status", "id": 1, "vm": "node1"}]
    off: dict[str, object] = {"vm": "gfs-node1", "state": "off", "host": None, "cartel": None}
    daemon.set("vm_status", Ok(off))
    assert ctl(daemon, "vm-status", "node1") == (0, "gfs-node1: off\n", "")
    assert json.loads(ctl(daemon, "vm-status", "node1", "--json")[1]) == off


def test_fence_defaults_to_off(daemon: FakeDaemon) -> None:
    daemon.set("fence", Ok(fence_result("off", "killed")))
    code, out, _ = ctl(daemon, "fence", "node1")
    assert (code, out) == (0, "gfs-node1: off -> killed on esx1 (cartel 68761) in 1.9 ms\n")
    assert daemon.fences == [{"op": "fence", "id": 1, "vm": "node1", "action": "off"}]


def test_fence_reboot_joined_with_warning(daemon: FakeDaemon) -> None:
    result = fence_result("reboot", "off_only", joined=True, warning="power-on failed")
    daemon.set("fence", Ok(result))
    code, out, _ = ctl(daemon, "fence", "node1", "--action", "reboot")
    assert code == 0
    assert out == (
        "gfs-node1: reboot -> off_only on esx1 (cartel 68761) in 1.9 ms "
        "[joined a fence already in flight]\n"
        "warning: power-on failed\n"
    )
    assert daemon.fences[0]["action"] == "reboot"
    assert json.loads(ctl(daemon, "fence", "node1", "--json", "--action", "reboot")[1]) == result


def test_daemon_error_exits_1_naming_the_code(daemon: FakeDaemon) -> None:
    daemon.set("fence", Err("fence_failed", "esx2 is down", "gfs-node2"))
    code, out, err = ctl(daemon, "fence", "node2")
    assert (code, out) == (1, "")
    assert err == "vmfencectl: daemon error fence_failed: esx2 is down (vm gfs-node2)\n"
    daemon.set("status", Err("permission_denied", "uid 1000 is not allowed"))
    code, _, err = ctl(daemon, "status", "--json")
    assert code == 1
    assert "permission_denied" in err


@pytest.mark.parametrize(
    ("response", "fragment"),
    [(Raw(b"nonsense\n"), "protocol violation"), (Ok({"hosts": []}), "protocol violation")],
)
def test_bad_replies_exit_1(daemon: FakeDaemon, response: Raw | Ok, fragment: str) -> None:
    daemon.set("status", response)
    code, out, err = ctl(daemon, "status")
    assert (code, out) == (1, "")
    assert fragment in err


def test_unreachable_and_timeout_exit_1(daemon: FakeDaemon, tmp_path: Path) -> None:
    code, _, err = ctl(None, "--socket", str(tmp_path / "none.sock"), "status")
    assert code == 1
    assert "cannot reach vmfenced" in err
    daemon.set("status", Hang())
    code, _, err = ctl(daemon, "--timeout", "0.2", "status")
    assert code == 1
    assert "timed out" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["explode"],
        ["fence"],
        ["fence", "node1", "--action", "destroy"],
        ["fence", ""],
        ["vm-status", "a\nb"],
        ["vm-status", "x" * 300],
        ["--timeout", "0", "status"],
        ["--timeout", "nan", "status"],
        ["--timeout", "soon", "status"],
        ["status", "--bogus"],
    ],
)
def test_usage_errors_exit_2_and_send_nothing(daemon: FakeDaemon, argv: list[str]) -> None:
    code, out, err = ctl(daemon, *argv)
    assert (code, out) == (2, "")
    assert "vmfencectl: error:" in err
    assert daemon.requests == []


def test_help_and_version_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl(None, "--help")[0] == 0
    assert "vm-status" in capsys.readouterr().out
    assert ctl(None, "--version")[0] == 0
    assert capsys.readouterr().out == f"vmfencectl {__version__}\n"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (-3, "0s"),
        (0.4, "0s"),
        (59.9, "59s"),
        (61, "1m01s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (86399, "23h59m"),
        (90000, "1d01h"),
    ],
)
def test_format_age(seconds: float | None, text: str) -> None:
    assert format_age(seconds) == text


def test_ctl_process_imports_only_the_standard_library(daemon: FakeDaemon) -> None:
    daemon.set("status", Ok(status_result()))
    code, stderr, names = imported_modules(
        ["-m", "vmfenced.clients.ctl", "--socket", str(daemon.path), "status"]
    )
    assert code == 0, stderr[-2000:]
    assert_stdlib_only(names)
