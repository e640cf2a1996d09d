"""The cluster node layer of the lab's PID 1 (``vmflab.pid1.core``, stdlib only).

The machine runs inside ``unshare --pid --fork --mount-proc --mount --uts --net --propagation
private``, so the node has its own process tree, hostname, network stack, ``/run``, ``/dev/shm``
and Pacemaker/Corosync state directories: corosync and pacemaker use fixed paths and abstract
unix sockets, one set per namespace. This layer

* binds the machine to the node's VM: it inherits a pidfd of the VM's process and ends the
  machine the moment that process dies. The kernel then SIGKILLs every process of the PID
  namespace, so killing the VM is a power cut of the node (corosync, pacemaker and any fence
  agent running there die with it);
* mounts a tmpfs on ``/run`` and ``/dev/shm``, bind-mounts the node's directories on
  ``/var/lib/pacemaker``, ``/var/log/pacemaker``, ``/var/lib/corosync`` and ``/etc/corosync``,
  overlays ``/usr/sbin`` read-only with the node's extra fence agents (visible to this node
  only: the real ``/usr/sbin`` is never written), and makes a Python package directory
  readable by every user of the node (see ``--python-dir``);
* starts corosync, then pacemakerd once corosync answers, and stops them, on request.

It says ``ready`` after set-up, unasked. Its own verbs: ``start`` -> ``started`` (pacemakerd
launched; the cluster join is watched from outside); ``stop`` -> ``stopped``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import select
import signal
import time
from pathlib import Path
from typing import ClassVar

from vmflab.pid1.core import HostEnds, Init
from vmflab.pid1.system import (
    ENV,
    MS_BIND,
    MS_NODEV,
    MS_NOSUID,
    MS_RDONLY,
    MS_REMOUNT,
    InitError,
    libc_call,
    mount,
    spawn,
)

COROSYNC_WAIT_S = 30.0
STOP_TIMEOUT_S = 30.0
# Runs as a child of the init: waits until corosync's configuration API answers, then becomes
# pacemakerd (which would otherwise give up on a corosync that is still starting).
PACEMAKER_BOOT = (
    "i=0; until corosync-cfgtool -s >/dev/null 2>&1; do "
    'i=$((i + 1)); if [ "$i" -gt {tries} ]; then echo "corosync never answered" >&2; exit 69; fi; '
    "sleep 0.1; done; exec pacemakerd"
)
PACEMAKER_ENV = {
    "PCMK_logfile": "/var/log/pacemaker/pacemaker.log",
    "PCMK_logfacility": "none",
    "HOME": "/var/lib/pacemaker",
}


class NodeInit(Init):
    ready_unasked: ClassVar[bool] = True

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--hostname", required=True)
        parser.add_argument("--vm-pidfd", type=int, required=True, help="pidfd of the VM's process")
        parser.add_argument("--lib-dir", required=True, help="bind-mounted on /var/lib/pacemaker")
        parser.add_argument("--log-dir", required=True, help="bind-mounted on /var/log/pacemaker")
        parser.add_argument(
            "--corosync-lib", required=True, help="bind-mounted on /var/lib/corosync"
        )
        parser.add_argument("--corosync-etc", required=True, help="bind-mounted on /etc/corosync")
        parser.add_argument("--sbin-dir", required=True, help="overlaid on /usr/sbin")
        parser.add_argument("--python-dir", help="bind-mounted read-only on --python-mount")
        parser.add_argument("--python-mount", help="where the node sees --python-dir")
        parser.add_argument("--stack-log", required=True, help="corosync/pacemakerd stdout+stderr")

    def set_up(self) -> None:
        args = self.args
        # Passed to this init only: corosync, pacemakerd and the agents must not hold the VM.
        os.set_inheritable(args.vm_pidfd, False)
        # Watched from the start: a VM that dies during set-up ends the boot.
        self.watch(args.vm_pidfd, lambda: "the VM's process is gone: power cut")
        mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
        mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        for source, target in (
            (args.lib_dir, "/var/lib/pacemaker"),
            (args.log_dir, "/var/log/pacemaker"),
            (args.corosync_lib, "/var/lib/corosync"),
            (args.corosync_etc, "/etc/corosync"),
        ):
            mount(source, target, None, MS_BIND, None)
        # Read-only overlay (no upper dir): the node's agents on top of the real /usr/sbin.
        mount("overlay", "/usr/sbin", "overlay", MS_RDONLY, f"lowerdir={args.sbin_dir}:/usr/sbin")
        if args.python_dir and args.python_mount:
            # Pacemaker's controller runs agents as hacluster (for their metadata): a bind mount
            # lets that user import the agent's package even under a directory it cannot enter.
            Path(args.python_mount).mkdir(mode=0o755, parents=True)
            mount(args.python_dir, args.python_mount, None, MS_BIND, None)
            mount("none", args.python_mount, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)
        name = args.hostname.encode()
        libc_call("sethostname", name, ctypes.c_size_t(len(name)))
        pid = spawn(["ip", "link", "set", "lo", "up"], env=ENV)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code != 0:
            raise InitError(f"ip link set lo up exited with {code}")

    def request(self, words: list[str]) -> bool:
        match words:
            case ["start"]:
                self.start()
                self.reply("started")
            case ["stop"]:
                deadline = time.monotonic() + STOP_TIMEOUT_S
                # pacemakerd stops its daemons and leaves the cluster cleanly, then corosync.
                self.stop_child("pacemakerd", deadline)
                self.stop_child("corosync", deadline)
                self.reply("stopped")
            case _:
                return False
        return True

    def start(self) -> None:
        if self.running("corosync") or self.running("pacemakerd"):
            raise InitError("the cluster stack is already running")
        out = os.open(self.args.stack_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            self.started("corosync", spawn(["corosync", "-f"], out_fd=out, env=ENV))
            boot = ["sh", "-c", PACEMAKER_BOOT.format(tries=int(COROSYNC_WAIT_S / 0.1))]
            self.started("pacemakerd", spawn(boot, out_fd=out, env={**ENV, **PACEMAKER_ENV}))
        finally:
            os.close(out)

    def stop_child(self, name: str, deadline: float) -> None:
        pid = self.running(name)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        while pid not in self.exits:
            self.reap()
            if time.monotonic() > deadline:
                raise InitError(f"{name} {pid} did not stop within {STOP_TIMEOUT_S} s")
            # Waits on the VM meanwhile: a stop never delays a power cut.
            if select.select([self.args.vm_pidfd], [], [], 0.01)[0]:
                raise HostEnds("the VM's process died during a request: power cut")
