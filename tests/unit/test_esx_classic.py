"""esx-classic backend: parsers on real `ps -e -ww -o pid=,args=` output of vmware-vmx processes
(paths with spaces), its /proc scripts run for real (dash) against local processes whose argv
is an ESX 3 vmware-vmx command line, the fallback/source-address config, and status rendering."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.conftest import stand_in
from vmfenced.backends import esx_classic as ec
from vmfenced.backends import parse_kill_marker
from vmfenced.backends.registry import BACKENDS
from vmfenced.clients.client import parse_status
from vmfenced.clients.ctl import render_status
from vmfenced.config import HostConfig, parse
from vmfenced.errors import ConfigError, ParseError
from vmfenced.model import KillOutcome, RegisteredVM, RunningVM

VMX = "/usr/lib/vmware/bin/vmware-vmx"
OPTS = (
    "-ssched.group=host/user -# product=2;name=VMware ESX Server;version=3.5.0;"
    "buildnumber=64607 -@ pipe=/tmp/vmhsdaemon-0/vmx22;readyEvent=44"
)
# The lab PID 1's bootstrap, as its argv shows it.
PID1_BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); from vmflab.pid1.core import boot; boot()"
)
# `ps -e -ww -o pid=,args=` on a lab esx-classic host (procps-ng 4.0.2), argv as on ESX 3.5.
PS_OUTPUT = f"""      1 /usr/bin/python3 -I -S -c {PID1_BOOT} /work/main vmflab.pid1.esxi:EsxiInit --vmfs /tmp/lab/vmfs
      2 sshd: /usr/sbin/sshd -D -e -f /tmp/lab/sshd_config [listener] 0 of 100-200 startups
     22 {VMX} {OPTS} /vmfs/volumes/ds1/node 1/node 1.vmx
     51 {VMX} {OPTS} /vmfs/volumes/ds1/node10/node10.vmx
     60 [vmware-vmx] <defunct>
     79 sshd: vmflab [priv]
     83 /bin/sh -c grep node1.vmx /vmfs/volumes/ds1/node1/node1.vmx
     84 ps -e -ww -o pid=,args=
"""


def test_ps_listing_on_real_output_with_spaces_in_paths() -> None:
    vms = ec.parse_ps(PS_OUTPUT)
    assert vms == (
        RunningVM(name="node 1", config_file="/vmfs/volumes/ds1/node 1/node 1.vmx", cartel=22),
        RunningVM(name="node10", config_file="/vmfs/volumes/ds1/node10/node10.vmx", cartel=51),
    )


@pytest.mark.parametrize(
    "text",
    [
        f"  7 {VMX} -@ pipe=/tmp/x\n",  # no .vmx: a truncated line could hide a VM
        f"  7 {VMX} /a/x.vmx\n  8 {VMX} /a/x.vmx\n",  # one .vmx running twice
        # One path, `/vmfs/volumes/ds1/x /vmfs/...`, never read as the victim's path.
        f"  7 {VMX} {OPTS} /vmfs/volumes/ds1/x /vmfs/volumes/ds1/victim/victim.vmx\n",
        "garbage line\n",
    ],
)
def test_ps_listing_rejects_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ParseError):
        ec.parse_ps(text)


def test_proc_listing_lines() -> None:
    text = "vmf:vm 22 /vmfs/volumes/ds1/node 1/node 1.vmx\nvmf:vm 51 /v/a/b.vmx\nvmf:end\n"
    assert [(vm.name, vm.cartel) for vm in ec.parse_proc_listing(text)] == [
        ("node 1", 22),
        ("b", 51),
    ]
    assert ec.parse_proc_listing("vmf:end\n") == ()


@pytest.mark.parametrize(
    "text",
    [
        "vmf:vm 22 /a/b.vmx\n",  # no end
        "vmf:doubt vmware-vmx 7 has no .vmx argument\n",
        "vmf:vm 22 /a/b.vmx\nvmf:end\nvmf:vm 23 /a/c.vmx\n",
        "vmf:vm 0 /a/b.vmx\nvmf:end\n",
        "vmf:vm 22 relative.vmx\nvmf:end\n",
    ],
)
def test_proc_listing_rejects_anything_doubtful(text: str) -> None:
    with pytest.raises(ParseError):
        ec.parse_proc_listing(text)


def test_registered_and_power_on() -> None:
    text = "/vmfs/volumes/ds1/node 1/node 1.vmx\n/vmfs/volumes/ds1/node2/node2.vmx\n"
    vms = ec.parse_registered(text)
    assert [vm.name for vm in vms] == ["node 1", "node2"]
    assert ec.power_on_command(vms[0]).endswith("\nvmf_on '/vmfs/volumes/ds1/node 1/node 1.vmx'")
    assert "VMF_VMX=$1; export VMF_VMX" in ec.power_on_command(vms[0])
    with pytest.raises(ParseError):
        ec.parse_registered("VMControl error -3: Insufficient permissions\n")
    assert BACKENDS["esx-classic"] is ec.BACKEND


@pytest.fixture
def vmx_processes() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Local processes with an ESX 3 vmware-vmx argv (tail -f under another argv[0]; dev/null
    relative, as ESX 3's argv holds no " /" before the .vmx path)."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash for exec -a")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for path in ("/vmfs/volumes/ds1/n 1/n 1.vmx", "/vmfs/volumes/ds1/n10/n10.vmx"):
            procs[path] = subprocess.Popen(
                ["bash", "-c", f'cd / && exec -a {VMX} tail -f -- dev/null "$0" 2>/dev/null', path],
                stdout=subprocess.DEVNULL,
            )
        yield procs
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def sh(script: str) -> str:
    return subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, check=False, timeout=60
    ).stdout


def wait_exec(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """Until every process shows the vmware-vmx argv (bash has exec'd), with a deadline."""
    deadline = time.monotonic() + 30
    for proc in procs.values():
        while not Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(VMX.encode()):
            assert time.monotonic() < deadline, "bash did not exec the vmware-vmx argv"
            time.sleep(0.005)  # polling a condition with a deadline


def test_scripts_on_local_vmware_vmx_processes(
    vmx_processes: dict[str, subprocess.Popen[bytes]],
) -> None:
    wait_exec(vmx_processes)
    ours = {proc.pid: path for path, proc in vmx_processes.items()}
    found = ec.parse_proc_listing(sh(ec.proc_listing()))
    assert {vm.cartel: vm.config_file for vm in found if vm.cartel in ours} == ours
    found = ec.parse_ps(sh(ec.PS_LISTING))
    assert {vm.cartel: vm.config_file for vm in found if vm.cartel in ours} == ours
    a, b = vmx_processes.values()
    path_a = next(p for p, proc in vmx_processes.items() if proc is a)
    # A stale entry whose PID runs another VM's vmware-vmx is never killed.
    stale = RunningVM(name="n 1", config_file=path_a, cartel=b.pid)
    assert parse_kill_marker(sh(ec.kill_command(stale, 1.0))) is KillOutcome.NOT_THAT_VM
    assert b.poll() is None
    target = RunningVM(name="n 1", config_file=path_a, cartel=a.pid)
    # Killed while still our unreaped child: a zombie whose only thread has exited is dead.
    assert parse_kill_marker(sh(ec.kill_command(target, 2.0))) is KillOutcome.KILLED
    a.wait()
    assert parse_kill_marker(sh(ec.kill_command(target, 1.0))) is KillOutcome.NOT_RUNNING
    assert b.poll() is None


BASE: dict[str, Any] = {"hosts": [{"name": "esx3a", "address": "10.0.0.1"}]}


def with_host(**keys: Any) -> dict[str, Any]:
    return {"hosts": [{"name": "esx3a", "address": "10.0.0.1", **keys}]}


def test_config_kind_fallbacks_and_source_address() -> None:
    config = parse(
        {
            "ssh": {"source_address": "192.168.50.1"},
            "hosts": [
                {
                    "name": "esx3a",
                    "address": "192.168.50.11",
                    "kind": "esx-classic",
                    "fallback_addresses": ["10.0.0.11", "esx3a-mgmt.example"],
                },
                {"name": "esx3b", "address": "192.168.50.12", "source_address": "::1"},
            ],
        }
    )
    a, b = config.hosts
    assert a.kind == "esx-classic"
    assert a.addresses() == ("192.168.50.11", "10.0.0.11", "esx3a-mgmt.example")
    assert config.ssh_for(a).source_address == "192.168.50.1"
    assert config.ssh_for(b).source_address == "::1"
    assert HostConfig(name="x", address="a").fallback_addresses == ()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**BASE, "ssh": {"source_address": "eth0"}}, "ssh.source_address: 'eth0' is not an IP"),
        (with_host(source_address="10.0.0"), "hosts[0] (esx3a).source_address: '10.0.0' is not"),
        (with_host(fallback_addresses=["10.0.0.1"]), "fallback_addresses: '10.0.0.1' is listed"),
        (with_host(fallback_addresses=["b", "b"]), "fallback_addresses: 'b' is listed twice"),
        (with_host(fallback_addresses=[""]), "hosts[0] (esx3a).fallback_addresses[0]"),
        (with_host(fallback_addresses=[" "]), "fallback_addresses: an address is blank"),
        (with_host(fallback_addresses="10.0.0.2"), "hosts[0] (esx3a).fallback_addresses"),
        (with_host(kind="esx3"), "hosts[0] (esx3a).kind"),
    ],
)
def test_config_errors_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(data)
    assert message in str(info.value)


def status(connected: Any) -> dict[str, Any]:
    host = {
        "name": "esx3a",
        "address": "192.168.50.11",
        "port": 22,
        "kind": "esx-classic",
        "state": "up",
        "since": 1.0,
        "reason": None,
        "lanes": {"fence": "up", "inventory": "up"},
        "rtt_ms": 0.3,
        "inventory_age_s": 1.0,
        "vm_count": 0,
    }
    if connected is not None:
        host["connected_address"] = connected
    return {"daemon": {"version": "x", "pid": 1, "uptime_s": 1.0}, "hosts": [host], "vms": []}


def test_status_shows_the_address_in_use() -> None:
    on_fallback = status({"fence": "10.0.0.11", "inventory": "10.0.0.11"})
    assert parse_status(on_fallback).hosts[0].fence_address == "10.0.0.11"
    assert "10.0.0.11:22 (fallback)" in render_status(on_fallback, 2.0)
    primary = status({"fence": "192.168.50.11", "inventory": None})
    assert "192.168.50.11:22 " in render_status(primary, 2.0)
    assert "(fallback)" not in render_status(primary, 2.0)
    # Daemons older than fallback addresses send no connected_address.
    assert "192.168.50.11:22" in render_status(status(None), 2.0)


# -- hostile paths, duplicates --------------------------------------------------------------
HOSTILE = [
    *("\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"),
    *("\x01", "\x07", "\t", "\x1b", "\x1f", "\x7f", "\x80", "\x9f"),
]
HOSTILE_IDS = [f"U+{ord(c):04X}" for c in HOSTILE]


def forged_path(sep: str) -> str:
    """A .vmx path that ends one record and begins another naming the victim at our PID."""
    return f"/vmfs/volumes/ds1/evil/evil.vmx{sep}vmf:vm 51 /vmfs/volumes/ds1/victim/victim.vmx"


@pytest.mark.parametrize("char", HOSTILE, ids=HOSTILE_IDS)
def test_proc_listing_path_with_a_control_or_separator_fails(char: str) -> None:
    with pytest.raises(ParseError):
        ec.parse_proc_listing(f"vmf:vm 22 /vmfs/volumes/ds1/e{char}/e{char}.vmx\nvmf:end\n")
    text = f"vmf:vm 22 {forged_path(char)}.vmx\nvmf:end\n"
    with pytest.raises(ParseError):
        ec.parse_proc_listing(text)


@pytest.mark.parametrize("char", HOSTILE, ids=HOSTILE_IDS)
def test_ps_path_with_a_control_or_separator_fails(char: str) -> None:
    with pytest.raises(ParseError):
        ec.parse_ps(f"     22 {VMX} {OPTS} /vmfs/volumes/ds1/e{char}/e{char}.vmx\n")
    forged = forged_path(char).replace("vmf:vm 51", f"     51 {VMX}")
    with pytest.raises(ParseError):
        ec.parse_ps(f"     22 {VMX} {OPTS} {forged}\n")


def test_ps_question_mark_may_stand_for_another_character() -> None:
    """procps prints `?` for a character it cannot show (controls; non-ASCII in the C
    locale): that path may not be the process's path."""
    with pytest.raises(ParseError, match="replaced"):
        ec.parse_ps(f"     22 {VMX} {OPTS} /vmfs/volumes/ds1/n??ud/n??ud.vmx\n")


@pytest.mark.parametrize("char", HOSTILE, ids=HOSTILE_IDS)
def test_registered_path_with_a_control_or_separator_fails(char: str) -> None:
    with pytest.raises(ParseError):
        ec.parse_registered(f"/vmfs/volumes/ds1/a/a.vmx\n/vmfs/volumes/ds1/e{char}/e.vmx\n")
    with pytest.raises(ParseError):
        ec.parse_registered(forged_path(char).replace("vmf:vm 51 ", "") + "\n")


@pytest.mark.parametrize("trailer", ["\x85", "\u2028", "\x1c", "\r"])
def test_unicode_whitespace_at_a_line_end_is_never_stripped_away(trailer: str) -> None:
    """str.strip() would turn `/x/victim.vmx` + U+2028 into the victim's path."""
    with pytest.raises(ParseError):
        ec.parse_registered(f"/vmfs/volumes/ds1/victim/victim.vmx{trailer}\n")
    with pytest.raises(ParseError):
        ec.parse_ps(f"     22 {VMX} {OPTS} /vmfs/volumes/ds1/victim/victim.vmx{trailer}\n")


def test_same_base_name_in_two_directories_is_two_vms() -> None:
    a, b = "/vmfs/volumes/ds1/a/node1.vmx", "/vmfs/volumes/ds2/b/node1.vmx"
    for found in (
        ec.parse_ps(f"     22 {VMX} {OPTS} {a}\n     51 {VMX} {OPTS} {b}\n"),
        ec.parse_proc_listing(f"vmf:vm 22 {a}\nvmf:vm 51 {b}\nvmf:end\n"),
    ):
        assert [(vm.name, vm.config_file, vm.cartel) for vm in found] == [
            ("node1", a, 22),
            ("node1", b, 51),
        ]
    registered = ec.parse_registered(f"{a}\n{b}\n")
    assert [(vm.name, vm.vmid) for vm in registered] == [("node1", a), ("node1", b)]
    # The same .vmx twice is one VM listed twice: a garbled listing.
    with pytest.raises(ParseError, match="runs twice"):
        ec.parse_proc_listing(f"vmf:vm 22 {a}\nvmf:vm 51 {a}\nvmf:end\n")


# -- power-on re-check, run for real with a stand-in vmware-cmd -------------------------------
VMWARE_CMD = """#!/bin/sh
run=$(dirname "$0")/run
case $1 in
-l) cat "$run/list"; exit "$(cat "$run/status")";;
*) [ "$2" = start ] || exit 9; printf '%s\\n' "$1" >>"$run/started"; echo "start() = 1";;
esac
"""


def run_power_on(
    tmp_path: Path, vm: RegisteredVM, listing: str, status: int = 0
) -> tuple[str, list[str]]:
    bin_dir = stand_in(
        tmp_path, "vmware-cmd", VMWARE_CMD, list=listing, status=f"{status}\n", started=""
    )
    done = subprocess.run(
        ["/bin/sh", "-c", ec.power_on_command(vm) + "\necho after:$?"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        timeout=30,
        check=False,
    )
    return done.stdout + done.stderr, (bin_dir / "run/started").read_text().split("\n")[:-1]


ODD = "/vmfs/volumes/ds1/a'b $(touch x)/a'b $(touch x).vmx"


def test_power_on_starts_a_vmx_still_registered_there(tmp_path: Path) -> None:
    (vm,) = ec.parse_registered(f"{ODD}\n")
    out, started = run_power_on(tmp_path, vm, f"/vmfs/volumes/ds1/n/n.vmx\n{ODD}\n")
    assert started == [ODD], out
    assert out.splitlines()[-2:] == ["start() = 1", "after:0"], out
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("listing", "status", "why"),
    [
        ("/vmfs/volumes/ds1/n/n.vmx\n", 0, "is not registered"),
        (f"{ODD}.bak\n/x{ODD}\n", 0, "is not registered"),
        ("", 0, "is not registered"),
        (f"{ODD}\n", 1, "vmware-cmd -l failed"),
    ],
)
def test_power_on_refuses_a_vmx_not_registered_there(
    tmp_path: Path, listing: str, status: int, why: str
) -> None:
    (vm,) = ec.parse_registered(f"{ODD}\n")
    out, started = run_power_on(tmp_path, vm, listing, status)
    assert started == [], out
    lines = out.splitlines()
    assert lines[-1] == "after:1", out
    assert lines[-2].startswith("vmf:refused ") and why in lines[-2], out
    assert not (tmp_path / "x").exists()
