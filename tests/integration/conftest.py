"""Fixtures of the integration tests: a real-sshd lab of ESXi hosts (vmflab)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.waiting import wait_for
from vmfenced.clients.ctl import run as ctl_run
from vmflab import Lab
from vmflab.daemon import LabDaemon
from vmflab.host import LabHost


def lab_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root"
    missing = [
        tool for tool in ("unshare", "sshd", "ssh", "ssh-keygen", "gcc") if not shutil.which(tool)
    ]
    if missing and not (missing == ["sshd"] and Path("/usr/sbin/sshd").exists()):
        return f"the lab needs {', '.join(missing)}"
    return None


def libvirt_unavailable() -> str | None:
    tools = ("virsh", "libvirtd", "virtlogd", "qemu-system-x86_64")
    missing = [t for t in tools if not (shutil.which(t) or Path(f"/usr/sbin/{t}").exists())]
    return f"the libvirt lab needs {', '.join(missing)}" if missing else None


def skip_without(reason: str | None) -> None:
    """Skip when the lab cannot run here; in CI a missing prerequisite is a broken setup, not
    a reason to run nothing."""
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def skip_without_lab() -> None:
    skip_without(lab_unavailable())


# Both ways a daemon can reach its hosts; a module runs its tests in both with
# `pytestmark = pytest.mark.parametrize("lab_mode", MODES)` (it overrides the fixture below).
MODES = ("shell", "helper")


@pytest.fixture
def lab_mode() -> str:
    """How the lab's daemons reach the hosts: a shell (the default) or vmfenced-host."""
    return "shell"


@pytest.fixture
def kvm_lab(tmp_path: Path, lab_mode: str) -> Iterator[Lab]:
    """A started lab of two libvirt hosts with real qemu VMs (kvm1, kvm2) and one ESXi host
    (esx1); every process of it is killed afterwards, whether the test passed or not."""
    skip_without(lab_unavailable() or libvirt_unavailable())
    with Lab(tmp_path / "lab", host_names=("esx1",), libvirt_hosts=("kvm1", "kvm2")) as started:
        started.mode = lab_mode
        yield started


def fence_pve_unavailable() -> str | None:
    if not Path("/usr/sbin/fence_pve").exists():
        return "no /usr/sbin/fence_pve (fence-agents)"
    done = subprocess.run(["/usr/bin/python3", "-c", "import pycurl"], check=False)
    return "fence_pve needs python3-pycurl" if done.returncode else None


@pytest.fixture
def pve_lab(tmp_path: Path, lab_mode: str) -> Iterator[Lab]:
    """Three lab Proxmox VE nodes (pve1, pve2, pve3) sharing one /etc/pve, their HA stand-in
    on half-second rounds (Proxmox: 10 s); every process is killed afterwards."""
    skip_without_lab()
    with Lab(
        tmp_path / "lab", host_names=(), proxmox_hosts=("pve1", "pve2", "pve3"), pve_ha_round=0.5
    ) as started:
        started.mode = lab_mode
        yield started


@pytest.fixture
def lab(tmp_path: Path, lab_mode: str) -> Iterator[Lab]:
    """A started 3-host lab (esx1, esx2, esx3); every process of it is killed afterwards,
    whether the test passed or not."""
    skip_without_lab()
    with Lab(tmp_path / "lab") as started:
        started.mode = lab_mode
        yield started


@pytest.fixture
def esx_lab(tmp_path: Path, lab_mode: str) -> Iterator[Lab]:
    """Two ESXi lab hosts (esx1, esx2); every process is killed afterwards."""
    skip_without_lab()
    with Lab(tmp_path / "lab", host_names=("esx1", "esx2")) as started:
        started.mode = lab_mode
        yield started


@pytest.fixture
def classic_lab(tmp_path: Path, lab_mode: str) -> Iterator[Lab]:
    """One esx-classic lab host (esx3a); every process is killed afterwards."""
    skip_without_lab()
    with Lab(tmp_path / "lab", host_names=(), classic_hosts=("esx3a",)) as started:
        started.mode = lab_mode
        yield started


def sshd_sessions(host: LabHost) -> set[int]:
    """PIDs of the host's per-connection sshd processes: one per SSH connection of a lane, so
    new ones mean new SSH connections."""
    found = set()
    for pid in host.namespace_pids():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sshd: vmflab"):
                found.add(pid)
    return found


def run_client(
    module: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """A client (`agent` or `ctl` of vmfenced.clients, or a whole module name such as the old
    `vmfenced.agent`) in a new process, as Pacemaker or an admin starts it."""
    name = module if "." in module else f"vmfenced.clients.{module}"
    return subprocess.run(
        [sys.executable, "-m", name, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ctl(daemon: LabDaemon, *argv: str) -> tuple[int, str, str]:
    """vmfencectl ARGV in this process against the lab's daemon: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = ctl_run(["--socket", str(daemon.socket), *argv], out, err)
    return code, out.getvalue(), err.getvalue()


def fence(daemon: LabDaemon, vm: str, action: str = "off") -> dict[str, Any]:
    """The daemon's whole reply to one fence request."""
    return daemon.request({"op": "fence", "vm": vm, "action": action})


def fenced(daemon: LabDaemon, vm: str, outcome: str, *, action: str = "off") -> dict[str, Any]:
    """The result of a fence that must succeed with `outcome`."""
    reply = fence(daemon, vm, action)
    assert reply["ok"] and reply["result"]["outcome"] == outcome, reply
    result: dict[str, Any] = reply["result"]
    return result


def fence_failure(daemon: LabDaemon, vm: str) -> str:
    """The message of a fence that must fail as fence_failed."""
    reply = fence(daemon, vm)
    assert not reply["ok"] and reply["error"]["code"] == "fence_failed", reply
    message: str = reply["error"]["message"]
    return message


class VmHost(Protocol):
    """What the checks below need of a lab host, ESXi, esx-classic or libvirt alike."""

    name: str

    def vm_pids(self) -> dict[str, int]: ...

    def pid_alive(self, pid: int) -> bool: ...

    def stop_sshd(self) -> None: ...

    def start_sshd(self) -> None: ...


def check_dead_host_fails(daemon: LabDaemon, host: VmHost, alias: str, nowhere: str) -> None:
    """Stops the host's sshd: fencing `alias` (which runs there) fails naming the host, and so
    does fencing `nowhere` (a VM that runs on no host)."""
    host.stop_sshd()
    assert host.name in fence_failure(daemon, alias)
    # Any VM could be on the dead host: a VM that runs nowhere reachable is not "off".
    fence_failure(daemon, nowhere)


def check_host_back(daemon: LabDaemon, host: VmHost, alias: str, cartel: int) -> None:
    """Starts the host's sshd again: the daemon's lanes come back up and fencing `alias` kills
    its VM, which the dead host had kept running."""
    host.start_sshd()
    assert host.pid_alive(cartel)
    assert wait_for(lambda: daemon.host_state(host.name) == "up")
    fenced(daemon, alias, "killed")
    assert not host.pid_alive(cartel)


def check_on_then_reboot(daemon: LabDaemon, alias: str, host: VmHost, vm: str) -> dict[str, Any]:
    """Powers `alias` on, then reboots it: each answer names the process the host really runs,
    and the reboot's is a new one, the old one gone. Returns the power-on's result."""
    on = fenced(daemon, alias, "powered_on", action="on")
    first = host.vm_pids()[vm]
    assert on["cartel"] == first
    reboot = fenced(daemon, alias, "rebooted", action="reboot")
    assert not host.pid_alive(first)
    second = host.vm_pids()[vm]
    assert second != first and reboot["cartel"] == second
    return on
