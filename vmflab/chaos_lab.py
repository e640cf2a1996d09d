"""The lab side of the fault generator: starting, killing, moving VMs and breaking hosts, each
step recorded with the oracle (``vmflab.oracle``) before or as it happens.

Only the lab's public API is used (``LabHost.ssh``/``create_vm``/``set_next_pid``/``files``,
``LibvirtHost.define_vm``/``start_vm``/``undefine_vm``/``spawn``, ``stop_sshd``/``start_sshd``,
``vmflab.procs.stopped``). Out-of-band kills are SIGKILLs sent from outside the host's namespace:
they work while the host is frozen or its sshd is dead, as a crash or an HA restart would.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shlex
import signal
import subprocess
import time
import uuid as uuid_module
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmflab.control import LabError
from vmflab.host import LabHost
from vmflab.lab import Lab
from vmflab.libvirt import LibvirtHost
from vmflab.oracle import Instance, Oracle, inner_pid, proc_stat
from vmflab.procs import stopped

DATASTORES = ("ds1", "ds2")
GONE_TIMEOUT_S = 5.0
LAB_ERRORS = (LabError, subprocess.SubprocessError, OSError)


class Skip(Exception):
    """The step cannot be done now (no candidate, or the lab refuses it): counted, not fatal."""


@dataclass
class Fault:
    kind: str  # "frozen" or "sshd down"
    until: float
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)


class World:
    """The lab's hosts (ESXi and libvirt), which are in the daemon's config, and their faults."""

    def __init__(self, lab: Lab, oracle: Oracle, configured: set[str]) -> None:
        self.lab = lab
        self.oracle = oracle
        self.configured = configured
        self.hosts: dict[str, LabHost | LibvirtHost] = {
            **{n: h for n, h in lab.hosts.items() if h.kind == "esxi"},
            **lab.libvirt,
        }
        self.faults: dict[str, Fault] = {}
        self._paths: dict[tuple[str, str, str], str] = {}  # (host, vm, datastore) -> .vmx
        self._defined: set[tuple[str, str]] = set()  # libvirt (host, vm)
        self._uuids: dict[str, str] = {}
        self._files: dict[str, str] = {}  # display name -> .vmx name (with display names)
        self._slots: dict[int, str] = {}  # outer PID of an ESXi instance -> its datastore
        # Once the ESXi lab takes a display name apart from the .vmx name, duplicates on one
        # host use it; until then, a second datastore holds the second .vmx of the same name.
        self.display_names = "display_name" in inspect.signature(LabHost.create_vm).parameters

    # --------------------------------------------------------------------------- queries
    def kinds(self) -> list[str]:
        return sorted({h.kind for h in self.hosts.values()})

    def usable(self, kind: str, *, configured: bool | None = None) -> list[str]:
        """Hosts of ``kind`` reachable for lab operations (no fault), sorted for the seed."""
        return sorted(
            n
            for n, h in self.hosts.items()
            if h.kind == kind
            and n not in self.faults
            and (configured is None or (n in self.configured) == configured)
        )

    def registered(self, vm: str) -> bool:
        """Whether a host in the daemon's config has ``vm`` registered (.vmx or domain)."""
        # Called from the threads of a burst while the main thread changes them: copies
        # (taken in C, whole under the GIL) are iterated, never the live containers.
        esxi = any(h in self.configured and v == vm for h, v, _ in tuple(self._paths))
        return esxi or any(h in self.configured and v == vm for h, v in tuple(self._defined))

    def kind_of(self, host: str) -> str:
        return self.hosts[host].kind

    def running_on(self, host: str, vm: str) -> list[Instance]:
        return [i for i in self.oracle.live(host) if i.vm == vm]

    # ------------------------------------------------------------------------------ VMs
    def start(self, host: str, vm: str, *, pid: int | None = None) -> Instance:
        """Starts an instance of ``vm`` on ``host`` (the next free datastore on ESXi)."""
        lab_host = self.hosts[host]
        begun = time.monotonic()
        if isinstance(lab_host, LibvirtHost):
            if self.running_on(host, vm):
                raise Skip("libvirt runs one domain per name and host")
            if (host, vm) not in self._defined:
                lab_host.define_vm(vm, uuid=self._uuid(vm))
                self._defined.add((host, vm))
            # Started by UUID and found by it: libvirt names some files of a hostile name
            # otherwise than the name, so LibvirtHost.start_vm cannot read its pid file.
            lab_host.virsh("start", "--domain", self._uuid(vm))
            started = qemu_pid(lab_host, self._uuid(vm))
        else:
            taken = {self._slots.get(i.outer) for i in self.running_on(host, vm)}
            free = [ds for ds in DATASTORES if ds not in taken]
            if not free:
                raise Skip("every datastore of the host runs this name")
            datastore = free[0]
            path = self._vmx(lab_host, vm, datastore)
            if pid is not None:
                lab_host.set_next_pid(pid)
            text = lab_host.ssh(f"vmflab-vm start {shlex.quote(path)} 1").stdout.strip()
            if not text.isdigit():
                raise LabError(f"vmflab-vm start printed {text!r}", host=host)
            started = int(text)
        instance = self.oracle.started(lab_host, vm, started, begun)
        if isinstance(lab_host, LabHost):
            self._slots[instance.outer] = datastore
        return instance

    def _vmx(self, host: LabHost, vm: str, datastore: str) -> str:
        key = (host.name, vm, datastore)
        if key not in self._paths:
            kwargs: dict[str, Any] = {"datastore": datastore, "uuid": self._uuid(vm)}
            create: Callable[..., str] = host.create_vm
            if self.display_names:
                # The display name apart from a plain file name, as ESXi escapes odd names in
                # paths: any name, and one name in both datastores of one host.
                files = self._files.setdefault(vm, f"vm-{len(self._files) + 1}")
                self._paths[key] = create(files, display_name=vm, **kwargs)
            else:
                self._paths[key] = create(vm, **kwargs)
        return self._paths[key]

    def _uuid(self, vm: str) -> str:
        # One BIOS UUID per VM name: a migrated VM keeps it, as vMotion and libvirt do.
        return self._uuids.setdefault(vm, str(uuid_module.uuid4()))

    def kill(self, instance: Instance) -> None:
        """SIGKILL from outside the host; returns once the process is gone (reaped or zombie)."""
        self.oracle.killing(instance)
        with contextlib.suppress(ProcessLookupError):
            os.kill(instance.outer, signal.SIGKILL)
        self.wait_gone(instance)
        self._slots.pop(instance.outer, None)
        lab_host = self.hosts[instance.host]
        if isinstance(lab_host, LibvirtHost) and instance.host not in self.faults:
            # libvirtd reaps its qemu and then kills the PID it knew: a process that took the
            # PID before libvirtd noticed would die by libvirtd's hand, not the daemon's.
            deadline = time.monotonic() + GONE_TIMEOUT_S
            # By name: a domain undefined while it ran is transient, and gone once it stops.
            while lab_host.virsh("domstate", "--domain", instance.vm, check=False).strip() in (
                "running",
                "in shutdown",
            ):
                if time.monotonic() > deadline:
                    raise LabError(f"libvirtd still runs {instance.vm}", host=instance.host)
                time.sleep(0.02)

    @staticmethod
    def wait_gone(instance: Instance, *, reaped: bool = False) -> None:
        """Until the process is dead (a zombie counts, unless ``reaped``: its PID is free)."""
        deadline = time.monotonic() + GONE_TIMEOUT_S
        while (stat := proc_stat(instance.outer)) is not None and stat[1] == instance.ticks:
            if stat[0] in "ZXx" and not reaped:
                return
            if time.monotonic() > deadline:
                raise LabError(f"{instance.vm} ({instance.pid}) still there", host=instance.host)
            time.sleep(0.005)

    def unregister(self, host: str, vm: str) -> None:
        """The VM left the host: its .vmx removed (ESXi) or its domain undefined (libvirt)."""
        lab_host = self.hosts[host]
        if isinstance(lab_host, LibvirtHost):
            if (host, vm) in self._defined:
                lab_host.undefine_vm(vm)
                self._defined.discard((host, vm))
            return
        for datastore in DATASTORES:
            path = self._paths.pop((host, vm, datastore), None)
            if path is not None:
                with contextlib.suppress(LabError):
                    lab_host.files.remove_vmx(path)

    def intruder(self, host: str, pid: int) -> Instance:
        """An unrelated process (sleep) given ``pid`` on ``host``: it must outlive every fence."""
        lab_host = self.hosts[host]
        begun = time.monotonic()
        if isinstance(lab_host, LibvirtHost):
            got = lab_host.spawn(["sleep", "3600"], pid=pid)
        else:
            lab_host.set_next_pid(pid)
            command = "setsid sleep 3600 </dev/null >/dev/null 2>&1 & echo $!"
            got = int(lab_host.ssh(command).stdout.strip())
        return self.oracle.started(lab_host, f"<unrelated {host}:{got}>", got, begun, is_vm=False)

    # ---------------------------------------------------------------------------- faults
    def freeze(self, host: str, seconds: float) -> None:
        """Every process of the host but its reaper SIGSTOPped until ``heal`` after ``seconds``."""
        fault = Fault("frozen", time.monotonic() + seconds)
        fault.stack.enter_context(stopped(self.hosts[host]))
        self.faults[host] = fault

    def kill_sshd(self, host: str, seconds: float) -> None:
        """sshd killed (connections reset) until ``heal`` restarts it after ``seconds``."""
        lab_host = self.hosts[host]
        lab_host.stop_sshd()
        fault = Fault("sshd down", time.monotonic() + seconds)
        fault.stack.callback(lab_host.start_sshd)
        self.faults[host] = fault

    def heal(self, *, everything: bool = False) -> None:
        """Ends the faults whose time is up (all of them with ``everything``)."""
        now = time.monotonic()
        for host in sorted(self.faults):
            fault = self.faults[host]
            if everything or fault.until <= now:
                del self.faults[host]
                fault.stack.close()


def qemu_pid(host: LibvirtHost, uuid: str) -> int:
    """The PID (inside ``host``) of the qemu whose command line carries ``-uuid UUID``."""
    needle = b"\0-uuid\0" + uuid.encode() + b"\0"
    for outer in host.namespace_pids():
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{outer}/cmdline").read_bytes():
                pid = inner_pid(outer)
                if pid is not None:
                    return pid
    raise LabError(f"no qemu runs domain {uuid}", host=host.name)
