"""What a lab cluster node needs from its VM, and the ESXi lab's VMs seen that way.

A node "machine" lives exactly as long as one process of its VM: the cluster binds each boot of
the node to the VM's process (the pidfd it watches), so killing the VM kills the node and
powering the VM on again boots it. Any VM kind fits, as long as its process is visible from here:
the ESXi lab's ``/bin/vmx`` processes, or libvirt's qemu processes (``LibvirtLabVm``).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from pathlib import Path
from typing import Protocol

from vmflab.control import LabError
from vmflab.host import LabHost
from vmflab.libvirt import LibvirtHost


class NodeVm(Protocol):
    """The VM a cluster node runs on."""

    @property
    def name(self) -> str:
        """The VM's name, as ``pcmk_host_map`` maps the node to it."""
        ...

    def process(self) -> int | None:
        """PID (in the caller's PID namespace) of the VM's live process, None when it is off."""
        ...

    def power_on(self) -> None:
        """Starts the VM; returns once its process runs."""
        ...


def proc_state(pid: int) -> str | None:
    """The process state letter (``R``, ``S``, ``Z``...), None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def is_alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X", "x")


class EsxiLabVm:
    """A VM of the ESXi lab (``vmflab.Lab``): its process is the ``/bin/vmx`` of its .vmx."""

    def __init__(self, host: LabHost, name: str, *, datastore: str = "ds1") -> None:
        self.host = host
        self._name = name
        self.config_file = host.files.vmx_path(name, datastore)

    @property
    def name(self) -> str:
        return self._name

    def process(self) -> int | None:
        found = []
        for pid in self.host.namespace_pids():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
                # Only once it shows its final command line is the VM fully started.
                if (
                    argv
                    and argv[0] == b"/bin/vmx"
                    and argv[-1] == self.config_file.encode()
                    and is_alive(pid)
                ):
                    found.append(pid)
        if len(found) > 1:
            raise LabError(f"VM {self._name} runs twice: {found}", host=self.host.name)
        return found[0] if found else None

    def power_on(self) -> None:
        self.host.start_vm(self._name)

    def __repr__(self) -> str:
        return f"EsxiLabVm({self._name!r} on {self.host.name})"


def guest_name(value: bytes) -> bytes | None:
    """NAME from qemu's ``-name guest=NAME,opt=...`` (``,,`` is a literal comma)."""
    if not value.startswith(b"guest="):
        return None
    name, rest = bytearray(), value[len(b"guest=") :]
    i = 0
    while i < len(rest):
        if rest[i : i + 2] == b",,":
            name += b","
            i += 2
        elif rest[i : i + 1] == b",":
            break
        else:
            name += rest[i : i + 1]
            i += 1
    return bytes(name)


class LibvirtLabVm:
    """A qemu VM of a lab libvirt host: its process is the qemu whose ``-name`` is
    ``guest=NAME,...`` (NAME with ``,`` doubled), seen through the host's PID namespace."""

    def __init__(self, host: LibvirtHost, name: str, *, wait_s: float = 30.0) -> None:
        self.host = host
        self._name = name
        self._wait_s = wait_s
        self._encoded = name.encode()

    @property
    def name(self) -> str:
        return self._name

    def _is_mine(self, argv: list[bytes]) -> bool:
        for flag, value in itertools.pairwise(argv):
            if flag == b"-name" and guest_name(value) == self._encoded:
                return True
        return False

    def process(self) -> int | None:
        found = []
        for pid in self.host.namespace_pids():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
                if argv and b"qemu-system" in argv[0] and self._is_mine(argv) and is_alive(pid):
                    found.append(pid)
        if len(found) > 1:
            raise LabError(f"VM {self._name} runs twice: {found}", host=self.host.name)
        return found[0] if found else None

    def power_on(self) -> None:
        """``virsh start``, once libvirtd has seen the previous qemu die (a killed qemu is
        "running" for libvirtd a moment longer, and ``virsh start`` would refuse)."""
        deadline = time.monotonic() + self._wait_s
        while True:
            state = self.host.domstate(self._name)
            if state.startswith("shut off"):
                break
            if time.monotonic() > deadline:
                raise LabError(f"VM {self._name} still {state!r}", host=self.host.name)
            time.sleep(0.05)  # polling libvirtd's view with a deadline
        self.host.start_vm(self._name)
        while self.process() is None:
            if time.monotonic() > deadline:
                raise LabError(f"no qemu for {self._name} after start", host=self.host.name)
            time.sleep(0.02)

    def __repr__(self) -> str:
        return f"LibvirtLabVm({self._name!r} on {self.host.name})"
