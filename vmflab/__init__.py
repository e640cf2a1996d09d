"""vmflab: a lab of real OpenSSH "ESXi hosts" with real VM processes, for tests and benchmarks.

Each host is a PID + mount namespace whose PID 1 is the lab's PID-1 program (``vmflab.pid1``)
with the layer of the host's kind, with its own sshd on a loopback address, ESXi command shims
(``vmdumper``, ``ps``, ``esxcli``, ``vim-cmd``) first in PATH and VMs that are real processes
(``vmflab/vmx.c``). libvirt hosts run real qemu; Proxmox VE nodes (``vmflab.proxmox``) share
one ``/etc/pve`` and run VMs with Proxmox's kvm command line; ``vmflab.cluster`` is a Pacemaker
cluster on the lab's VMs.

The names below are imported on first use: PID 1 imports ``vmflab.pid1`` (standard library
only) and must not load the rest of the lab with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmflab.classic import EsxClassicHost
    from vmflab.control import LabError, SshCommandError
    from vmflab.host import LabHost, RunningVm
    from vmflab.lab import Lab
    from vmflab.libvirt import LibvirtHost
    from vmflab.proxmox import ProxmoxCluster, ProxmoxHost

__all__ = [
    "EsxClassicHost",
    "Lab",
    "LabError",
    "LabHost",
    "LibvirtHost",
    "ProxmoxCluster",
    "ProxmoxHost",
    "RunningVm",
    "SshCommandError",
]

_MODULES = {
    "EsxClassicHost": "vmflab.classic",
    "Lab": "vmflab.lab",
    "LabError": "vmflab.control",
    "LabHost": "vmflab.host",
    "LibvirtHost": "vmflab.libvirt",
    "ProxmoxCluster": "vmflab.proxmox",
    "ProxmoxHost": "vmflab.proxmox",
    "RunningVm": "vmflab.host",
    "SshCommandError": "vmflab.control",
}


def __getattr__(name: str) -> object:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
