"""Reload on the real-sshd lab: hosts come and go, unchanged hosts keep their SSH connections,
a bad config changes nothing, and a fence in flight finishes on the host being removed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import ctl, sshd_sessions
from tests.waiting import wait_for
from vmflab import Lab
from vmflab.daemon import LabDaemon, render_config

pytestmark = pytest.mark.integration


def hosts_by_name(daemon: LabDaemon) -> dict[str, dict[str, Any]]:
    return {h["name"]: h for h in daemon.status()["hosts"]}


def all_up(daemon: LabDaemon) -> bool:
    return all(
        h["lanes"] == {"fence": "up", "inventory": "up"} for h in hosts_by_name(daemon).values()
    )


@pytest.fixture
def state(tmp_path: Path) -> str:
    return str(tmp_path / "state")


@pytest.fixture
def rewrite(lab: Lab, state: str) -> Iterator[Callable[..., None]]:
    def write(running: LabDaemon, /, **config: Any) -> None:
        keys = {"state_directory": state, **config.pop("daemon", {})}
        running.config_path.write_text(render_config(lab, running.socket, daemon=keys, **config))

    yield write


def test_reload_adds_and_removes_hosts_and_keeps_unchanged_links(
    lab: Lab, state: str, rewrite: Callable[..., None]
) -> None:
    esx1, esx2, esx3 = (lab.hosts[n] for n in ("esx1", "esx2", "esx3"))
    esx3.start_vm("gfs-node3")
    with LabDaemon(
        lab,
        hosts=["esx1", "esx2"],
        aliases={"node1": "gfs-node1"},
        daemon={"state_directory": state},
    ) as daemon:
        assert wait_for(lambda: all_up(daemon))
        before = hosts_by_name(daemon)["esx1"]
        sessions = sshd_sessions(esx1)
        assert len(sessions) >= 2  # one connection per lane
        assert sshd_sessions(esx2)

        rewrite(daemon, hosts=["esx1", "esx3"], aliases={"node3": "gfs-node3"})
        code, out, err = ctl(daemon, "reload", "--json")
        assert (code, err) == (0, ""), daemon.log()
        result = json.loads(out)
        assert (result["added"], result["removed"], result["replaced"]) == (["esx3"], ["esx2"], [])
        assert (result["unchanged"], result["settings"]) == (["esx1"], ["aliases"])

        hosts = hosts_by_name(daemon)
        assert sorted(hosts) == ["esx1", "esx3"]
        # esx1: the same lanes, never down, the very same SSH connections on the host.
        assert hosts["esx1"]["since"] == before["since"]
        assert hosts["esx1"]["state"] == "up"
        assert sshd_sessions(esx1) == sessions
        metrics = daemon.request({"op": "metrics"})["result"]["text"]
        assert 'vmfenced_link_reconnects_total{host="esx1",lane="fence"} 0.0' in metrics
        assert 'host="esx2"' not in metrics
        # esx3 settled before the swap; the new alias fences its VM there.
        assert hosts["esx3"]["state"] == "up"
        reply = daemon.request({"op": "fence", "vm": "node3"})
        assert reply["ok"] and reply["result"]["host"] == "esx3", reply
        # esx2's connections are closed (its sshd sessions end).
        assert wait_for(lambda: not sshd_sessions(esx2))


def test_ssh_change_replaces_only_that_host(
    lab: Lab, state: str, rewrite: Callable[..., None]
) -> None:
    with LabDaemon(lab, daemon={"state_directory": state}) as daemon:
        assert wait_for(lambda: all_up(daemon))
        sessions = {n: sshd_sessions(lab.hosts[n]) for n in ("esx1", "esx2", "esx3")}
        config = render_config(lab, daemon.socket, daemon={"state_directory": state})
        # A per-host override: esx2 alone gets new connections.
        marker = f"port = {lab.hosts['esx2'].port}\n"
        daemon.config_path.write_text(config.replace(marker, marker + "connect_timeout = 4\n"))
        code, out, err = ctl(daemon, "reload", "--json")
        assert code == 0, err
        result = json.loads(out)
        assert (result["replaced"], result["unchanged"]) == (["esx2"], ["esx1", "esx3"])
        assert sshd_sessions(lab.hosts["esx1"]) == sessions["esx1"]
        assert sshd_sessions(lab.hosts["esx3"]) == sessions["esx3"]
        assert wait_for(lambda: not sshd_sessions(lab.hosts["esx2"]) & sessions["esx2"])
        assert hosts_by_name(daemon)["esx2"]["state"] == "up"


def test_bad_config_changes_nothing_and_says_why(
    lab: Lab, state: str, rewrite: Callable[..., None]
) -> None:
    with LabDaemon(lab, daemon={"state_directory": state}) as daemon:
        good = daemon.config_path.read_text()
        daemon.config_path.write_text(good.replace("fence_timeout = 5", "fence_timeout = -1"))
        code, out, err = ctl(daemon, "reload")
        assert (code, out) == (1, "")
        assert err == (
            "vmfencectl: daemon error reload_failed: configuration NOT changed: "
            f"{daemon.config_path}: daemon.fence_timeout: Input should be greater than 0\n"
        )
        rewrite(daemon, daemon={"socket": str(daemon.dir / "other.sock")})
        code, _, err = ctl(daemon, "reload")
        assert code == 1
        assert f"daemon.socket: cannot change while vmfenced runs ({daemon.socket} -> " in err
        daemon.config_path.write_text("not toml [")
        assert "not valid TOML" in ctl(daemon, "reload")[2]
        # Still serving the old config, every host still there.
        assert sorted(hosts_by_name(daemon)) == ["esx1", "esx2", "esx3"]
        assert '"reload failed: configuration NOT changed"' in daemon.log()
        metrics = daemon.request({"op": "metrics"})["result"]["text"]
        assert 'vmfenced_reloads_total{result="failed"} 3.0' in metrics


def test_fence_in_flight_finishes_on_a_host_the_reload_removes(
    lab: Lab, state: str, rewrite: Callable[..., None]
) -> None:
    esx2 = lab.hosts["esx2"]
    target = esx2.start_vm("gfs-node2")
    with LabDaemon(
        lab,
        aliases={"node2": "gfs-node2"},
        # Long enough that the frozen host is neither timed out nor declared dead meanwhile.
        daemon={"state_directory": state, "fence_timeout": 60},
        ssh={"keepalive_interval": 30},
    ) as daemon:
        assert wait_for(lambda: all_up(daemon))
        frozen = [pid for pid in esx2.namespace_pids() if pid != esx2.init_pid]
        replies: dict[str, dict[str, Any]] = {}
        order: list[str] = []

        def ask(name: str, request: dict[str, Any]) -> None:
            replies[name] = daemon.request(request, timeout=120)
            order.append(name)

        fence = threading.Thread(target=ask, args=("fence", {"op": "fence", "vm": "node2"}))
        reload = threading.Thread(target=ask, args=("reload", {"op": "reload"}))
        try:
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            fence.start()
            assert wait_for(lambda: "vmfenced_fences_in_flight 1.0" in metrics_text(daemon))
            rewrite(daemon, hosts=["esx1", "esx3"], aliases={"node2": "gfs-node2"})
            reload.start()
            assert wait_for(lambda: '"reload waits for fences in flight"' in daemon.log())
            assert not replies  # both wait: the fence on the frozen host, the reload on it
        finally:
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            fence.join(timeout=120)
            reload.join(timeout=120)
        assert order == ["fence", "reload"]
        assert replies["fence"]["ok"], replies["fence"]
        assert replies["fence"]["result"]["host"] == "esx2"
        assert replies["fence"]["result"]["outcome"] == "killed"
        assert not esx2.pid_alive(target)
        assert replies["reload"]["ok"] and replies["reload"]["result"]["removed"] == ["esx2"]
        assert sorted(hosts_by_name(daemon)) == ["esx1", "esx3"]


def metrics_text(daemon: LabDaemon) -> str:
    text: str = daemon.request({"op": "metrics"})["result"]["text"]
    return text
