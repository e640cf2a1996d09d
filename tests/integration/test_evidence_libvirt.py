"""What the daemon answers from libvirt hosts' evidence, on real libvirt 9 / qemu: a domain whose
name libvirt escapes is fenced (its qemu really dies), and a domain whose process no guard can
judge is never reported off."""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from tests.integration.conftest import fence
from tests.waiting import wait_for
from vmflab import Lab, LibvirtHost
from vmflab.daemon import LabDaemon
from vmflab.libvirt import UNJUDGEABLE_KINDS, unjudgeable_argv

pytestmark = pytest.mark.integration

ODD = "a&b'c\"d<e>f"


def never_off(reply: dict[str, Any]) -> bool:
    """A failed request, or any answer but "off" / "already off"."""
    if not reply["ok"]:
        return True
    result = reply["result"]
    return bool(result.get("outcome") != "already_off" and result.get("state") != "off")


@pytest.mark.parametrize("name", [ODD, "x&y", "q'r", 'd"q', "l<t", "g>t"])
def test_fence_of_an_escaped_name_kills_its_qemu(kvm_lab: Lab, name: str) -> None:
    kvm1 = kvm_lab.libvirt["kvm1"]
    target = kvm1.start_vm(name)
    # x&amp;y's pid file is x&amp;amp;y.pid: never taken for x&y's, nor the other way round.
    neighbour = kvm1.start_vm("x&amp;y")
    with LabDaemon(kvm_lab) as daemon:
        status = daemon.request({"op": "vm_status", "vm": name})
        assert status["ok"] and status["result"]["state"] == "on", status
        reply = fence(daemon, name)
        assert reply["ok"], reply
        result = reply["result"]
        assert (result["outcome"], result["host"], result["cartel"]) == ("killed", "kvm1", target)
        assert not kvm1.pid_alive(target)
        assert wait_for(lambda: kvm1.domstate(name).startswith("shut off"))
        assert kvm1.pid_alive(neighbour)
        again = fence(daemon, name)
        assert again["ok"] and again["result"]["outcome"] == "already_off", again


def write_pid_file(host: LibvirtHost, name: str, pid: int) -> None:
    host.ssh(f"printf %s {pid} > {shlex.quote(f'/run/libvirt/qemu/{name}.pid')}")


def unjudgeable(host: LibvirtHost, pid: int) -> bool:
    """A qemu's comm (set first: a command line also reads empty inside execve), no cmdline."""
    check = f'grep -q "^{pid} (qemu-system-x86) " /proc/{pid}/stat && [ ! -s /proc/{pid}/cmdline ]'
    return host.ssh(check, check=False).returncode == 0


@pytest.mark.parametrize("kind", UNJUDGEABLE_KINDS)
def test_a_domain_whose_process_cannot_be_judged_is_never_off(kvm_lab: Lab, kind: str) -> None:
    """vm1's pid file names a live process whose command line reads empty (a zombie leader whose
    thread still runs, or an emptied argv area) and whose comm is a qemu's: both listings doubt
    it, so fence and status fail rather than answer "off"."""
    kvm1 = kvm_lab.libvirt["kvm1"]
    kvm1.define_vm("vm1")
    with LabDaemon(kvm_lab) as daemon:
        pid = kvm1.spawn(unjudgeable_argv(kind))
        try:
            assert wait_for(lambda: unjudgeable(kvm1, pid))
            write_pid_file(kvm1, "vm1", pid)
            reply = fence(daemon, "vm1")
            assert not reply["ok"] and reply["error"]["code"] == "fence_failed", reply
            assert "kvm1" in reply["error"]["message"]
            status = daemon.request({"op": "vm_status", "vm": "vm1"})
            assert never_off(status), status
            # No pid file names it: the fast listing cannot see it, the fallback scan could.
            kvm1.ssh("rm -f /run/libvirt/qemu/vm1.pid")
        finally:
            kvm1.ssh(f"kill -9 {pid}", check=False)
        assert wait_for(lambda: not kvm1.pid_alive(pid))
        reply = fence(daemon, "vm1")
        assert reply["ok"] and reply["result"]["outcome"] == "already_off", reply


def test_a_pid_file_naming_another_domains_qemu_never_kills_it(kvm_lab: Lab) -> None:
    """The fast listing doubts vm1.pid holding vm10's qemu; libvirtd's view matched to /proc
    (the fallback) says vm1 is off and vm10 runs: vm10 is left alone."""
    kvm1 = kvm_lab.libvirt["kvm1"]
    kvm1.define_vm("vm1")
    other = kvm1.start_vm("vm10")
    with LabDaemon(kvm_lab) as daemon:
        write_pid_file(kvm1, "vm1", other)
        reply = fence(daemon, "vm1")
        assert reply["ok"] and reply["result"]["outcome"] == "already_off", reply
        assert kvm1.pid_alive(other)
        assert kvm1.domstate("vm10") == "running"
