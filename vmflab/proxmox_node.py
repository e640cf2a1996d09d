"""What runs inside one lab Proxmox node: the VM processes (stdlib only).

Used by the node's PID 1 (``vmflab.pid1.proxmox``: lab verbs, the HA stand-in) and by the ``qm``
stand-in (``vmflab.proxmox_cli``), always inside the node's mount namespace, where the shared
tree is ``/etc/pve``, ``/var/run/qemu-server`` is the node's own and ``/usr/bin/kvm`` is the
lab's stand-in (``vmflab/shims_pve/kvm.c``).

Sources: ../shared/reference/proxmox.md §2 (qemu-server ``config_to_command``,
``instance_running_locally``, ``_do_vm_stop``, ``vm_stop_cleanup``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from vmflab.proxmox_tree import PveTree, TreeError, check_vmid

RUN_DIR = "/var/run/qemu-server"
KVM = "/usr/bin/kvm"
QEMU = "/usr/bin/qemu-system-x86_64"
RUN_SUFFIXES = ("mon", "qmp", "pid", "vnc", "qga")
STOP_TIMEOUT_S = 60  # qm stop's default --timeout
TERM_WAIT_S = 10  # _do_vm_stop: SIGTERM, then up to 10 s before SIGKILL
START_TIMEOUT_S = 30.0
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}


def pid_file(vmid: int) -> str:
    return f"{RUN_DIR}/{check_vmid(vmid)}.pid"


def kvm_argv(vmid: int, options: dict[str, str], *, real_qemu: bool, accel: str) -> list[str]:
    """Proxmox's kvm command line (qemu-server ``config_to_command``; the head is verbatim from
    ``src/test/cfg2cmd/simple1.conf.cmd``). ``real_qemu``: upstream qemu, which refuses
    Proxmox's ``-id`` (so the line has none) and runs a microvm of 32 MiB; otherwise the lab's
    kvm stand-in, which holds the exact line."""
    name = options.get("name") or f"vm{vmid}"
    smbios = options.get("smbios1") or f"uuid={uuid.uuid5(uuid.NAMESPACE_OID, str(vmid))}"
    head = [QEMU] if real_qemu else [KVM, "-id", str(vmid)]
    # QEMU 7.2 here knows ``reconnect`` (seconds), not 9.2's ``reconnect-ms``.
    reconnect = "reconnect=5" if real_qemu else "reconnect-ms=5000"
    argv = [
        *head,
        *("-name", name, "-no-shutdown"),
        *("-chardev", f"socket,id=qmp,path={RUN_DIR}/{vmid}.qmp,server=on,wait=off"),
        *("-mon", "chardev=qmp,mode=control"),
        *("-chardev", f"socket,id=qmp-event,path=/var/run/qmeventd.sock,{reconnect}"),
        *("-mon", "chardev=qmp-event,mode=control"),
        *("-pidfile", pid_file(vmid), "-daemonize"),
        *("-smbios", f"type=1,{smbios}"),
    ]
    if real_qemu:
        return [
            *argv,
            *("-machine", f"microvm,accel={accel}", "-m", "32", "-nodefaults"),
            *("-no-user-config", "-display", "none", "-serial", "none"),
        ]
    memory = options.get("memory", "512")
    return [
        *argv,
        *("-smp", "1,sockets=1,cores=1,maxcpus=1", "-nodefaults"),
        *("-vnc", f"unix:{RUN_DIR}/{vmid}.vnc,password=on"),
        *("-cpu", "kvm64,enforce,+kvm_pv_eoi,+kvm_pv_unhalt,+lahf_lm,+sep", "-m", memory),
        *("-machine", "hpet=off,type=pc+pve0"),
    ]


def cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="surrogateescape").split("\0")[:-1] if raw else []


def process_running(pid: int) -> bool:
    """``PVE::ProcFSTools::check_process_running``: running unless its state is Z (or gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return False
    rest = stat.rpartition(") ")[2]
    return bool(rest) and rest[0] not in "ZX"


def running_pid(vmid: int) -> int | None:
    """``instance_running_locally``: the pid file's PID if it is a kvm/qemu whose ``-pidfile``
    is that very file and which is not a zombie."""
    path = pid_file(vmid)
    try:
        text = Path(path).read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    line = text.split("\n")[0]
    if not line.isdigit():
        return None
    pid = int(line)
    argv = cmdline(pid)
    if not argv or not (argv[0].endswith("kvm") or "/qemu-" in argv[0]):
        return None
    value = next((argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "-pidfile"), None)
    if value != path:
        return None
    return pid if process_running(pid) else None


def real_qemu_vmids(tree: PveTree) -> set[int]:
    """VMIDs the lab runs under upstream qemu (a lab-only mark, kept beside the tree)."""
    with contextlib.suppress(OSError):
        text = (tree.state / "real-qemu").read_text(encoding="ascii")
        return {int(w) for w in text.split()}
    return set()


def start(tree: PveTree, node: str, vmid: int, *, nocheck: bool = False, accel: str = "kvm") -> int:
    """``vm_start``: the config must be on this node (unless ``nocheck``: a migration target),
    the VM not running; runs the kvm command line (which daemonizes and writes the pid file);
    returns the VM's PID."""
    owner, options = tree.read_conf(vmid)
    if owner != node and not nocheck:
        raise TreeError(f"Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist")
    if running_pid(vmid) is not None:
        raise TreeError(f"VM {vmid} already running")
    Path(RUN_DIR).mkdir(parents=True, exist_ok=True)
    argv = kvm_argv(vmid, options, real_qemu=vmid in real_qemu_vmids(tree), accel=accel)
    done = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=ENV,
        timeout=START_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        raise TreeError(f"start failed: command '{argv[0]} -id {vmid} ...' failed: {err}")
    pid = running_pid(vmid)
    if pid is None:
        raise TreeError(f"start failed: VM {vmid} not running after its start")
    return pid


def cleanup(vmid: int) -> None:
    """``vm_stop_cleanup``: the run files go."""
    for suffix in RUN_SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            Path(f"{RUN_DIR}/{vmid}.{suffix}").unlink()


def stop(vmid: int, *, timeout: int = STOP_TIMEOUT_S, hard: bool = False) -> bool:
    """``_do_vm_stop`` with force: "quit" (SIGTERM: the stand-in has no QMP; qemu quits on
    both), then one ``check_running`` a second up to ``timeout``, SIGTERM, 10 s, SIGKILL; then
    the cleanup. ``hard``: SIGKILL at once (the lab's own power cut). False if it was not
    running."""
    pid = running_pid(vmid)
    if pid is None:
        cleanup(vmid)
        return False
    if hard:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        count = 0
        while count < timeout and running_pid(vmid) is not None:
            count += 1
            time.sleep(1)  # qemu-server's own poll interval, part of what is reproduced
        if running_pid(vmid) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            time.sleep(1)  # as _do_vm_stop does after SIGKILL
    cleanup(vmid)
    return True


def local_vms(tree: PveTree, node: str) -> dict[int, dict[str, str]]:
    """The VMs this node owns (``config_list``), with their current options."""
    found = {}
    for conf in (tree.root / "nodes" / node / "qemu-server").glob("*.conf"):
        vmid = check_vmid(conf.stem)
        with contextlib.suppress(TreeError, OSError):
            found[vmid] = tree.read_conf(vmid)[1]
    return found
