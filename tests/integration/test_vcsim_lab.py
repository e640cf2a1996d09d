"""The vcsim lab: built once per source version, started on a free loopback port, answering
SOAP (pyvmomi) and, with the lab patch, WSDL (fence_vmware_soap); stopped by PID."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import skip_without
from tests.integration.vcsim_fixtures import Actor, actor, vcsim, vcsim_build
from vmflab.control import LabError
from vmflab.vcsim import PASSWORD, USERNAME, Vcsim, VcsimBuild, build

pytestmark = pytest.mark.integration
__all__ = ["actor", "vcsim", "vcsim_build"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes only once reaped: Popen.wait reaps it.
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"


def test_build_is_cached_per_version(vcsim_build: VcsimBuild) -> None:
    before = vcsim_build.binary.stat().st_mtime_ns
    again = build()
    assert again == vcsim_build
    assert again.binary.stat().st_mtime_ns == before
    assert (again.wsdl_dir / "vimService.wsdl").is_file()
    assert 'element name="callCount"' in (again.wsdl_dir / "vim-types.xsd").read_text()


def test_answers_on_its_own_port_and_stops_by_pid(vcsim_build: VcsimBuild) -> None:
    with Vcsim(vcsim_build) as one, Vcsim(vcsim_build, esx=True) as two:
        assert one.port != two.port
        pids = [one.pid, two.pid]
        assert all(pid is not None and _alive(pid) for pid in pids)
        with Actor(one) as act_one, Actor(two) as act_two:
            assert act_one.content.about.apiType == "VirtualCenter"
            assert act_two.content.about.apiType == "HostAgent"
    assert not any(pid is not None and _alive(pid) for pid in pids)


def test_stopped_even_when_the_test_fails(vcsim_build: VcsimBuild) -> None:
    pid = None
    with pytest.raises(RuntimeError), Vcsim(vcsim_build) as sim:
        pid = sim.pid
        raise RuntimeError("a failing test")
    assert pid is not None and not _alive(pid)


def test_restart_keeps_the_port_and_loses_the_state(vcsim_build: VcsimBuild) -> None:
    with Vcsim(vcsim_build) as sim:
        with Actor(sim) as act:
            act.power("DC0_H0_VM0", on=False)
        port, pid = sim.port, sim.pid
        sim.restart()
        assert (sim.port, sim.pid != pid) == (port, True)
        with Actor(sim) as act:
            assert act.vm("DC0_H0_VM0").runtime.powerState == "poweredOn"


def test_method_delay_slows_that_method_only(vcsim_build: VcsimBuild) -> None:
    with Vcsim(vcsim_build, method_delay={"PowerOffVM_Task": 400}) as sim, Actor(sim) as act:
        vm = act.vm("DC0_H0_VM0")
        start = time.monotonic()
        vm.PowerOffVM_Task()
        slow = time.monotonic() - start
        start = time.monotonic()
        vm.PowerOnVM_Task()
        fast = time.monotonic() - start
    # Not a timing assertion on our code: the simulator's configured delay is the subject.
    assert slow >= 0.4 > fast


def test_a_binary_that_never_answers_is_stopped(tmp_path: Path, vcsim_build: VcsimBuild) -> None:
    fake = tmp_path / "vcsim"
    pid_file = tmp_path / "pid"
    # exec keeps the shell's PID: the one written is the process that must be gone.
    fake.write_text(f"#!/bin/sh\necho $$ > {pid_file}\necho not-an-address\nexec sleep 60\n")
    fake.chmod(0o755)
    sim = Vcsim(VcsimBuild(fake, vcsim_build.wsdl_dir, "fake"))
    with pytest.raises(LabError, match="not its address"):
        sim.start()
    assert sim.process is None
    # Stopped and reaped: no /proc entry left, not even a zombie.
    assert not Path(f"/proc/{int(pid_file.read_text())}").exists()


def test_fence_vmware_soap_against_the_wsdl_lab(vcsim_build: VcsimBuild) -> None:
    agent = shutil.which("fence_vmware_soap") or "/usr/sbin/fence_vmware_soap"
    skip_without(None if Path(agent).exists() else "fence_vmware_soap (fence-agents) missing")
    with Vcsim(vcsim_build, wsdl=True) as sim:
        base = [agent, "-a", "127.0.0.1", "-u", str(sim.port), "--ssl-insecure"]
        base += ["-l", USERNAME, "-p", PASSWORD, "-n", "DC0_H0_VM1"]
        off = subprocess.run(
            [*base, "-o", "off"], capture_output=True, text=True, timeout=60, check=False
        )
        assert off.returncode == 0, off.stderr
        status = subprocess.run(
            [*base, "-o", "status"], capture_output=True, text=True, timeout=60, check=False
        )
        assert (status.returncode, status.stdout.strip()) == (2, "Status: OFF")
        with Actor(sim) as act:
            assert act.vm("DC0_H0_VM1").runtime.powerState == "poweredOff"


def test_module_vcsim_serves_the_actor(vcsim: Vcsim, actor: Actor) -> None:
    assert {h.name for h in actor.hosts()} == {
        "DC0_H0",
        "DC0_C0_H0",
        "DC0_C0_H1",
        "DC0_C0_H2",
    }
