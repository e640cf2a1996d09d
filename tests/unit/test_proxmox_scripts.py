"""Proxmox VE backend: its shell scripts run for real with sh and awk against a temporary tree
laid out like a Proxmox node (/etc/pve, /var/run/qemu-server), with processes whose argv is
Proxmox's kvm command line (or upstream qemu's, without -id), and `qm`/`ha-manager`
stand-ins. No root, no lab: the scripts take their root paths as parameters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.unit.conftest import stand_in
from vmfenced.backends import parse_kill_marker, procfs
from vmfenced.backends import proxmox as pve
from vmfenced.backends import proxmox_cluster as cluster
from vmfenced.backends import proxmox_ha as ha
from vmfenced.backends.proxmox import parse_vm_lines
from vmfenced.config import HostConfig
from vmfenced.errors import ParseError
from vmfenced.model import KillOutcome, RegisteredVM

SLEEPER = "import time; time.sleep(120)"


@dataclass
class Tree:
    root: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def pve(self) -> Path:
        return self.root / "pve"

    def conf(self, node: str, vmid: int, text: str) -> Path:
        path = self.pve / "nodes" / node / "qemu-server" / f"{vmid}.conf"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def vmlist(self, ids: dict[int, tuple[str, str]]) -> None:
        entries = ",\n".join(
            f'"{vmid}": {{ "node": "{node}", "type": "{kind}", "version": 1 }}'
            for vmid, (node, kind) in ids.items()
        )
        self.pve.joinpath(".vmlist").write_text(
            f'{{\n"version": 3,\n"ids": {{\n{entries}}}\n\n}}\n'
        )

    def kvm(self, vmid: int, *, argv0: str = "/usr/bin/kvm", with_id: int | None = -1) -> int:
        """A process whose argv is Proxmox's kvm command line (-id omitted: upstream qemu)."""
        pidfile = f"{self.run}/{vmid}.pid"
        ident = vmid if with_id == -1 else with_id
        args = [argv0, "-c", SLEEPER]
        if ident is not None:
            args += ["-id", str(ident)]
        args += ["-name", f"vm{vmid},debug-threads=on", "-no-shutdown"]
        args += ["-pidfile", pidfile, "-daemonize"]
        proc = subprocess.Popen(args, executable=sys.executable)
        self.procs.append(proc)
        # The pid file qemu writes once it runs (the test writes it: the stand-in is Python).
        Path(pidfile).write_text(f"{proc.pid}\n")
        wait_for_argv(proc.pid, argv0)
        return proc.pid

    def sh(self, command: str, node: str = "pve1", path: Path | None = None) -> tuple[int, str]:
        env = {**os.environ, "VMF_PVE_NODE": node, "LC_ALL": "C"}
        if path is not None:
            env["PATH"] = f"{path}:{env['PATH']}"
        done = subprocess.run(
            ["sh", "-c", command], check=False, capture_output=True, text=True, env=env, timeout=60
        )
        return done.returncode, done.stdout + done.stderr

    def listing(self, node: str = "pve1") -> tuple[int, str]:
        return self.sh(pve.pidfile_listing(str(self.run), str(self.pve)), node)


def wait_for_argv(pid: int, argv0: str) -> None:
    """Until the child's exec is done (its cmdline is the new argv): polled, with a deadline."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(argv0.encode() + b"\0"):
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never ran as {argv0}")


@pytest.fixture
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tree]:
    # mktemp's names are plain: the scripts embed their root paths only when they are.
    t = Tree(tmp_path_factory.mktemp("pve"))
    t.run.mkdir()
    for node in ("pve1", "pve2"):
        (t.pve / "nodes" / node / "qemu-server").mkdir(parents=True)
    (t.pve / "ha").mkdir()
    yield t
    for proc in t.procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


# ------------------------------------------------------------------------------ listing


def test_listing_names_running_vms_from_their_config(tree: Tree) -> None:
    tree.conf("pve1", 100, "boot: order=virtio0\nname: webmail\n\n[snap1]\nname: before\n")
    tree.conf("pve1", 101, "cores: 1\n")  # no name: vm<vmid>
    tree.conf("pve2", 102, "name: moving\nlock: migrate\n")  # config still on the source
    a, b, c = tree.kvm(100), tree.kvm(101), tree.kvm(102, argv0="/usr/bin/qemu-system-x86_64")
    status, out = tree.listing()
    assert status == 0, out
    vms = {vm.vmid: vm for vm in parse_vm_lines(out)}
    assert {k: (v.name, v.cartel) for k, v in vms.items()} == {
        "100": ("webmail", a),
        "101": ("vm101", b),
        "102": ("moving", c),
    }
    assert vms["102"].config_file.endswith("/nodes/pve2/qemu-server/102.conf")


def test_a_rename_shows_at_once(tree: Tree) -> None:
    conf = tree.conf("pve1", 100, "name: old\n")
    tree.kvm(100)
    conf.write_text("name: new\n")
    status, out = tree.listing()
    assert status == 0 and [vm.name for vm in parse_vm_lines(out)] == ["new"]


def test_upstream_qemu_without_id(tree: Tree) -> None:
    tree.conf("pve1", 100, "name: web\n")
    tree.kvm(100, argv0="/usr/bin/qemu-system-x86_64", with_id=None)
    status, out = tree.listing()
    assert status == 0 and [vm.vmid for vm in parse_vm_lines(out)] == ["100"]


def test_dead_vms_and_no_vms(tree: Tree) -> None:
    status, out = tree.listing()
    assert (status, out) == (0, "vmf:end\n")
    tree.conf("pve1", 100, "name: web\n")
    pid = tree.kvm(100)
    os.kill(pid, signal.SIGKILL)
    tree.procs[-1].wait()  # reaped: its pid file stays until `qm cleanup` runs
    status, out = tree.listing()
    assert (status, out) == (0, "vmf:end\n")


@pytest.mark.parametrize(
    ("argv0", "with_id", "pidfile_of", "why"),
    [
        ("/bin/sleep", -1, 100, "not its kvm"),  # a PID reused by another program
        ("/usr/bin/kvm", 101, 100, "not its kvm"),  # another VM's -id
        ("/usr/bin/kvm", -1, 101, "not its kvm"),  # a kvm whose -pidfile is another file
        ("/usr/bin/kvmx", -1, 100, "not its kvm"),
    ],
)
def test_anything_else_under_the_pid_is_a_doubt(
    tree: Tree, argv0: str, with_id: int, pidfile_of: int, why: str
) -> None:
    tree.conf("pve1", 100, "name: web\n")
    pid = tree.kvm(pidfile_of, argv0=argv0, with_id=with_id)
    (tree.run / "100.pid").write_text(f"{pid}\n")
    (tree.run / "101.pid").unlink(missing_ok=True)
    status, out = tree.listing()
    assert status == 3 and why in out, out


def test_a_kernel_thread_under_the_pid_is_a_doubt(tree: Tree) -> None:
    (tree.run / "100.pid").write_text("2\n")  # kthreadd
    status, out = tree.listing()
    assert status == 3 and "cannot read the command line of 2" in out


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("100.pid", "12x\n", "bad pid file"),
        ("100.pid", "", "bad pid file"),
        ("100.pid", "0\n", "bad pid file"),
        ("100.pid", "0123\n", "bad pid file"),  # /proc/0123 does not exist: never "gone"
        ("0100.pid", "1\n", "not named after a VMID"),
        ("web.pid", "1\n", "not named after a VMID"),
    ],
)
def test_pid_files_it_cannot_read(tree: Tree, name: str, content: str, why: str) -> None:
    (tree.run / name).write_text(content)
    status, out = tree.listing()
    assert status == 3 and why in out, out


def test_a_vmid_configured_on_two_nodes_is_a_doubt(tree: Tree) -> None:
    tree.conf("pve1", 100, "name: a\n")
    tree.conf("pve2", 100, "name: b\n")
    tree.kvm(100)
    status, out = tree.listing()
    assert status == 3 and "config on two nodes" in out


def test_a_running_vmid_with_no_config_on_any_node_is_a_doubt(tree: Tree) -> None:
    # The end of a live migration: the config left the source's directory after the glob
    # looked at the target's. Listed under its VMID only, a request by name would not see it.
    tree.kvm(100)
    status, out = tree.listing()
    assert status == 3 and "VMID 100 runs but has no config on any node (moving?)" in out, out


def session_listing(tree: Tree, pve_node: str) -> tuple[int, str]:
    """Shell mode's session setup for an entry with this pve_node, then the listing."""
    host = HostConfig(name="hv", address="192.0.2.1", kind="proxmox", pve_node=pve_node)
    setup = pve.session_setup(host)
    return tree.sh(setup + "\n" + pve.pidfile_listing(str(tree.run), str(tree.pve)), node="")


def this_node() -> str:
    return os.uname().nodename.split(".")[0]


def test_not_that_node_or_no_run_dir(tree: Tree) -> None:
    (tree.pve / "nodes" / this_node() / "qemu-server").mkdir(parents=True, exist_ok=True)
    assert session_listing(tree, this_node()) == (0, "vmf:end\n")
    # /etc/pve/nodes/pve2 exists on every node of the cluster: the session must not take this
    # host for pve2 on the entry's word, or a VM running on the real pve2 is never listed.
    status, out = session_listing(tree, "pve2" if this_node() != "pve2" else "pve1")
    assert status == 3 and "no Proxmox node name" in out, out
    assert f"does not match the host (uname -n: {this_node()})" in out, out
    status, out = tree.listing(node="pve9")
    assert status == 3 and "not mounted or not that node" in out
    status, out = tree.listing(node="")
    assert status == 3 and "no Proxmox node name" in out
    tree.run.rmdir()
    status, out = tree.listing()
    assert status == 3 and "no " in out


def test_a_name_with_a_line_separator_fails_the_listing(tree: Tree) -> None:
    tree.conf("pve1", 100, "name: web\u2028vmf:vm 1 101 pve1 other\n")
    tree.kvm(100)
    status, out = tree.listing()
    assert status == 0
    with pytest.raises(ParseError, match="U\\+2028"):
        parse_vm_lines(out)


# ------------------------------------------------------------------------------ registrations


def registrations(tree: Tree) -> tuple[RegisteredVM, ...]:
    status, out = tree.sh(cluster.registered_command(str(tree.pve)))
    assert status == 0, out
    return cluster.parse_registered(out)


def test_registrations_of_the_cluster_from_any_node(tree: Tree) -> None:
    tree.conf("pve1", 100, 'name: it\'s "web" vmf:end\n[PENDING]\nname: next\n')
    tree.conf("pve2", 101, "memory: 512\n")
    (tree.pve / "nodes" / "pve2" / "lxc").mkdir()
    (tree.pve / "nodes" / "pve2" / "lxc" / "102.conf").write_text("hostname: ct\n")
    tree.vmlist({100: ("pve1", "qemu"), 101: ("pve2", "qemu"), 102: ("pve2", "lxc")})
    assert [(r.vmid, r.name, r.owner) for r in registrations(tree)] == [
        ("100", 'it\'s "web" vmf:end', "pve1"),
        ("101", "vm101", "pve2"),
    ]


def test_registrations_of_an_empty_cluster(tree: Tree) -> None:
    tree.pve.joinpath(".vmlist").write_text('{\n"version": 1\n}\n')
    assert registrations(tree) == ()


def test_a_name_that_is_not_utf8_fails_the_registrations(tree: Tree) -> None:
    tree.conf("pve1", 100, "").write_bytes(b"name: w\xffb\n")
    tree.vmlist({100: ("pve1", "qemu")})
    done = subprocess.run(
        ["sh", "-c", cluster.registered_command(str(tree.pve))],
        capture_output=True,
        env={**os.environ, "LC_ALL": "C"},
        check=True,
    )
    # Decoded as the link decodes what a host sends.
    with pytest.raises(ParseError, match="not UTF-8"):
        cluster.parse_registered(done.stdout.decode("utf-8", errors="replace"))


def test_no_vmlist_fails(tree: Tree) -> None:
    status, out = tree.sh(cluster.registered_command(str(tree.pve)))
    assert status == 3 and "cannot read" in out


# ------------------------------------------------------------------------------ guarded kill


def kill(tree: Tree, vmid: str, pid: int) -> KillOutcome:
    command = pve.kill_function(str(tree.run)).call(vmid, pid, procfs.kill_tries(5.0))
    _status, out = tree.sh(command)
    return parse_kill_marker(out)


def test_guarded_kill(tree: Tree) -> None:
    pid = tree.kvm(100)
    assert kill(tree, "101", pid) is KillOutcome.NOT_THAT_VM  # another VMID: never killed
    assert tree.procs[-1].poll() is None
    assert kill(tree, "100", pid) is KillOutcome.KILLED
    tree.procs[-1].wait()
    assert kill(tree, "100", pid) is KillOutcome.NOT_RUNNING


def test_guarded_kill_spares_another_program(tree: Tree) -> None:
    pid = tree.kvm(100, argv0="/bin/sleep")
    assert kill(tree, "100", pid) is KillOutcome.NOT_THAT_VM
    assert tree.procs[-1].poll() is None


# ------------------------------------------------------------------------------ HA, power-on

HA_MANAGER = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/run/calls"
exit "$(cat "$(dirname "$0")/run/status")"
"""


@pytest.mark.parametrize(
    "case",
    [
        (None, "0", "not-managed", False),
        ("vm: 100\n\tstate started\n\tmax_relocate 2\n", "0", "stop-accepted", True),
        ("vm: 100\n", "0", "stop-accepted", True),  # state started by default
        ("vm: 100\n\tstate started\n", "255", "stop-refused", True),  # no quorum
        ("vm: 100\n\tstate ignored\n", "0", "not-managed", False),
        ("ct: 100\n\tstate started\n\nvm: 1000\n", "0", "not-managed", False),
        ("vm: 101\n\tstate started\n\nvm: 100\n\tstate stopped\n", "0", "stop-accepted", True),
    ],
)
def test_hold_off(tree: Tree, tmp_path: Path, case: tuple[str | None, str, str, bool]) -> None:
    """case: resources.cfg (None: no file), ha-manager's exit status, outcome, called."""
    resources, status, outcome, called = case
    bin_dir = stand_in(tmp_path, "ha-manager", HA_MANAGER, status=status, calls="")
    if resources is not None:
        (tree.pve / "ha" / "resources.cfg").write_text(resources)
    _rc, out = tree.sh(ha.hold_off_command("100", str(tree.pve)), path=bin_dir)
    assert ha.parse_hold_off(out).outcome == outcome, out
    calls = (bin_dir / "run" / "calls").read_text()
    assert calls == ("crm-command stop vm:100 0\n" if called else "")


QM = """#!/bin/sh
echo "qm $@" >> "$(dirname "$0")/run/calls"
"""


def power_on(tree: Tree, bin_dir: Path, reg: RegisteredVM, wait: float = 5.0) -> tuple[int, str]:
    command = ha.power_on_command(reg, str(tree.pve), str(tree.run), wait=wait)
    return tree.sh(command, path=bin_dir)


def test_power_on_rechecks_the_config(tree: Tree, tmp_path: Path) -> None:
    bin_dir = stand_in(tmp_path, "qm", QM, calls="")
    stand_in(tmp_path, "ha-manager", HA_MANAGER, status="0")
    reg = RegisteredVM("100", "web", "", owner="pve1")
    status, out = power_on(tree, bin_dir, reg)
    assert status == 1 and "no config on pve1" in out
    tree.conf("pve1", 100, "name: reused\n")  # destroyed, and its VMID given to another VM
    status, out = power_on(tree, bin_dir, reg)
    assert status == 1 and "now names another VM: reused" in out
    assert (bin_dir / "run" / "calls").read_text() == ""
    tree.conf("pve1", 100, "name: web\n")
    status, out = power_on(tree, bin_dir, reg)
    assert status == 0, out
    assert (bin_dir / "run" / "calls").read_text() == "qm start 100\n"


def test_power_on_refuses_on_a_session_that_is_not_that_node(tree: Tree, tmp_path: Path) -> None:
    bin_dir = stand_in(tmp_path, "qm", QM, calls="")
    tree.conf("pve1", 100, "name: web\n")
    host = HostConfig(name="hv", address="192.0.2.1", kind="proxmox", pve_node="pve1")
    command = ha.power_on_command(RegisteredVM("100", "web", "", owner="pve1"), str(tree.pve))
    if this_node() == "pve1":
        pytest.skip("this machine is named pve1")
    status, out = tree.sh(pve.session_setup(host) + "\n" + command, path=bin_dir)
    assert status == 1 and "does not match the host" in out, out
    assert (bin_dir / "run" / "calls").read_text() == ""


def test_power_on_of_an_ha_vm_goes_through_the_ha_stack(tree: Tree, tmp_path: Path) -> None:
    bin_dir = stand_in(tmp_path, "qm", QM, calls="")
    stand_in(tmp_path, "ha-manager", HA_MANAGER, status="0")
    tree.conf("pve1", 100, "name: web\n")
    (tree.pve / "ha" / "resources.cfg").write_text("vm: 100\n\tstate stopped\n")
    reg = RegisteredVM("100", "web", "", owner="pve1")
    status, out = power_on(tree, bin_dir, reg, wait=0.3)
    assert status == 1 and "did not start VMID 100" in out
    # A stale pid file whose PID now runs another program: not the VM started.
    (tree.run / "100.pid").write_text(f"{os.getpid()}\n")
    status, out = power_on(tree, bin_dir, reg, wait=0.3)
    assert status == 1 and "did not start VMID 100" in out
    tree.kvm(100)  # the HA stack started it
    status, out = power_on(tree, bin_dir, reg)
    assert status == 0, out
    assert (bin_dir / "run" / "calls").read_text() == "set vm:100 --state started\n" * 3
