"""Prometheus metrics scraped over HTTP from the real daemon, and `vmfencectl metrics`."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import ctl
from tests.waiting import wait_for
from vmflab import Lab
from vmflab.daemon import LabDaemon

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


def test_metrics_over_http(lab: Lab, tmp_path: Path) -> None:
    lab.hosts["esx1"].start_vm("gfs-node1")
    port = free_port()
    daemon = LabDaemon(
        lab, aliases={"node1": "gfs-node1"}, daemon={"state_directory": str(tmp_path)}
    )
    with daemon.config_path.open("a") as config:
        config.write(f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    with daemon:
        url = f"http://127.0.0.1:{port}/metrics"
        assert wait_for(
            lambda: samples(scrape(url)[2]).get(("vmfenced_host_up", (("host", "esx3"),))) == 1
        )
        status, content_type, text = scrape(url)
        assert status == 200
        assert content_type == "text/plain; version=0.0.4; charset=utf-8"
        got = samples(text)
        for host in ("esx1", "esx2", "esx3"):
            assert got[("vmfenced_host_up", (("host", host),))] == 1
            for lane in ("fence", "inventory"):
                key = (("host", host), ("lane", lane))
                assert got[("vmfenced_link_up", key)] == 1
                assert got[("vmfenced_link_reconnects_total", key)] == 0
        assert got[("vmfenced_running_vms", (("host", "esx1"),))] == 1
        assert 0 <= got[("vmfenced_inventory_age_seconds", (("host", "esx1"),))] < 3600
        assert got[("vmfenced_fences_in_flight", ())] == 0

        assert daemon.request({"op": "fence", "vm": "node1"})["ok"]
        assert not daemon.request({"op": "fence", "vm": "no-such-vm"})["ok"]
        got = samples(scrape(url)[2])
        killed = (("action", "off"), ("result", "killed"))
        assert got[("vmfenced_fences_total", killed)] == 1
        assert got[("vmfenced_fence_duration_seconds_count", killed)] == 1
        bucket = tuple(sorted((*killed, ("le", "60.0"))))
        assert got[("vmfenced_fence_duration_seconds_bucket", bucket)] == 1
        unknown = (("action", "off"), ("result", "unknown_vm"))
        assert got[("vmfenced_fences_total", unknown)] == 1

        # A lane that drops and comes back counts as a reconnect.
        lab.hosts["esx2"].stop_sshd()
        lab.hosts["esx2"].start_sshd()
        assert wait_for(lambda: reconnects(url, "esx2") >= 1)

        # The same metrics through the socket, for hosts without an HTTP scraper.
        code, out, err = ctl(daemon, "metrics")
        assert code == 0, err
        assert samples(out)[("vmfenced_fences_total", killed)] == 1

        for path, code in (("/", 200), ("/nope", 404)):
            try:
                assert scrape(f"http://127.0.0.1:{port}{path}")[0] == code
            except urllib.error.HTTPError as exc:
                assert exc.code == code
        request = urllib.request.Request(url, method="POST", data=b"x")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=10)
        assert info.value.code == 405
        info.value.close()
    # Stopped: the port is closed again.
    with pytest.raises(urllib.error.URLError):
        scrape(url)


def reconnects(url: str, host: str) -> float:
    got = samples(scrape(url)[2])
    return got.get(("vmfenced_link_reconnects_total", (("host", host), ("lane", "fence"))), 0)


def test_metrics_are_off_by_default_and_a_busy_port_is_a_startup_error(
    lab: Lab, tmp_path: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        daemon = LabDaemon(lab, daemon={"state_directory": str(tmp_path)})
        try:
            with daemon.config_path.open("a") as config:
                config.write(f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
            with pytest.raises(RuntimeError, match="exited 1"):
                daemon.start()
            assert f"metrics.listen: cannot listen on 127.0.0.1:{port}" in daemon.log()
        finally:
            daemon.close()
