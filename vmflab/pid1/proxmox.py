"""The Proxmox VE layer of the lab's PID 1 (see ``core``).

* A UTS namespace of its own with the node's name as hostname (``PVE::INotify::nodename`` is
  the hostname), set before sshd starts so that every session sees it.
* The shared pmxcfs tree bind-mounted on ``/etc/pve`` (one host directory for every node, as
  pmxcfs is one filesystem), and the node's own ``.members`` file on ``/etc/pve/.members``
  (pmxcfs renders ``nodename`` per node).
* A tmpfs on ``/run/qemu-server`` (= ``/var/run/qemu-server``): the node's pid and QMP files.
* Read-only overlays putting the lab's ``qm`` and ``ha-manager`` first in ``/usr/sbin`` and its
  kvm stand-in at ``/usr/bin/kvm``.
* The HA stand-in: every ``--ha-round`` seconds (10 s, pve-ha-manager's LRM/CRM round, unless
  a test shortens it) the node that is ``--ha-master`` turns queued ``crm-command stop`` lines
  into ``state stopped`` (as the CRM does) and writes ``ha/manager_status``; then every node's
  LRM starts its ``started`` VMs that are not running and stops its ``stopped``/``disabled``
  VMs that are (hard: a SIGKILL, where the real LRM runs ``vm_stop`` with timeout 0).
* qmeventd's cleanup: the run files of a VM process that died go ``--cleanup-delay`` seconds
  later (0.5 s: ``qm cleanup`` is Perl), as after any QEMU exit on Proxmox; until then the pid
  file names a dead (or, after PID reuse, another) process.

Verbs: ``vm-start <vmid> [nocheck]`` -> ``ok <pid>``; ``vm-kill <vmid>`` -> ``ok killed`` |
``ok stopped``; ``vm-pids`` -> ``ok <JSON vmid -> pid>``; ``ha-rounds`` -> ``ok <n>``
(LRM rounds done so far).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import subprocess
import time
from pathlib import Path
from typing import TextIO

from vmflab import proxmox_node as runtime
from vmflab.pid1.core import Init
from vmflab.pid1.system import MS_BIND, MS_RDONLY, MS_REC, InitError, mount
from vmflab.proxmox_tree import PveTree, TreeError, check_vmid

CLONE_NEWUTS = 0x04000000


def set_hostname(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUTS) != 0 or libc.sethostname(name.encode(), len(name)) != 0:
        raise OSError(ctypes.get_errno(), f"cannot set the hostname {name!r}")


class ProxmoxInit(Init):
    def __init__(self, args: argparse.Namespace, log_file: TextIO) -> None:
        Init.__init__(self, args, log_file)
        self.tree = PveTree(Path("/etc/pve"), Path(args.state))
        self.node: str = args.node
        self.rounds = 0
        self.ha_round: float = args.ha_round
        # Each node's HA daemons started at their own moment: rounds out of phase, as on a
        # real cluster (in phase, the CRM's and an LRM's rounds would always meet in one order).
        self._next_round: float = time.monotonic() + self.ha_round * random.random()
        self.cleanup_delay: float = args.cleanup_delay
        self._cleanups: dict[int, tuple[float, int]] = {}  # VMID -> (when, dead PID)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--node", required=True, help="the node's name (its hostname)")
        parser.add_argument("--pve", required=True, help="the shared tree, mounted on /etc/pve")
        parser.add_argument("--members", required=True, help="this node's .members file")
        parser.add_argument("--state", required=True, help="the lab's lock and counters")
        parser.add_argument("--sbin", required=True, help="directory with qm and ha-manager")
        parser.add_argument("--bin", required=True, help="directory with the kvm stand-in")
        parser.add_argument("--bashrc", help="empty file mounted on root's ~/.bashrc")
        parser.add_argument("--ha-round", type=float, default=10.0, help="LRM/CRM round (s)")
        parser.add_argument("--ha-master", action="store_true", help="this node runs the CRM")
        parser.add_argument(
            "--cleanup-delay", type=float, default=0.5, help="qm cleanup after a VM died (s)"
        )
        parser.add_argument("--accel", default="kvm", help="kvm or tcg, for real-qemu VMs")

    def set_up(self) -> None:
        args = self.args
        set_hostname(self.node)
        mount(args.pve, "/etc/pve", None, MS_BIND | MS_REC, None)
        mount(args.members, "/etc/pve/.members", None, MS_BIND, None)
        Path("/run/qemu-server").mkdir(mode=0o755, exist_ok=True)
        mount("tmpfs", "/run/qemu-server", "tmpfs", 0, "mode=0755")
        for lower, target in ((args.sbin, "/usr/sbin"), (args.bin, "/usr/bin")):
            mount("overlay", target, "overlay", MS_RDONLY, f"lowerdir={lower}:{target}")
        if args.bashrc and Path("/root/.bashrc").is_file():
            mount(args.bashrc, "/root/.bashrc", None, MS_BIND, None)

    def request(self, words: list[str]) -> bool:
        try:
            match words:
                case ["vm-start", vmid]:
                    self.reply(f"ok {self._start(vmid, nocheck=False)}")
                case ["vm-start", vmid, "nocheck"]:
                    self.reply(f"ok {self._start(vmid, nocheck=True)}")
                case ["vm-kill", vmid]:
                    killed = runtime.stop(check_vmid(vmid), hard=True)
                    self.reply("ok killed" if killed else "ok stopped")
                case ["vm-pids"]:
                    self.reply(f"ok {json.dumps(self.vm_pids())}")
                case ["ha-rounds"]:
                    self.reply(f"ok {self.rounds}")
                case _:
                    return False
        except (TreeError, subprocess.SubprocessError) as exc:
            raise InitError(str(exc)) from None
        return True

    def _start(self, vmid: str, *, nocheck: bool) -> int:
        return runtime.start(
            self.tree, self.node, check_vmid(vmid), nocheck=nocheck, accel=self.args.accel
        )

    def vm_pids(self) -> dict[int, int]:
        """Every VMID whose pid file names a running kvm/qemu here, config or not."""
        found = {}
        for path in Path(runtime.RUN_DIR).glob("*.pid"):
            if path.stem.isdigit():
                pid = runtime.running_pid(int(path.stem))
                if pid is not None:
                    found[int(path.stem)] = pid
        return found

    # ------------------------------------------------------------------ qmeventd
    def on_exit(self, pid: int, code: int) -> None:
        """A VM process died (every one is reparented to this init): as qmeventd, which sees
        its QMP socket close, have its run files cleaned up ``--cleanup-delay`` seconds later
        (``qm cleanup`` is a Perl start-up and a config lock away), unless it runs again."""
        del code
        for path in Path(runtime.RUN_DIR).glob("*.pid"):
            try:
                named = path.read_text(encoding="ascii").split("\n")[0]
            except (OSError, UnicodeDecodeError):
                continue
            if path.stem.isdigit() and named == str(pid):
                self._cleanups[int(path.stem)] = (time.monotonic() + self.cleanup_delay, pid)

    def run_cleanups(self, now: float) -> None:
        for vmid, (due, pid) in list(self._cleanups.items()):
            if due > now:
                continue
            del self._cleanups[vmid]
            try:
                named = Path(runtime.pid_file(vmid)).read_text(encoding="ascii").split("\n")[0]
            except (OSError, UnicodeDecodeError):
                continue
            if named == str(pid):  # not started again meanwhile
                self.log(f"qmeventd: qm cleanup {vmid} (PID {pid} gone)")
                runtime.cleanup(vmid)

    # ----------------------------------------------------------------------- HA
    def timeout(self) -> float | None:
        due = min([self._next_round, *(d for d, _ in self._cleanups.values())])
        return max(0.0, due - time.monotonic())

    def tick(self) -> None:
        now = time.monotonic()
        self.run_cleanups(now)
        if now < self._next_round:
            return
        self._next_round = now + self.ha_round
        try:
            if self.args.ha_master:
                self.crm_round()
            self.lrm_round()
        except (TreeError, OSError, ValueError, subprocess.SubprocessError) as exc:
            self.log(f"HA round failed: {exc}")
        self.rounds += 1

    def crm_round(self) -> None:
        for line in self.tree.take_crm_commands():
            words = line.split(" ")
            if len(words) == 3 and words[0] == "stop" and words[1].startswith("vm:"):
                vmid = check_vmid(words[1][3:])
                self.log(f"CRM: request immediate service hard-stop for vm:{vmid}")
                self.tree.set_ha(vmid, "stopped")
            else:
                self.log(f"CRM: unknown command {line!r}")
        services = {}
        for vmid, resource in self.tree.ha_resources().items():
            owner = self.tree.owner(vmid)
            if owner is not None and resource.state != "ignored":
                services[vmid] = (owner, resource.state)
        self.tree.write_manager_status(self.node, services)

    def lrm_round(self) -> None:
        for vmid, resource in self.tree.ha_resources().items():
            if self.tree.owner(vmid) != self.node:
                continue
            running = runtime.running_pid(vmid) is not None
            if resource.state == "started" and not running:
                self.log(f"LRM: starting service vm:{vmid}")
                self.started(f"vm:{vmid}", self._start(str(vmid), nocheck=False))
            elif resource.state in ("stopped", "disabled") and running:
                self.log(f"LRM: stopping service vm:{vmid}")
                runtime.stop(vmid, hard=True)
