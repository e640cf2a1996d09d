"""A dedicated fencing network: SSH connections bound to `source_address`, and a host reachable
on two loopback addresses whose primary is cut (its sshd restarts listening on the fallback
only, so connections to the primary are refused): the lanes move to the fallback, fences keep
working, status shows the address in use, and once the primary is back a reconnect uses it."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import lab_unavailable
from tests.waiting import wait_for
from vmfenced.clients.ctl import render_status
from vmflab import Lab, LabHost
from vmflab.daemon import LabDaemon

pytestmark = pytest.mark.integration

LANES = ("fence", "inventory")


@pytest.fixture
def dual_lab(tmp_path: Path) -> Iterator[Lab]:
    """An ESXi host (esx1) and a dual-homed esx-classic host (esx3a)."""
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    with Lab(
        tmp_path / "lab", host_names=("esx1",), classic_hosts=("esx3a",), dual_homed=("esx3a",)
    ) as started:
        yield started


def host_status(daemon: LabDaemon, name: str) -> dict[str, Any]:
    for host in daemon.status()["hosts"]:
        if host["name"] == name:
            return dict(host)
    raise KeyError(name)


def on_address(daemon: LabDaemon, name: str, address: str) -> bool:
    host = host_status(daemon, name)
    return bool(
        host["state"] == "up" and host["connected_address"] == dict.fromkeys(LANES, address)
    )


def start_daemon(lab: Lab, host: LabHost, source: str) -> LabDaemon:
    daemon = LabDaemon(lab, aliases={"gfs1": "node1"}, ssh={"source_address": source})
    fallbacks = ", ".join(f'"{a}"' for a in host.fallback_addresses)
    assert f"fallback_addresses = [{fallbacks}]" in daemon.config_path.read_text()
    return daemon


def test_lanes_move_to_the_fallback_and_fences_keep_working(dual_lab: Lab) -> None:
    host = dual_lab.hosts["esx3a"]
    (fallback,) = host.fallback_addresses
    source = f"127.88.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
    target = host.start_vm("node1")
    bystander = host.start_vm("node2")
    daemon = start_daemon(dual_lab, host, source)
    try:
        # The lab's own ssh commands come from 127.0.0.1: look only at the daemon's connections.
        before = {
            name: len(dual_lab.hosts[name].files.log_tail(10**7)) for name in ("esx1", "esx3a")
        }
        daemon.start()
        assert wait_for(lambda: on_address(daemon, "esx3a", host.address))
        assert wait_for(lambda: on_address(daemon, "esx1", dual_lab.hosts["esx1"].address))
        # Every connection left from the configured source address.
        for name in ("esx1", "esx3a"):
            log = dual_lab.hosts[name].files.log_tail(10**7)[before[name] :]
            accepted = [line for line in log.splitlines() if "Accepted publickey" in line]
            assert len(accepted) >= 2, log  # the fence and the inventory lane
            assert all(f" from {source} port " in line for line in accepted), accepted

        host.cut_primary()
        assert wait_for(lambda: on_address(daemon, "esx3a", fallback))
        status = daemon.status()
        rendered = render_status(status, time.time())
        assert f"{fallback}:{host.port} (fallback)" in rendered
        reply = daemon.request({"op": "fence", "vm": "gfs1", "action": "off"})
        assert reply["ok"], reply
        result = reply["result"]
        assert (result["outcome"], result["host"], result["cartel"]) == ("killed", "esx3a", target)
        assert host.vm_pids() == {"node2": bystander}

        # Back on every address: the next reconnect (sshd restarted) tries the primary first.
        host.restore_primary()
        assert wait_for(lambda: on_address(daemon, "esx3a", host.address))
        assert "(fallback)" not in render_status(daemon.status(), time.time())
    finally:
        daemon.close()


def test_a_fallback_with_an_unknown_host_key_is_refused(dual_lab: Lab) -> None:
    host = dual_lab.hosts["esx3a"]
    (fallback,) = host.fallback_addresses
    daemon = start_daemon(dual_lab, host, "127.0.0.1")
    # known_hosts vouches for the primary address only.
    key_type, key = host.files.host_public_key()
    lines = dual_lab.known_hosts.read_text().splitlines()
    kept = [line for line in lines if f"[{fallback}]" not in line]
    kept.append(f"[{host.address}]:{host.port} {key_type} {key}")
    dual_lab.known_hosts.write_text("\n".join(kept) + "\n")
    try:
        daemon.start()
        assert wait_for(lambda: on_address(daemon, "esx3a", host.address))
        host.cut_primary()

        def refused() -> bool:
            status = host_status(daemon, "esx3a")
            reason = status["reason"] or ""
            return (
                status["state"] == "down"
                and f"{fallback}: host key not verifiable" in reason
                and f"{host.address}: connection refused" in reason
            )

        assert wait_for(refused), host_status(daemon, "esx3a")
        reply = daemon.request({"op": "fence", "vm": "nosuchvm", "action": "off"})
        assert not reply["ok"]
    finally:
        daemon.close()
