"""vmflab: a lab of real OpenSSH "ESXi hosts" with real VM processes, for tests and benchmarks.

Each host is a PID + mount namespace whose PID 1 is ``vmflab/init.py``, with its own sshd on a
loopback address, ESXi command shims (``vmdumper``, ``ps``, ``esxcli``, ``vim-cmd``) first in PATH
and VMs that are real processes (``vmflab/vmx.c``).
"""

from vmflab.classic import EsxClassicHost
from vmflab.control import LabError, SshCommandError
from vmflab.host import LabHost, RunningVm
from vmflab.lab import Lab
from vmflab.libvirt import LibvirtHost

__all__ = [
    "EsxClassicHost",
    "Lab",
    "LabError",
    "LabHost",
    "LibvirtHost",
    "RunningVm",
    "SshCommandError",
]
