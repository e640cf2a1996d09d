"""The libvirt backend's own commands over SSH on real libvirt 9 / qemu: domain names libvirt
escapes in its pid file names, names no listing can carry, processes no guard can judge, and a
pid file naming another domain's qemu. Each listing is checked on its own (the daemon tries the
next when one fails: see test_evidence_libvirt.py for what a fence answers)."""

from __future__ import annotations

import shlex
from collections.abc import Callable

import pytest

from vmfenced.backends import libvirt as lv
from vmfenced.backends import parse_kill_marker
from vmfenced.errors import ParseError
from vmfenced.model import KillOutcome, RegisteredVM, RunningVM
from vmflab import Lab, LibvirtHost
from vmflab.libvirt import UNJUDGEABLE_KINDS, unjudgeable_argv

pytestmark = pytest.mark.integration

# libvirt writes &, ', ", <, > as XML entities in the pid file's name (a&amp;b.pid).
ODD = "a&b'c\"d<e>f"
SINGLES = ("x&y", "q'r", 'd"q', "l<t", "g>t", "&", "x&amp;y")
FAST, FALLBACK = (listing.command for listing in lv.BACKEND.listings)


def shell(host: LibvirtHost) -> Callable[[str], tuple[int, str]]:
    """Runs a script as the daemon's lane would (dash, qemu:///system, C locale)."""

    def sh(script: str) -> tuple[int, str]:
        setup = "LIBVIRT_DEFAULT_URI=qemu:///system; export LIBVIRT_DEFAULT_URI; LC_ALL=C; "
        return host.ssh_exact(f"sh -c {shlex.quote(setup + 'export LC_ALL; ' + script)}")

    return sh


def listed(sh: Callable[[str], tuple[int, str]], command: str) -> dict[str, int]:
    status, out = sh(command)
    assert status == 0, out
    return {vm.name: vm.cartel for vm in lv.parse_vm_lines(out)}


def test_escaped_names_are_listed_killed_and_started(kvm_lab: Lab) -> None:
    kvm1 = kvm_lab.libvirt["kvm1"]
    sh = shell(kvm1)
    pids = {name: kvm1.start_vm(name) for name in (ODD, *SINGLES, "plain")}
    files = sh("ls /run/libvirt/qemu")[1].split("\n")
    assert "a&amp;b&apos;c&quot;d&lt;e&gt;f.pid" in files and "x&amp;amp;y.pid" in files
    assert kvm1.vm_pids() == pids
    # Both listings, each on its own: the name qemu and virsh report, the pid file's PID.
    assert listed(sh, FAST) == pids
    assert listed(sh, FALLBACK) == pids
    registered = {vm.name: vm for vm in lv.parse_registered(sh(lv.REGISTERED_COMMAND)[1])}
    assert set(registered) == set(pids)
    # The guard tells the escaped names apart: x&y's qemu is never x&amp;y's.
    answer = sh(lv.kill_command(RunningVM("x&amp;y", "", pids["x&y"]), 5))[1]
    assert parse_kill_marker(answer) is KillOutcome.NOT_THAT_VM
    assert kvm1.pid_alive(pids["x&y"])
    answer = sh(lv.kill_command(RunningVM(ODD, "", pids[ODD]), 5))[1]
    assert parse_kill_marker(answer) is KillOutcome.KILLED
    assert not kvm1.pid_alive(pids[ODD])
    # Power-on by UUID, re-checked against the name (virsh domname) on real virsh.
    status, out = sh(lv.power_on_command(registered[ODD]))
    assert status == 0, out
    assert ODD in kvm1.vm_pids()


def test_power_on_refuses_a_uuid_now_naming_another_domain(kvm_lab: Lab) -> None:
    kvm1 = kvm_lab.libvirt["kvm1"]
    sh = shell(kvm1)
    uuid = kvm1.define_vm("old")
    # Undefined since the inventory, and its UUID given to another domain.
    kvm1.undefine_vm("old")
    kvm1.define_vm("new", uuid=uuid)
    status, out = sh(lv.power_on_command(RegisteredVM(uuid, "old", f"uuid {uuid}")))
    assert status == 1 and out.startswith("vmf:refused") and "new" in out, out
    assert kvm1.domstate("new") == "shut off"
    status, out = sh(lv.power_on_command(RegisteredVM(uuid, "new", f"uuid {uuid}")))
    assert status == 0, out
    assert kvm1.domstate("new") == "running"


@pytest.mark.parametrize("bad", ["\t", "\r", "\u0085", "\u2028"])
def test_a_name_no_listing_can_carry_fails_the_listing(kvm_lab: Lab, bad: str) -> None:
    """libvirt accepts these in a name (it refuses only "\\n" and "/"): the host's answer is a
    listing failure that says why, never a name read as two records."""
    kvm1 = kvm_lab.libvirt["kvm1"]
    sh = shell(kvm1)
    kvm1.start_vm(f"vm1{bad}vmf:vm 1 - vm2")
    kvm1.start_vm("vm3")
    for command in (FAST, FALLBACK):
        status, out = sh(command)
        assert status == 0, out
        with pytest.raises(ParseError, match="control or line-separator"):
            lv.parse_vm_lines(out)
    with pytest.raises(ParseError, match="control or line-separator"):
        lv.parse_registered(sh(lv.REGISTERED_COMMAND)[1])


def write_pid_file(host: LibvirtHost, name: str, pid: int) -> None:
    path = shlex.quote(f"/run/libvirt/qemu/{name}.pid")
    host.ssh(f"printf %s {pid} > {path}")


def wait_unjudgeable(host: LibvirtHost, pid: int, kind: str) -> None:
    """Until the helper is in its state: a qemu's comm (set first: a command line also reads
    empty for a moment inside execve), an empty command line, and a zombie leader or not."""
    stat = f"/proc/{pid}/stat"
    check = f'grep -q "^{pid} (qemu-system-x86) " {stat} && [ ! -s /proc/{pid}/cmdline ] && '
    check += f'[ "$(cut -d")" -f2 {stat} | cut -c2)" ' + (
        "= Z ]" if kind == "zombie-leader" else "!= Z ]"
    )
    script = f"i=0; until {check}; do i=$((i+1)); [ $i -ge 2000 ] && exit 1; sleep 0.005; done"
    host.ssh(script)  # a deadline of about 10 s on the host, polling the condition


@pytest.mark.parametrize("kind", UNJUDGEABLE_KINDS)
def test_a_process_no_guard_can_judge_is_a_doubt(kvm_lab: Lab, kind: str) -> None:
    kvm1 = kvm_lab.libvirt["kvm1"]
    sh = shell(kvm1)
    running = kvm1.start_vm("vm2")
    pid = kvm1.spawn(unjudgeable_argv(kind))
    try:
        wait_unjudgeable(kvm1, pid, kind)
        # Only the fallback's /proc scan sees it: a qemu's comm with an empty command line.
        assert listed(sh, FAST) == {"vm2": running}
        status, out = sh(FALLBACK)
        assert status == 3 and f"cannot judge {pid} (qemu-system-x86" in out, out
        # Named by a pid file (vm1 defined, shut off): the fast listing doubts it too.
        kvm1.define_vm("vm1")
        write_pid_file(kvm1, "vm1", pid)
        status, out = sh(FAST)
        assert status == 3 and f"{pid} (vm1)" in out, out
        answer = sh(lv.kill_command(RunningVM("vm1", "", pid), 2))[1]
        assert "vmf:error" in answer, answer
    finally:
        kvm1.ssh(f"kill -9 {pid}", check=False)


def test_a_pid_file_naming_another_domains_qemu_is_a_doubt(kvm_lab: Lab) -> None:
    kvm1 = kvm_lab.libvirt["kvm1"]
    sh = shell(kvm1)
    other = kvm1.start_vm("vm10")
    kvm1.define_vm("vm1")
    write_pid_file(kvm1, "vm1", other)
    status, out = sh(FAST)
    assert status == 3 and f"pid file of vm1 holds {other}" in out, out
    # libvirtd's own view, matched to /proc: vm10 runs, vm1 does not.
    assert listed(sh, FALLBACK) == {"vm10": other}
