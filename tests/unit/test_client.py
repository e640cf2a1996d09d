"""vmfenced.clients.client against the fake daemon: replies, typed errors, bounds."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.fakedaemon import (
    Close,
    Err,
    FakeDaemon,
    Hang,
    Ok,
    Raw,
    fence_result,
    list_result,
    status_result,
    vm_status_result,
)
from vmfenced.clients.client import (
    Client,
    DaemonError,
    DaemonTimeout,
    DaemonUnreachable,
    ProtocolViolation,
    VmState,
    parse_fence,
    parse_status,
    parse_vm_status,
    vm_name_problem,
)


def client(daemon: FakeDaemon, **kwargs: float) -> Client:
    return Client(str(daemon.path), **kwargs)  # type: ignore[arg-type]


def test_call_returns_the_result_and_sends_one_json_line(daemon: FakeDaemon) -> None:
    daemon.set("vm_status", Ok(vm_status_result()))
    with client(daemon) as c:
        assert c.call("vm_status", vm="gfs-node1") == vm_status_result()
    assert daemon.requests == [{"op": "vm_status", "id": 1, "vm": "gfs-node1"}]


def test_requests_share_one_connection_with_increasing_ids(daemon: FakeDaemon) -> None:
    daemon.set("list", Ok(list_result()))
    daemon.set("status", Ok(status_result()))
    with client(daemon) as c:
        assert len(c.list_vms()) == 3
        assert c.status().daemon.pid == 1234
        assert c.list_vms()[0].alias == "node1"
    assert [r["id"] for r in daemon.requests] == [1, 2, 3]
    assert daemon.connections == 1


def test_typed_results(daemon: FakeDaemon) -> None:
    daemon.set("fence", Ok(fence_result("off", "killed", joined=True, warning="slow host")))
    daemon.set("vm_status", Ok(vm_status_result("off")))
    with client(daemon) as c:
        fenced = c.fence("node1", "off")
        state = c.vm_status("node1")
    assert (fenced.outcome, fenced.host, fenced.cartel, fenced.joined) == (
        "killed",
        "esx1",
        68761,
        True,
    )
    assert fenced.warning == "slow host"
    assert (state.state, state.host) == ("off", "esx1")
    assert daemon.fences == [{"op": "fence", "id": 1, "vm": "node1", "action": "off"}]


def test_daemon_error_carries_code_message_and_vm(daemon: FakeDaemon) -> None:
    daemon.set("fence", Err("fence_failed", "esx2 is down", "gfs-node2"))
    with client(daemon) as c, pytest.raises(DaemonError) as caught:
        c.fence("node2", "off")
    err = caught.value
    assert (err.code, err.message, err.vm) == ("fence_failed", "esx2 is down", "gfs-node2")
    assert str(err) == "fence_failed: esx2 is down (vm gfs-node2)"


def test_daemon_error_keeps_the_connection(daemon: FakeDaemon) -> None:
    daemon.set("vm_status", [Err("unknown_vm", "no such VM"), Ok(vm_status_result())])
    with client(daemon) as c:
        with pytest.raises(DaemonError):
            c.vm_status("nope")
        assert c.vm_status("gfs-node1").state == "on"
    assert daemon.connections == 1


def test_error_reply_with_null_id_is_a_daemon_error(daemon: FakeDaemon) -> None:
    daemon.set(
        "status", Raw(b'{"id":null,"ok":false,"error":{"code":"bad_request","message":"x"}}\n')
    )
    with client(daemon) as c, pytest.raises(DaemonError) as caught:
        c.call("status")
    assert caught.value.code == "bad_request"
    assert caught.value.vm is None


def test_missing_socket_is_unreachable(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.sock")
    with Client(path) as c, pytest.raises(DaemonUnreachable) as caught:
        c.call("status")
    assert caught.value.path == path
    assert "no such socket" in caught.value.reason


def test_socket_nobody_listens_on_is_unreachable(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))  # bound, never listening: what a crashed daemon leaves
        with Client(str(path)) as c, pytest.raises(DaemonUnreachable) as caught:
            c.call("status")
    assert "refused" in caught.value.reason


def test_path_too_long_for_a_unix_socket_is_unreachable(tmp_path: Path) -> None:
    with Client("/tmp/" + "x" * 200) as c, pytest.raises(DaemonUnreachable):
        c.call("status")


def test_silent_daemon_times_out_and_the_next_call_reconnects(daemon: FakeDaemon) -> None:
    daemon.set("fence", Hang())
    daemon.set("status", Ok(status_result()))
    with client(daemon, timeout_s=0.2) as c:
        with pytest.raises(DaemonTimeout) as caught:
            c.fence("node1", "off")
        assert (caught.value.op, caught.value.timeout_s) == ("fence", 0.2)
        assert "timed out" in str(caught.value)
        assert c.status().hosts[0].name == "esx1"
    assert daemon.connections == 2


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"not json\n", "not a JSON line"),
        (b"\xff\xfe\n", "not a JSON line"),
        (b"[1, 2]\n", "not an object"),
        (b'{"id": 1, "result": {}}\n', "no boolean 'ok'"),
        (b'{"id": 1, "ok": 1, "result": {}}\n', "no boolean 'ok'"),
        (b'{"id": 2, "ok": true, "result": {}}\n', "does not match"),
        (b'{"id": null, "ok": true, "result": {}}\n', "does not match"),
        (b'{"id": 1, "ok": true, "result": [1]}\n', "no 'result' object"),
        (b'{"id": 1, "ok": false}\n', "no 'error' object"),
        (b'{"id": 1, "ok": false, "error": {"code": 5, "message": "m"}}\n', "lacks string"),
        (b'{"id": 1, "ok": false, "error": {"code": "c", "message": "m", "vm": 3}}\n', "vm"),
        (b'{"id": 1, "ok": true, "result": {"x": NaN}}\n', "not a JSON line"),
        (b"[" * 100_000 + b"\n", "not a JSON line"),
    ],
)
def test_garbage_replies_are_protocol_violations(
    daemon: FakeDaemon, data: bytes, detail: str
) -> None:
    daemon.set("status", Raw(data))
    with client(daemon) as c, pytest.raises(ProtocolViolation) as caught:
        c.call("status")
    assert detail in caught.value.detail


def test_connection_closed_without_reply(daemon: FakeDaemon) -> None:
    daemon.set("fence", Close())
    with client(daemon) as c, pytest.raises(ProtocolViolation, match="closed before the reply"):
        c.fence("node1", "off")


def test_reply_size_is_bounded(daemon: FakeDaemon) -> None:
    daemon.set("status", Raw(b'{"pad": "' + b"x" * 200_000 + b'"}\n'))
    with (
        Client(str(daemon.path), max_reply_bytes=4096) as c,
        pytest.raises(ProtocolViolation, match="longer than 4096"),
    ):
        c.call("status")


def test_request_size_is_bounded(daemon: FakeDaemon) -> None:
    with client(daemon) as c, pytest.raises(ValueError, match="exceeds"):
        c.call("fence", vm="x" * 70_000, action="off")
    assert daemon.requests == []


@pytest.mark.parametrize(
    ("result", "fragment"),
    [
        ({**vm_status_result(), "state": "unknown"}, "neither 'on' nor 'off'"),
        ({**vm_status_result(), "cartel": True}, "'cartel'"),
        ({**vm_status_result(), "vm": None}, "'vm'"),
    ],
)
def test_vm_status_is_strict(result: dict[str, object], fragment: str) -> None:
    with pytest.raises(ProtocolViolation, match=fragment):
        parse_vm_status(result)


def test_fence_result_fields_are_typed() -> None:
    with pytest.raises(ProtocolViolation, match="joined"):
        parse_fence(fence_result(joined="yes"))
    with pytest.raises(ProtocolViolation, match="elapsed_ms"):
        parse_fence(fence_result(elapsed_ms="fast"))
    with pytest.raises(ProtocolViolation, match="finite"):
        parse_fence(fence_result(elapsed_ms=float("inf")))
    assert parse_fence({**fence_result(), "joined": None}).joined is False


def test_results_are_values_compared_by_type_and_fields() -> None:
    state = parse_vm_status(vm_status_result())
    same = VmState(vm="gfs-node1", state="on", host="esx1", cartel=68761)
    assert (state, hash(state)) == (same, hash(same))
    assert state != VmState(vm="gfs-node1", state="off", host="esx1", cartel=68761)
    assert state != ("gfs-node1", "on", "esx1", 68761)
    assert repr(state) == "VmState(vm='gfs-node1', state='on', host='esx1', cartel=68761)"
    assert len({state, same}) == 1


def test_status_parsing_accepts_the_documented_shape_and_new_keys() -> None:
    result = status_result()
    result["future"] = {"anything": 1}
    status = parse_status(result)
    assert [h.state for h in status.hosts] == ["up", "down"]
    assert status.hosts[1].reason == "connection refused"
    assert status.vms[1].cartel is None


@pytest.mark.parametrize(
    "broken",
    [
        {"daemon": None, "hosts": [], "vms": []},
        {**status_result(), "hosts": [1]},
        {**status_result(), "hosts": "esx1"},
        {**status_result(), "vms": [{"name": "a"}]},
    ],
)
def test_status_parsing_rejects_broken_shapes(broken: dict[str, object]) -> None:
    with pytest.raises(ProtocolViolation):
        parse_status(broken)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("gfs-node1", None),
        ("VM with spaces é", None),
        ("", "empty"),
        ("x" * 257, "longer than 256"),
        ("a\nb", "control"),
        ("a\x7fb", "control"),
    ],
)
def test_vm_name_problem(name: str, problem: str | None) -> None:
    found = vm_name_problem(name)
    assert found is None if problem is None else problem in (found or "")
