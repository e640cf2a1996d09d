"""Faults injected on the real lab; every scenario ends with the invariant checked on the hosts."""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.faults.conftest import (
    FAST_KEEPALIVE,
    Ledger,
    check_hung_host,
    fence_when_up,
    fence_where_it_moved,
)
from tests.integration.conftest import MODES, fence, fence_failure
from tests.waiting import wait_until
from vmflab import Lab, LabHost
from vmflab.daemon import LabDaemon
from vmflab.procs import outer_pid, stopped

# Every scenario in both modes: through a shell and through vmfenced-host.
pytestmark = [pytest.mark.faults, pytest.mark.parametrize("lab_mode", MODES)]

FREEZER = Path("/sys/fs/cgroup/freezer")


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """A process in a frozen cgroup-v1 freezer: a SIGKILL stays pending until the thaw."""
    group = FREEZER / f"vmf-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cgroup.procs").write_text(str(pid))
        (group / "freezer.state").write_text("FROZEN")
        wait_until(lambda: (group / "freezer.state").read_text().strip() == "FROZEN", 10)
        yield
    finally:
        (group / "freezer.state").write_text("THAWED")
        with contextlib.suppress(OSError):
            for line in (group / "cgroup.procs").read_text().split():
                (FREEZER / "cgroup.procs").write_text(line)
        wait_until(lambda: not (group / "cgroup.procs").read_text().strip(), 10)
        group.rmdir()


def test_hung_host(lab: Lab, ledger: Ledger) -> None:
    """every process of esx2 SIGSTOPped, then thawed"""
    hung, well = (lab.hosts["esx2"], "gfs-node2"), (lab.hosts["esx1"], "gfs-node1")
    # Bound: keepalive_interval x (keepalive_count_max + 1) = 1.5 s, plus scheduling slack.
    check_hung_host(lab, ledger, hung=hung, well=well, down_within_s=1.5 * 3)


def test_dead_host_during_fence(lab: Lab, ledger: Ledger) -> None:
    """sshd of esx2 killed while a fence of its VM waits on a frozen VM"""
    esx2 = lab.hosts["esx2"]
    ledger.start(esx2, "gfs-node2")
    bystander = lab.hosts["esx3"]
    ledger.start(bystander, "gfs-node3")
    with LabDaemon(lab, daemon={"fence_timeout": 3}) as daemon, ThreadPoolExecutor(1) as pool:
        with frozen(outer_pid(esx2, "gfs-node2")):
            ledger.target("esx2", "gfs-node2")
            pending = pool.submit(fence, daemon, "gfs-node2")
            wait_until(lambda: '"op": "fence"' in daemon.log())  # the kill is on its way
            esx2.stop_sshd()
            reply = ledger.timed(lambda: pending.result(timeout=30))
            assert not reply["ok"] and reply["error"]["code"] == "fence_failed", reply
        esx2.start_sshd()
    ledger.outcome = f"fence_failed: {reply['error']['message'][:60]}"
    ledger.check()


def test_vm_restarted_between_inventory_and_fence(lab: Lab, ledger: Ledger) -> None:
    """VM restarted on the same host (new cartel) after the inventory"""
    esx1 = lab.hosts["esx1"]
    ledger.start(esx1, "gfs-node1")
    ledger.start(esx1, "gfs-node3")
    with LabDaemon(lab) as daemon:
        esx1.stop_vm("gfs-node1")
        ledger.start(esx1, "gfs-node1")
        reply = ledger.timed(lambda: fence(daemon, "gfs-node1"))
        assert reply["ok"] and reply["result"]["outcome"] == "killed", reply
        assert reply["result"]["cartel"] == ledger.vms[("esx1", "gfs-node1")][1]
        ledger.succeeded("esx1", "gfs-node1")
    ledger.outcome = "killed the new instance"
    ledger.check()


def test_vm_refuses_to_die(lab: Lab, ledger: Ledger) -> None:
    """VM in a frozen cgroup: kill -9 stays pending past fence_timeout"""
    esx1 = lab.hosts["esx1"]
    ledger.start(esx1, "gfs-node1")
    ledger.start(esx1, "gfs-node3")
    with LabDaemon(lab, daemon={"fence_timeout": 2}) as daemon:
        with frozen(outer_pid(esx1, "gfs-node1")):
            ledger.target("esx1", "gfs-node1")
            message = ledger.timed(lambda: fence_failure(daemon, "gfs-node1"))
            assert "still running after kill -9" in message or "fence_timeout" in message
        # Thawed, the pending SIGKILL lands: the next fence tells the truth.
        reply = fence(daemon, "gfs-node1")
        assert reply["ok"] and reply["result"]["outcome"] == "already_off", reply
        ledger.succeeded("esx1", "gfs-node1")
    ledger.outcome = f"fence_failed: {message[:50]}"
    ledger.check()


def test_daemon_killed_mid_fence(lab: Lab, ledger: Ledger) -> None:
    """daemon SIGKILLed while a fence waits for a VM to die, then restarted"""
    esx2 = lab.hosts["esx2"]
    ledger.start(esx2, "gfs-node2")
    ledger.start(lab.hosts["esx1"], "gfs-node1")
    daemon = LabDaemon(lab, daemon={"fence_timeout": 5}).start()
    try:
        with ThreadPoolExecutor(1) as pool, frozen(outer_pid(esx2, "gfs-node2")):
            ledger.target("esx2", "gfs-node2")
            pending = pool.submit(fence, daemon, "gfs-node2")
            wait_until(lambda: '"op": "fence"' in daemon.log())
            daemon.kill()
            with pytest.raises((ConnectionError, ValueError, OSError)):
                pending.result(timeout=30)  # the client saw no success
        start = time.monotonic()
        daemon.start()
        reply = fence(daemon, "gfs-node2")
        ledger.seconds = time.monotonic() - start
        assert reply["ok"], reply
        ledger.succeeded("esx2", "gfs-node2")
        ledger.outcome = f"restarted; repeated fence: {reply['result']['outcome']}"
    finally:
        daemon.close()
    ledger.check()


def test_hundred_concurrent_requests(lab: Lab, ledger: Ledger) -> None:
    """100 concurrent fences: 20 VMs on 3 hosts, 5 clients each"""
    hosts = list(lab.hosts.values())
    for i in range(20):
        ledger.start(hosts[i % 3], f"vm{i}")
    for i in range(6):
        ledger.start(hosts[i % 3], f"keep{i}")
    with LabDaemon(lab) as daemon, ThreadPoolExecutor(100) as pool:
        start = time.monotonic()
        replies = list(pool.map(lambda i: fence(daemon, f"vm{i % 20}"), range(100)))
        ledger.seconds = time.monotonic() - start
    assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]]
    for i in range(20):
        mine = [r["result"] for r in replies if r["result"]["vm"] == f"vm{i}"]
        started = [r for r in mine if r["outcome"] == "killed" and not r["joined"]]
        assert len(started) == 1, (
            mine
        )  # one kill per VM, every other request joined or found it off
        ledger.succeeded(hosts[i % 3].name, f"vm{i}")
    ledger.outcome = "each VM killed once; all 100 succeeded"
    ledger.check()


def test_host_key_changed(lab: Lab, ledger: Ledger) -> None:
    """esx2 restarted with a new host key that known_hosts does not have"""
    esx2 = lab.hosts["esx2"]
    ledger.start(esx2, "gfs-node2")
    ledger.start(lab.hosts["esx1"], "gfs-node1")
    with LabDaemon(lab) as daemon:
        esx2.rekey(trust=False)
        ledger.seconds = wait_until(
            lambda: "host key not verifiable" in (host_reason(daemon, "esx2") or "")
        )
        ledger.target("esx2", "gfs-node2")
        fence_failure(daemon, "gfs-node2")
        assert daemon.host_state("esx2") == "down"
    lab.write_known_hosts()  # the lab's own ssh trusts the new key again, for the check
    ledger.outcome = "refused to connect; status says why; fence failed"
    ledger.check()


def host_reason(daemon: LabDaemon, name: str) -> str | None:
    for host in daemon.status()["hosts"]:
        if host["name"] == name:
            return host["reason"]  # type: ignore[no-any-return]
    raise KeyError(name)


def test_hung_inventory_does_not_delay_fences(lab: Lab, ledger: Ledger) -> None:
    """hostd of esx1 hung (vim-cmd and esxcli block for an hour) while its VMs are fenced"""
    esx1, esx2 = lab.hosts["esx1"], lab.hosts["esx2"]
    for i in range(8):
        ledger.start(esx1, f"a{i}")
        ledger.start(esx2, f"b{i}")
    ledger.start(esx1, "keep1")
    with LabDaemon(lab, daemon={"inventory_interval": 1}) as daemon:
        esx1.ssh("echo 3600 > /vmfs/.lab/run/hostd-delay")
        # The next inventory round of esx1 is now stuck in vim-cmd on its inventory lane.
        wait_until(lambda: stuck(daemon, "esx1"))
        hung: list[float] = []
        normal: list[float] = []
        for i in range(8):
            for host, name, times in ((esx1, f"a{i}", hung), (esx2, f"b{i}", normal)):
                reply = fence(daemon, name)
                assert reply["ok"] and reply["result"]["outcome"] == "killed", reply
                times.append(reply["result"]["elapsed_ms"])
                ledger.succeeded(host.name, name)
        # An hour-long listing is not on the fence lane: fences there take what they take anywhere.
        assert max(hung) < 1000, hung
        esx1.ssh("rm -f /vmfs/.lab/run/hostd-delay")
    hung.sort()
    normal.sort()
    ledger.seconds = hung[len(hung) // 2] / 1000
    ledger.outcome = (
        f"all fenced; median {hung[len(hung) // 2]:.1f} ms on the hung host, "
        f"{normal[len(normal) // 2]:.1f} ms on a normal one"
    )
    ledger.check()


def stuck(daemon: LabDaemon, host: str) -> bool:
    """True once the host's inventory is older than a couple of its intervals."""
    for entry in daemon.status()["hosts"]:
        if entry["name"] == host:
            age = entry["inventory_age_s"]
            return age is not None and age > 3
    return False


@contextlib.contextmanager
def network_cut(host: LabHost) -> Iterator[None]:
    """Packets to the host's sshd dropped (not refused): TCP stalls, as when a link goes down."""
    rule = ["-d", host.address, "-p", "tcp", "--dport", str(host.port), "-j", "DROP"]
    subprocess.run(["iptables", "-I", "INPUT", *rule], check=True)
    try:
        yield
    finally:
        subprocess.run(["iptables", "-D", "INPUT", *rule], check=True)


def fails_while(
    lab: Lab, ledger: Ledger, fault: Callable[[LabHost], contextlib.AbstractContextManager[object]]
) -> None:
    """A fence of esx2's VM is under way (the VM frozen, so its death takes a while) when
    `fault` strikes esx2: the fence must fail, the host go down, and come back after."""
    esx2 = lab.hosts["esx2"]
    ledger.start(esx2, "gfs-node2")
    ledger.start(lab.hosts["esx1"], "gfs-node1")
    settings = {"ssh": FAST_KEEPALIVE, "daemon": {"fence_timeout": 3}}
    with LabDaemon(lab, **settings) as daemon, ThreadPoolExecutor(1) as pool:
        with frozen(outer_pid(esx2, "gfs-node2")):
            ledger.target("esx2", "gfs-node2")
            pending = pool.submit(fence, daemon, "gfs-node2")
            wait_until(lambda: '"op": "fence"' in daemon.log())
            with fault(esx2):
                reply = ledger.timed(lambda: pending.result(timeout=30))
                assert not reply["ok"] and reply["error"]["code"] == "fence_failed", reply
                wait_until(lambda: daemon.host_state("esx2") == "down")
        fence_when_up(daemon, ledger, down="esx2", host="esx1", vm="gfs-node1")
    ledger.outcome = "fence_failed; host down meanwhile, up again after"
    ledger.check()


def test_network_cut_during_a_fence(lab: Lab, ledger: Ledger) -> None:
    """packets to esx2 dropped while a fence of its VM waits on a frozen VM"""
    fails_while(lab, ledger, network_cut)


def test_host_hung_during_a_fence(lab: Lab, ledger: Ledger) -> None:
    """every process of esx2 SIGSTOPped while a fence of its VM waits on a frozen VM"""
    fails_while(lab, ledger, stopped)


def test_vm_migrated_between_inventory_and_fence(lab: Lab, ledger: Ledger) -> None:
    """VM shut off on esx1 and started on esx3 after the inventory"""
    esx1, esx3 = lab.hosts["esx1"], lab.hosts["esx3"]
    ledger.start(esx1, "gfs-node1")
    ledger.start(esx1, "keep1")
    with LabDaemon(lab) as daemon:
        esx1.stop_vm("gfs-node1")
        esx1.unregister_vm("gfs-node1")
        ledger.target("esx1", "gfs-node1")
        fence_where_it_moved(daemon, ledger, esx3, "gfs-node1")
    ledger.outcome = "found and killed on esx3"
    ledger.check()


@pytest.mark.parametrize("intruder", ["another VM", "an unrelated process"])
def test_cartel_reused(lab: Lab, ledger: Ledger, intruder: str) -> None:
    """the VM's old cartel ID reused (ns_last_pid) after the inventory"""
    esx1 = lab.hosts["esx1"]
    old = ledger.start(esx1, "gfs-node1")
    with LabDaemon(lab) as daemon:
        esx1.stop_vm("gfs-node1")
        ledger.target("esx1", "gfs-node1")
        esx1.set_next_pid(old)
        if intruder == "another VM":
            assert ledger.start(esx1, "gfs-node2") == old
        else:
            pid = int(esx1.ssh("setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!").stdout)
            assert pid == old
            ledger.track(esx1, "sleep", pid)
        reply = ledger.timed(lambda: fence(daemon, "gfs-node1"))
        assert reply["ok"] and reply["result"]["outcome"] == "already_off", reply
        assert '"outcome": "not-that-vm"' in daemon.log()
        ledger.succeeded("esx1", "gfs-node1")
    ledger.injected = f"the VM's old cartel ID reused by {intruder} (ns_last_pid)"
    ledger.outcome = "guard refused; already_off; intruder alive"
    ledger.check()
