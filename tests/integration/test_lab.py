"""The lab itself: real sshd hosts, real VM processes, shims that print what ESXi prints."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import asyncssh
import pytest

from vmflab import Lab, LabError, LabHost
from vmflab.lab import SHIMS_DIR

pytestmark = pytest.mark.integration

ODD_NAME = "Ünïcode VM ñ 1"  # spaces and non-ASCII, as ESXi display names may have
ESXCLI_NS = "http://www.vmware.com/Products/ESX/5.0/esxcli"
VMDUMPER = re.compile(
    r'^vmid=(?P<world>\d+) pid=-1 cfgFile="(?P<cfg>/vmfs/volumes/[^"]+\.vmx)" '
    r'uuid="(?P<uuid>[0-9a-f ]+-[0-9a-f ]+)" displayName="(?P<name>[^"]+)" '
    r"vmxCartelID=(?P<cartel>\d+)$"
)
PS_HEADER = re.compile(r"^WID\s+CID\s+World Name\s+Command$")
PS_LINE = re.compile(r"^(?P<wid>\d+)\s+(?P<cid>\d+)\s+(?P<rest>\S.*)$")
ESXCLI_BLOCK = re.compile(
    r"^(?P<title>\S.*)\n"
    r"   World ID: (?P<world>\d+)\n"
    r"   Process ID: 0\n"
    r"   VMX Cartel ID: (?P<cartel>\d+)\n"
    r"   UUID: (?P<uuid>[0-9a-f ]+-[0-9a-f ]+)\n"
    r"   Display Name: (?P<name>.+)\n"
    r"   Config File: (?P<cfg>/vmfs/volumes/.+\.vmx)$"
)
GETALLVMS_HEADER = re.compile(r"^Vmid\s+Name\s+File\s+Guest OS\s+Version\s+Annotation$")
GETALLVMS_ROW = re.compile(
    r"^(?P<vmid>\d+)\s+(?P<name>.+?)\s+\[(?P<ds>[^\]]+)\] (?P<file>.+?\.vmx)\s+"
    r"(?P<guest>\S+)\s+(?P<version>vmx-\d+)\s*(?P<annotation>.*)$"
)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def vmdumper(host: LabHost) -> dict[str, dict[str, str]]:
    lines = host.ssh("vmdumper -l").stdout.splitlines()
    parsed = {}
    for line in lines:
        match = VMDUMPER.match(line)
        assert match, f"vmdumper line out of form: {line!r}"
        parsed[match["name"]] = match.groupdict()
    return parsed


def start_three(host: LabHost) -> dict[str, tuple[int, int]]:
    """Three VMs, one with an odd name, one with world ID = cartel + 3: name -> (cartel, world)."""
    started = {}
    for name, offset in (("vm1", 1), (ODD_NAME, 1), ("vm-offset", 3)):
        cartel = host.start_vm(name, world_offset=offset)
        started[name] = (cartel, cartel + offset)
    return started


def test_hosts_are_ssh_reachable_with_shims_first(lab: Lab) -> None:
    addresses = {(host.address, host.port) for host in lab.hosts.values()}
    assert len(addresses) == 3
    for host in lab.hosts.values():
        out = host.ssh('id -un; echo "$PATH"; readlink -f /proc/$$/exe; command -v vmdumper').stdout
        user, path, shell, vmdumper_path = out.splitlines()
        assert user == lab.username
        assert path.split(":")[0] == "/vmfs/.lab/bin"
        assert shell.endswith("dash")
        assert vmdumper_path == "/vmfs/.lab/bin/vmdumper"
        assert host.ssh("exit 3", check=False).returncode == 3


def test_shims_are_posix_sh(lab: Lab) -> None:
    host = lab.hosts["esx1"]
    for shim in SHIMS_DIR.iterdir():
        if shim.suffix == ".awk":
            continue
        assert shim.read_text().startswith(("#!/bin/sh\n", "# shellcheck shell=sh\n")), shim
        assert subprocess.run(["dash", "-n", str(shim)], check=False).returncode == 0, shim
    assert "kill is a shell builtin" in host.ssh("type kill").stdout


def test_vmdumper_lists_running_vms(lab: Lab) -> None:
    host = lab.hosts["esx1"]
    started = start_three(host)
    listed = vmdumper(host)
    assert set(listed) == set(started)
    for name, (cartel, world) in started.items():
        entry = listed[name]
        assert (int(entry["cartel"]), int(entry["world"])) == (cartel, world)
        assert entry["cfg"] == f"/vmfs/volumes/ds1/{name}/{name}.vmx"
    assert host.vm_pids() == {name: cartel for name, (cartel, _) in started.items()}
    assert vmdumper(lab.hosts["esx2"]) == {}
    # The same output by ESXi's full path.
    assert host.ssh("/usr/lib/vmware/bin/vmdumper -l").stdout == host.ssh("vmdumper -l").stdout


def test_ps_c_shows_worlds_with_cartels(lab: Lab) -> None:
    host = lab.hosts["esx1"]
    started = start_three(host)
    header, *lines = host.ssh("ps -c").stdout.splitlines()
    assert PS_HEADER.match(header), header
    worlds: dict[int, list[tuple[int, str]]] = {}
    for line in lines:
        match = PS_LINE.match(line)
        assert match, f"ps -c line out of form: {line!r}"
        worlds.setdefault(int(match["cid"]), []).append((int(match["wid"]), match["rest"]))
    for name, (cartel, world) in started.items():
        cfg = f"/vmfs/volumes/ds1/{name}/{name}.vmx"
        cartel_worlds = worlds[cartel]
        assert all(rest.endswith(" " + cfg) for _, rest in cartel_worlds)
        assert (cartel, f"vmx /bin/vmx -s sched.group=host/vim/vmvisor {cfg}") in [
            (wid, re.sub(r"\s+", " ", rest, count=1)) for wid, rest in cartel_worlds
        ]
        assert any(
            wid == world and rest.startswith(f"vmx-vcpu-0:{name} ") for wid, rest in cartel_worlds
        )
        assert sum(rest.startswith("vmx-vthread-") for _, rest in cartel_worlds) >= 1
    # Every other process is its own cartel.
    vm_cartels = {cartel for cartel, _ in started.values()}
    for cid, entries in worlds.items():
        if cid not in vm_cartels:
            assert entries == [(cid, entries[0][1])]
    header, *lines = host.ssh("ps").stdout.splitlines()
    assert re.match(r"^WID\s+CID\s+World Name$", header)
    assert host.ssh("ps -ef", check=False).returncode != 0


def test_esxcli_plain_and_xml(lab: Lab) -> None:
    host = lab.hosts["esx2"]
    started = start_three(host)
    out = host.ssh("esxcli vm process list").stdout
    assert out.endswith("\n\n")
    blocks = {}
    for block in out.strip("\n").split("\n\n"):
        match = ESXCLI_BLOCK.match(block)
        assert match, f"esxcli block out of form: {block!r}"
        assert match["title"] == match["name"]
        blocks[match["name"]] = (int(match["cartel"]), int(match["world"]))
    assert blocks == started

    root = ET.fromstring(host.ssh("esxcli --formatter=xml vm process list").stdout.encode())
    assert root.tag == f"{{{ESXCLI_NS}}}output"
    ns = {"e": ESXCLI_NS}
    structures = root.findall("e:root/e:list[@type='structure']/e:structure", ns)
    from_xml = {}
    for structure in structures:
        assert structure.get("typeName") == "VirtualMachine"
        fields = {}
        for field in structure.findall("e:field", ns):
            (value,) = list(field)
            fields[field.get("name")] = (value.tag.removeprefix(f"{{{ESXCLI_NS}}}"), value.text)
        assert set(fields) == {
            "ConfigFile",
            "DisplayName",
            "ProcessID",
            "UUID",
            "VMXCartelID",
            "WorldID",
        }
        assert fields["ProcessID"] == ("integer", "0")
        assert fields["ConfigFile"][0] == fields["DisplayName"][0] == "string"
        name = fields["DisplayName"][1]
        assert name is not None
        from_xml[name] = (int(str(fields["VMXCartelID"][1])), int(str(fields["WorldID"][1])))
    assert from_xml == started

    bad = host.ssh("esxcli vm process frobnicate", check=False)
    assert bad.returncode == 1 and "Error" in bad.stderr


def test_esxcli_kill_by_world_id(lab: Lab) -> None:
    host = lab.hosts["esx3"]
    cartel = host.start_vm("vm1", world_offset=2)
    host.ssh(f"esxcli vm process kill --type=hard --world-id={cartel + 2}")
    assert wait_until(lambda: not host.pid_alive(cartel))
    assert host.ssh("esxcli vm process kill -t hard -w 999999", check=False).returncode == 1


def test_vim_cmd(lab: Lab) -> None:
    host = lab.hosts["esx1"]
    host.create_vm("vm1")
    host.create_vm(ODD_NAME, datastore="ds2")
    header, *rows = host.ssh("vim-cmd vmsvc/getallvms").stdout.splitlines()
    assert GETALLVMS_HEADER.match(header), header
    table = {}
    for row in rows:
        match = GETALLVMS_ROW.match(row)
        assert match, f"getallvms row out of form: {row!r}"
        table[match["name"]] = (match["vmid"], match["ds"], match["file"])
    assert table == {
        "vm1": ("1", "ds1", "vm1/vm1.vmx"),
        ODD_NAME: ("2", "ds2", f"{ODD_NAME}/{ODD_NAME}.vmx"),
    }
    assert (
        host.ssh("vim-cmd vmsvc/power.getstate 2").stdout == "Retrieved runtime info\nPowered off\n"
    )
    on = host.ssh("vim-cmd vmsvc/power.on 2")
    assert on.returncode == 0
    assert set(host.vm_pids()) == {ODD_NAME}
    assert (
        host.ssh("vim-cmd vmsvc/power.getstate 2").stdout == "Retrieved runtime info\nPowered on\n"
    )
    again = host.ssh("vim-cmd vmsvc/power.on 2", check=False)
    assert again.returncode != 0 and "vim.fault.InvalidPowerState" in again.stdout
    missing = host.ssh("vim-cmd vmsvc/power.getstate 42", check=False)
    assert missing.returncode != 0 and "(vim.fault.NotFound)" in missing.stdout
    # Vmids are stable: a new VM gets the next one, the others keep theirs.
    host.create_vm("vm3")
    rows = host.ssh("vim-cmd vmsvc/getallvms").stdout.splitlines()[1:]
    vmids = {m["name"]: m["vmid"] for m in map(GETALLVMS_ROW.match, rows) if m}
    assert vmids == {"vm1": "1", ODD_NAME: "2", "vm3": "3"}


def test_stop_vm_and_kill_leave_no_zombie(lab: Lab) -> None:
    host = lab.hosts["esx1"]
    started = start_three(host)
    cartel = started["vm1"][0]
    host.stop_vm("vm1")
    assert "vm1" not in host.vm_pids()
    assert not host.pid_alive(cartel)
    assert host.ssh(f"test -e /proc/{cartel}", check=False).returncode == 1  # reaped, not a zombie
    assert f" {cartel} " not in host.ssh("ps -c").stdout
    # The shell's own kill, as a fencing daemon does it.
    other = started[ODD_NAME][0]
    host.ssh(f"kill -9 {other}")
    assert wait_until(lambda: ODD_NAME not in host.vm_pids())
    assert set(host.vm_pids()) == {"vm-offset"}
    with pytest.raises(LabError):
        host.stop_vm("vm1")


def test_unregister_vm(lab: Lab) -> None:
    host = lab.hosts["esx2"]
    cartel = host.start_vm("moving")
    host.unregister_vm("moving")
    assert "moving" not in host.ssh("vim-cmd vmsvc/getallvms").stdout
    assert host.vm_pids() == {"moving": cartel}  # the process runs on until killed


def test_set_next_pid_reuses_a_cartel_id(lab: Lab) -> None:
    host = lab.hosts["esx1"]
    old = host.start_vm("vm1")
    host.stop_vm("vm1")
    host.set_next_pid(old)
    assert host.start_vm("intruder") == old
    assert vmdumper(host)["intruder"]["cartel"] == str(old)
    with pytest.raises(LabError):
        host.set_next_pid(old)  # in use
    host.stop_vm("intruder")
    host.set_next_pid(old)  # any process started over ssh takes it too
    pid = int(host.ssh("setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!").stdout)
    assert pid == old
    host.ssh(f"kill -9 {pid}")


def test_stop_sshd_refuses_then_start_sshd_restores(lab: Lab) -> None:
    host = lab.hosts["esx2"]
    cartel = host.start_vm("vm1")
    host.stop_sshd()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host.address, host.port), timeout=5).close()
    assert host.ssh("true", check=False).returncode == 255
    host.start_sshd()
    assert host.ssh("echo back").stdout == "back\n"  # same host key: known_hosts still valid
    assert host.pid_alive(cartel)  # VMs do not depend on sshd


async def connect(lab: Lab, host: LabHost) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        host.address,
        port=host.port,
        username=lab.username,
        client_keys=[str(lab.client_key)],
        known_hosts=str(lab.known_hosts),
    )


@pytest.mark.asyncio
async def test_max_sessions_one_and_dead_host_resets(lab: Lab) -> None:
    host = lab.hosts["esx3"]
    conn = await connect(lab, host)
    try:
        shell = await conn.create_process("exec /bin/sh")
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_process("true")
        shell.stdin.write("echo one\n")
        assert await asyncio.wait_for(shell.stdout.readline(), 10) == "one\n"
        await asyncio.to_thread(host.stop_sshd)
        with pytest.raises((asyncssh.ConnectionLost, asyncssh.DisconnectError, ConnectionError)):
            shell.stdin.write("echo two\n")
            line = await asyncio.wait_for(shell.stdout.readline(), 10)
            if line == "":
                raise ConnectionError("channel closed")
    finally:
        conn.close()
        await conn.wait_closed()


def test_add_host_and_rekey(lab: Lab) -> None:
    host = lab.add_host("esx4")
    assert set(lab.hosts) == {"esx1", "esx2", "esx3", "esx4"}
    assert host.start_vm("vm1") > 1
    host.rekey(trust=False)
    assert host.ssh("true", check=False).returncode == 255  # host key changed
    lab.write_known_hosts()
    assert host.ssh("echo ok").stdout == "ok\n"


def process_identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time) while the process (zombies included) exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return pid, stat.rsplit(")", 1)[1].split()[19]


def test_teardown_leaves_no_process(tmp_path: Path) -> None:
    processes: list[tuple[int, str]] = []
    with pytest.raises(RuntimeError), Lab(tmp_path / "lab", ("esx1", "esx2")) as lab:
        for host in lab.hosts.values():
            host.start_vm("vm1")
            host.ssh("setsid sleep 600 </dev/null >/dev/null 2>&1 &")
            pids = [*host.namespace_pids(), host.unshare_pid]
            assert len(pids) >= 5  # unshare, init, sshd, vm1, sleep
            processes += [ident for pid in pids if pid and (ident := process_identity(pid))]
        raise RuntimeError("a failing test")
    assert processes
    left = [ident for ident in processes if process_identity(ident[0]) == ident]
    assert left == []
    assert all(host.namespace_pids() == [] for host in lab.hosts.values())
