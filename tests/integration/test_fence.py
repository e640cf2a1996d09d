"""Fencing through the real daemon on the real-sshd lab: the safety rules, checked on the hosts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import (
    MODES,
    check_dead_host_fails,
    check_host_back,
    check_on_then_reboot,
    fence,
    fence_failure,
    fenced,
)
from tests.integration.socket_clients import child_output, fork_child
from tests.waiting import wait_for
from vmflab import Lab
from vmflab.daemon import LabDaemon

# Every test in both modes: through a shell and through vmfenced-host.
pytestmark = [pytest.mark.integration, pytest.mark.parametrize("lab_mode", MODES)]

ALIASES = {"node1": "gfs-node1", "node2": "gfs-node2", "node3": "gfs-node3"}


@pytest.fixture
def daemon(lab: Lab) -> Iterator[LabDaemon]:
    with LabDaemon(lab, aliases=ALIASES) as running:
        yield running


def test_off_kills_exactly_the_target_and_confirms(lab: Lab) -> None:
    esx1, esx2 = lab.hosts["esx1"], lab.hosts["esx2"]
    target = esx1.start_vm("gfs-node1")
    bystander = esx1.start_vm("gfs-node3")
    other = esx2.start_vm("gfs-node2")
    with LabDaemon(lab, aliases=ALIASES) as daemon:
        result = fenced(daemon, "node1", "killed")
        assert (result["host"], result["cartel"]) == ("esx1", target)
        assert result["joined"] is False
        # The daemon's word is checked against the host's real process table.
        assert not esx1.pid_alive(target)
        assert esx1.pid_alive(bystander)
        assert esx2.pid_alive(other)
        assert esx1.vm_pids() == {"gfs-node3": bystander}
        # Fencing it again: every host answers, none runs it.
        fenced(daemon, "gfs-node1", "already_off")


def test_vm_moved_after_inventory_is_found_and_killed(lab: Lab) -> None:
    esx1, esx3 = lab.hosts["esx1"], lab.hosts["esx3"]
    esx1.start_vm("gfs-node1")
    with LabDaemon(lab, aliases=ALIASES) as daemon:
        esx1.stop_vm("gfs-node1")
        esx1.unregister_vm("gfs-node1")
        moved = esx3.start_vm("gfs-node1")
        reply = fence(daemon, "node1")
        assert reply["ok"], reply
        assert (reply["result"]["host"], reply["result"]["cartel"]) == ("esx3", moved)
        assert not esx3.pid_alive(moved)


@pytest.mark.parametrize("intruder", ["another-vm", "unrelated-process"])
def test_reused_cartel_is_never_killed(lab: Lab, intruder: str) -> None:
    esx1 = lab.hosts["esx1"]
    old = esx1.start_vm("gfs-node1")
    with LabDaemon(lab, aliases=ALIASES) as daemon:
        esx1.stop_vm("gfs-node1")
        esx1.set_next_pid(old)
        if intruder == "another-vm":
            pid = esx1.start_vm("gfs-node2")
        else:
            pid = int(esx1.ssh("setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!").stdout)
        assert pid == old  # the map's cartel now belongs to another VM or program
        fenced(daemon, "node1", "already_off")
        assert esx1.pid_alive(pid)
        # The guard itself refused: the stale cartel was tried, not skipped.
        assert '"outcome": "not-that-vm"' in daemon.log()


def test_dead_host_fails_the_fence_then_recovers(lab: Lab) -> None:
    esx2 = lab.hosts["esx2"]
    vm = esx2.start_vm("gfs-node2")
    with LabDaemon(lab, aliases=ALIASES) as daemon:
        check_dead_host_fails(daemon, esx2, "node2", "gfs-node1-never-started")
        assert wait_for(lambda: daemon.host_state("esx2") == "down")
        check_host_back(daemon, esx2, "node2", vm)


def test_concurrent_fences_of_one_vm_run_once(lab: Lab) -> None:
    esx1 = lab.hosts["esx1"]
    vm = esx1.start_vm("gfs-node1")
    with LabDaemon(lab, aliases=ALIASES) as daemon, ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: fence(daemon, "node1"), range(8)))
    assert all(r["ok"] for r in replies), replies
    started = [
        r for r in replies if not r["result"]["joined"] and r["result"]["outcome"] == "killed"
    ]
    assert len(started) == 1
    assert all(r["result"]["outcome"] in ("killed", "already_off") for r in replies)
    assert not esx1.pid_alive(vm)


def test_unknown_vm(daemon: LabDaemon) -> None:
    reply = fence(daemon, "no-such-vm")
    assert reply["error"]["code"] == "unknown_vm"
    assert reply["error"]["vm"] == "no-such-vm"


def test_vm_status_is_live(lab: Lab) -> None:
    esx1 = lab.hosts["esx1"]
    esx1.start_vm("gfs-node1")
    with LabDaemon(lab, aliases=ALIASES) as daemon:
        on = daemon.request({"op": "vm_status", "vm": "node1"})
        assert on["result"]["state"] == "on" and on["result"]["host"] == "esx1"
        esx1.stop_vm("gfs-node1")  # behind the daemon's back: the cache still says on
        off = daemon.request({"op": "vm_status", "vm": "node1"})
        assert off["result"]["state"] == "off", off


def test_on_and_reboot(lab: Lab) -> None:
    esx2 = lab.hosts["esx2"]
    esx2.create_vm("gfs-node2")
    with LabDaemon(lab, aliases=ALIASES) as daemon:
        check_on_then_reboot(daemon, "node2", esx2, "gfs-node2")


def test_status_lists_hosts_and_vms(lab: Lab) -> None:
    lab.hosts["esx1"].start_vm("gfs-node1", world_offset=2)
    lab.hosts["esx3"].create_vm("gfs-node3")
    with LabDaemon(lab, aliases=ALIASES) as daemon:
        status = daemon.status()
    assert [h["name"] for h in status["hosts"]] == ["esx1", "esx2", "esx3"]
    assert all(h["state"] == "up" and h["rtt_ms"] is not None for h in status["hosts"])
    vms = {vm["name"]: vm for vm in status["vms"]}
    assert vms["gfs-node1"]["alias"] == "node1" and vms["gfs-node1"]["state"] == "on"
    assert vms["gfs-node1"]["world"] == vms["gfs-node1"]["cartel"] + 2
    assert vms["gfs-node3"]["state"] == "off" and vms["gfs-node3"]["host"] == "esx3"


def raw_exchange(path: str, payload: bytes) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_bad_requests_get_errors_and_others_are_still_served(daemon: LabDaemon) -> None:
    path = str(daemon.socket)
    replies = raw_exchange(path, b'garbage\n{"op":"nope","id":1}\n{"op":"status","id":2}\n')
    assert [r.get("error", {}).get("code") for r in replies] == ["bad_request", "unknown_op", None]
    assert replies[2]["id"] == 2 and replies[2]["ok"]
    (too_large,) = raw_exchange(path, b'{"op":"status","pad":"' + b"x" * 70000 + b'"}\n')
    assert too_large["error"]["code"] == "too_large"
    assert daemon.status()["daemon"]["pid"] == daemon.proc.pid if daemon.proc else False


def ask_as(uid: int, path: str) -> bytes:
    """One status request from a forked child running as `uid`; returns the reply line."""
    read_end, write_end = os.pipe()

    def child() -> None:
        os.close(read_end)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            # The refusal is sent at connect time; the daemon may close before we write.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(b'{"op":"status"}\n')
            os.write(write_end, sock.makefile("rb").readline())

    pid = fork_child(child, lambda exc: os.write(write_end, f"child: {exc!r}".encode()))
    os.close(write_end)
    return child_output(pid, read_end)


def test_unauthorised_uid_is_refused(lab: Lab) -> None:
    with LabDaemon(lab, daemon={"socket_mode": "0666"}) as daemon:
        daemon.dir.chmod(0o711)
        reply = json.loads(ask_as(65534, str(daemon.socket)))
        assert reply["error"]["code"] == "permission_denied"
        assert "uid 65534" in reply["error"]["message"]
        # Root's own request on another connection is still served.
        assert daemon.status()["hosts"]


def test_socket_file_mode(daemon: LabDaemon) -> None:
    assert oct(daemon.socket.stat().st_mode & 0o777) == "0o660"


def test_hung_host_times_out_as_a_failure(lab: Lab) -> None:
    esx2 = lab.hosts["esx2"]
    esx2.start_vm("gfs-node2")
    with LabDaemon(lab, aliases=ALIASES, daemon={"fence_timeout": 1.5}) as daemon:
        frozen = [pid for pid in esx2.namespace_pids() if pid != esx2.init_pid]
        (vm,) = [p for p in frozen if b"gfs-node2.vmx" in cmdline(p)]
        try:
            for pid in frozen:  # TCP stays open, nothing answers
                with contextlib.suppress(ProcessLookupError):  # it may exit meanwhile
                    os.kill(pid, signal.SIGSTOP)
            assert "fence_timeout" in fence_failure(daemon, "node2")
            # Failure was reported while the VM still existed (stopped, seen from outside).
            assert Path(f"/proc/{vm}/stat").read_text().split(") ")[1][0] == "T"
        finally:
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        # A guarded kill that was already in the frozen host's socket buffer may still run
        # after the thaw: that late kill of the target is harmless; a late success is not.


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""  # exited meanwhile
