"""vmfenced-host on the lab: the helper key can do nothing but talk to the helper, every
refusal is logged on the host with the client's address, and the daemon reports a helper it
cannot use as the host's `down` reason."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import ctl, fenced, skip_without_lab
from tests.waiting import wait_for
from vmfenced.backends import helper
from vmfenced.backends.registry import BACKENDS
from vmflab import Lab
from vmflab.daemon import LabDaemon
from vmflab.helper import syslog_lines
from vmflab.host import LabHost
from vmflab.sshd import SshSettings, ssh_argv

pytestmark = pytest.mark.integration

TOKEN = "0123456789abcdef"
# sshd sees the lab's ssh clients coming from the host machine's loopback address.
CLIENT = "127.0.0.1"


@pytest.fixture
def helper_lab(tmp_path: Path) -> Iterator[Lab]:
    """An ESXi host (the helper under busybox ash) and an esx-classic one (under dash)."""
    skip_without_lab()
    with Lab(tmp_path / "lab", host_names=("esx1",), classic_hosts=("esx3a",)) as started:
        started.mode = "helper"
        yield started


def with_helper_key(
    lab: Lab, host: LabHost, command: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    settings = SshSettings(lab.username, lab.helper_key, lab.known_hosts)
    return subprocess.run(
        ssh_argv(settings, host.address, host.port, command),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def refusals(host: LabHost) -> list[str]:
    return [line for line in syslog_lines(host.files.run / "syslog") if "refused" in line]


@pytest.mark.parametrize("name", ["esx1", "esx3a"])
def test_the_helper_key_runs_nothing_else(helper_lab: Lab, name: str) -> None:
    host = helper_lab.hosts[name]
    owned = "/vmfs/.lab/run/owned"
    for command in ("id", f"touch {owned}", "vmfenced-host; id", "/bin/sh -c id"):
        result = with_helper_key(helper_lab, host, command)
        assert result.returncode == 1, result
        assert result.stdout == f"vmf:refused command not allowed: {command}\n"
    # Requests: one good one is answered, a malformed one is refused and ends the session,
    # and the good one after it is never read.
    streams = [
        f"{TOKEN} kill $(touch {owned}) 1 1",
        f"{TOKEN} kill `touch {owned}` 1 1",
        f"{TOKEN} kill 41;touch 1 1",
        f"{TOKEN} ping " + "1" * (helper.MAX_REQUEST + 10),
        f"{TOKEN} on 2f 2f 2f 2f",
    ]
    for bad in streams:
        result = with_helper_key(
            helper_lab, host, "vmfenced-host", f"{TOKEN} ping\n{bad}\n{TOKEN} ping\n"
        )
        assert result.returncode == 2, result
        assert result.stdout.startswith(f"\n:vmf-end:{TOKEN}:0\nvmf:refused "), result
        assert result.stdout.count(":vmf-end:") <= 2
    assert not (host.files.run / "owned").exists()
    logged = refusals(host)
    assert len(logged) == 4 + len(streams), logged
    assert all(f"refused a request from {CLIENT}: " in line for line in logged)
    assert "command not allowed: id" in logged[0]
    assert f"request over {helper.MAX_REQUEST} bytes" in logged[-2]
    assert "on takes" in logged[-1]


def test_names_with_shell_syntax_are_data_through_the_daemon(helper_lab: Lab) -> None:
    esx = helper_lab.hosts["esx1"]
    odd = "odd $(touch /vmfs/.lab/run/owned) `id`; x"
    cartel = esx.start_vm(esx.create_vm("odd", display_name=odd))
    with LabDaemon(helper_lab, aliases={"n-odd": odd}) as daemon:
        result = fenced(daemon, "n-odd", "killed")
        assert result["cartel"] == cartel
        fenced(daemon, "n-odd", "powered_on", action="on")
    assert not (esx.files.run / "owned").exists()
    assert refusals(esx) == []


def test_status_shows_the_mode_and_a_version_mismatch_is_a_down_reason(
    helper_lab: Lab,
) -> None:
    esx, classic = helper_lab.hosts["esx1"], helper_lab.hosts["esx3a"]
    program = esx.files.bin / "vmfenced-host"
    with LabDaemon(helper_lab) as daemon:
        code, out, _ = ctl(daemon, "status")
        assert code == 0
        for host in (esx, classic):
            expected = f"helper {helper.version(BACKENDS[host.kind])}"
            row = next(line for line in out.split("\n") if line.startswith(host.name + " "))
            assert expected in row and " up " in row
        # An older helper on esx1: its lanes go down, saying why, at their next connection.
        text = program.read_text()
        program.write_text(text.replace("\nVMF_VERSION=", "\nVMF_VERSION=0-old #", 1))
        esx.stop_sshd()
        esx.start_sshd()
        assert wait_for(lambda: "version mismatch" in str(host_reason(daemon, "esx1")))
        reason = str(host_reason(daemon, "esx1"))
        assert "the host runs 0-old" in reason
        assert "vmfencectl host-helper --kind esxi" in reason
        assert any("version mismatch" in line for line in refusals(esx))
        # The right program back: up again.
        program.write_text(text)
        assert wait_for(lambda: daemon.host_state("esx1") == "up", timeout=15)


def host_reason(daemon: LabDaemon, name: str) -> object:
    hosts = daemon.request({"op": "status"})["result"]["hosts"]
    return next(h["reason"] for h in hosts if h["name"] == name)


def test_on_a_linux_host_sshd_itself_binds_the_key_to_the_helper(kvm_lab: Lab) -> None:
    """libvirt lab hosts run plain sshd (no ForceCommand): command= in authorized_keys is what
    runs the helper, under dash, as on a real KVM host."""
    kvm = kvm_lab.libvirt["kvm1"]
    settings = SshSettings("root", kvm_lab.helper_key, kvm_lab.known_hosts)

    def run(command: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ssh_argv(settings, kvm.address, kvm.port, command),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    result = run("id")
    assert (result.returncode, result.stdout) == (1, "vmf:refused command not allowed: id\n")
    result = run("vmfenced-host", f"{TOKEN} registered\n{TOKEN} kill $(id) 1 1\n{TOKEN} ping\n")
    assert result.returncode == 2
    assert result.stdout.startswith("vmf:uuid-name\n"), result
    assert result.stdout.count(":vmf-end:") == 1
    logged = [line for line in syslog_lines(kvm.files.syslog) if "refused" in line]
    assert len(logged) == 2 and all(f"from {CLIENT}:" in line for line in logged), logged


def test_a_proxmox_helper_names_its_own_node_and_takes_only_vmids(pve_lab: Lab) -> None:
    """The Proxmox helper (one program at one path on every node) answers the node it runs on,
    from the host's hostname: an entry whose node name differs is down, saying why. The HA
    hold-off takes a VMID and nothing else."""
    assert pve_lab.pve is not None
    pve1, pve2 = pve_lab.pve.nodes["pve1"], pve_lab.pve.nodes["pve2"]
    settings = SshSettings("root", pve_lab.helper_key, pve_lab.known_hosts)

    def run(command: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ssh_argv(settings, pve1.address, pve1.port, command),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    result = run("id")
    assert (result.returncode, result.stdout) == (1, "vmf:refused command not allowed: id\n")
    version = helper.version(BACKENDS["proxmox"])
    for bad in ("0100", "=100", "1000000000", "100 101"):
        result = run(
            "vmfenced-host", f"{TOKEN} hello ={version}\n{TOKEN} hold-off {bad}\n{TOKEN} ping\n"
        )
        assert result.returncode == 2, result
        assert result.stdout.startswith(f"vmf:helper {version} proxmox pve1\n"), result
        assert result.stdout.count(":vmf-end:") == 2 and "\nvmf:refused " in result.stdout
    logged = [line for line in syslog_lines(pve1.files.syslog) if "refused" in line]
    assert len(logged) == 5 and all(f"from {CLIENT}:" in line for line in logged), logged
    # An entry that calls pve2 "pve9": the helper there says it is pve2.
    pve_lab.mode = "helper"
    extra = (
        f'[[hosts]]\nname = "pve9"\naddress = "{pve2.address}"\nport = {pve2.port}\n'
        'kind = "proxmox"\nusername = "root"\n'
    )
    with LabDaemon(pve_lab, hosts=["pve1"], extra=extra) as daemon:
        assert wait_for(lambda: "Proxmox node pve2" in str(host_reason(daemon, "pve9")))
        assert wait_for(lambda: daemon.host_state("pve1") == "up", timeout=15)
        assert "set pve_node" in str(host_reason(daemon, "pve9"))
