"""Off only on positive evidence, on the real-sshd lab: each case once answered success (or OFF)
while the VM ran. Every check of "runs" / "dead" reads the lab host's own process table."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.integration.conftest import fence
from tests.waiting import wait_until
from vmflab import Lab
from vmflab.daemon import LabDaemon, render_config
from vmflab.procs import stopped

pytestmark = pytest.mark.integration


def vm_status(daemon: LabDaemon, vm: str) -> dict[str, Any]:
    return daemon.request({"op": "vm_status", "vm": vm})


def test_vm_moved_to_a_host_missing_from_the_config_is_not_off(lab: Lab) -> None:
    """DRS/vMotion or an HA restart onto esx3, which the config does not name."""
    esx1, esx3 = lab.hosts["esx1"], lab.hosts["esx3"]
    esx1.start_vm("gfs-node1")
    with LabDaemon(lab, hosts=["esx1", "esx2"]) as daemon:
        assert fence(daemon, "gfs-node1", "on")["result"]["outcome"] == "already_on"
        # The move: the VM runs on esx3, and esx1 no longer has it (stopped, unregistered).
        cartel = esx3.start_vm("gfs-node1")
        esx1.stop_vm("gfs-node1")
        esx1.unregister_vm("gfs-node1")
        reply = fence(daemon, "gfs-node1")
        assert not reply["ok"] and reply["error"]["code"] == "fence_failed", reply
        assert "missing from the configuration" in reply["error"]["message"]
        status = vm_status(daemon, "gfs-node1")
        assert not status["ok"], status  # never OFF
        assert esx3.pid_alive(cartel)


def test_registered_powered_off_vm_is_off_with_evidence(lab: Lab) -> None:
    """A VM registered after the daemon's last registration listing: asked live, not unknown."""
    esx1 = lab.hosts["esx1"]
    esx1.start_vm("gfs-node1")
    with LabDaemon(lab) as daemon:
        esx1.create_vm("late-vm")  # registered, never powered on
        status = vm_status(daemon, "late-vm")
        assert status["ok"] and status["result"]["state"] == "off", status
        reply = fence(daemon, "late-vm")
        assert reply["ok"] and reply["result"]["outcome"] == "already_off", reply
        reply = fence(daemon, "late-vm", "on")
        assert reply["ok"] and reply["result"]["outcome"] == "powered_on", reply
        assert "late-vm" in esx1.vm_pids()


def test_unreachable_host_that_held_the_vm_fails_a_kill_elsewhere(lab: Lab) -> None:
    """HA restarted the VM on esx1 while esx2, where the map placed it, is isolated."""
    esx1, esx2 = lab.hosts["esx1"], lab.hosts["esx2"]
    old = esx2.start_vm("gfs-node2")
    esx1.start_vm("gfs-node1")
    with LabDaemon(
        lab, ssh={"keepalive_interval": 0.5, "keepalive_count_max": 2}, daemon={"fence_timeout": 3}
    ) as daemon:
        with stopped(esx2):
            wait_until(lambda: daemon.host_state("esx2") == "down")
            copy = esx1.start_vm("gfs-node2")
            reply = fence(daemon, "gfs-node2")
            assert not reply["ok"] and reply["error"]["code"] == "fence_failed", reply
            assert "esx2" in reply["error"]["message"]
            assert "stonith_admin --confirm" in reply["error"]["message"]
            status = daemon.status()
            states = {(v["name"], v["host"]): v["state"] for v in status["vms"]}
            assert states[("gfs-node2", "esx2")] == "unconfirmable"
        assert esx2.pid_alive(old)
        # Nothing was killed on a guess: the copy on esx1 runs on.
        assert esx1.pid_alive(copy)


def test_on_after_a_reload_points_the_host_at_another_machine(lab: Lab) -> None:
    """vmid 1 names gfs-x on esx1 and another VM on esx2; the host name 'esx1' moves to esx2."""
    esx1, esx2 = lab.hosts["esx1"], lab.hosts["esx2"]
    esx1.create_vm("gfs-x")
    esx2.create_vm("unrelated")
    with LabDaemon(lab, hosts=["esx1"]) as daemon:
        assert vm_status(daemon, "gfs-x")["result"]["state"] == "off"
        config = render_config(lab, daemon.socket, hosts=["esx1"])
        config = config.replace(f'"{esx1.address}"', f'"{esx2.address}"')
        config = config.replace(f"port = {esx1.port}", f"port = {esx2.port}")
        daemon.config_path.write_text(config)
        reload = daemon.request({"op": "reload"})
        assert reload["ok"] and reload["result"]["replaced"] == ["esx1"], reload
        reply = fence(daemon, "gfs-x", "on")
        assert not reply["ok"], reply
        assert "not registered" in reply["error"]["message"]
        assert "unrelated" not in esx2.vm_pids()


def test_reboot_answers_off_only_when_power_on_outlives_its_budget(lab: Lab) -> None:
    """hostd takes 3 s to power on, on_timeout is 1 s: the node is fenced, the answer prompt;
    the power-on goes on, and an off right after waits for it instead of saying already off."""
    esx1 = lab.hosts["esx1"]
    esx1.start_vm("gfs-node1")
    with LabDaemon(lab, daemon={"on_timeout": 1, "fence_timeout": 10}) as daemon:
        esx1.ssh("echo 3 > /vmfs/.lab/run/hostd-delay")
        start = time.monotonic()
        reply = fence(daemon, "gfs-node1", "reboot")
        answered = time.monotonic() - start
        assert reply["ok"] and reply["result"]["outcome"] == "off_only", reply
        assert "on_timeout" in reply["result"]["warning"]
        assert answered < 3, answered  # not the 3.4 s hostd takes
        # elapsed_ms is the whole request's time, not the off half's.
        assert reply["result"]["elapsed_ms"] >= 1000
        with ThreadPoolExecutor(1) as pool:
            later = pool.submit(fence, daemon, "gfs-node1").result(timeout=30)
        esx1.ssh("rm -f /vmfs/.lab/run/hostd-delay")
        # The power-on finished first; this off found it running and killed it.
        assert later["ok"] and later["result"]["outcome"] == "killed", later
        assert "gfs-node1" not in esx1.vm_pids()


def test_a_host_whose_listing_cannot_be_read_fails_fences_elsewhere(lab: Lab) -> None:
    """esx2 runs a VM whose display name no line can carry, and now a twin of gfs-node1 the
    daemon never saw: the old listing of esx2 says nothing of now (the generator found it)."""
    esx1, esx2 = lab.hosts["esx1"], lab.hosts["esx2"]
    esx1.start_vm("gfs-node1")
    with LabDaemon(lab) as daemon:
        esx2.start_vm(esx2.create_vm("tenant", display_name="tenant\u2028x"))
        twin = esx2.start_vm("gfs-node1")
        reply = fence(daemon, "gfs-node1")
        assert not reply["ok"] and reply["error"]["code"] == "fence_failed", reply
        assert "esx2" in reply["error"]["message"]
        assert "cannot be read" in reply["error"]["message"]
        assert esx2.pid_alive(twin)
        hosts = {h["name"]: h for h in daemon.status()["hosts"]}
        assert "U+2028" in (hosts["esx2"]["listing_problem"] or "")
