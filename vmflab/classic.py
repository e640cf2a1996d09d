"""A lab ESX 3.x "classic" host: a service console (Linux) with real sshd, native `ps`, VMs
that are real processes named `vmware-vmx` whose argv ends with the .vmx path, and a slow
`vmware-cmd` shim (about 3.5 s per call, like the Perl original).

It is a `LabHost` (same namespaces, init, sshd and /vmfs layout) whose ESXi command shims
(`ps`, `vmdumper`, `esxcli`, `vim-cmd`) are removed, so the host answers with native tools.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path
from typing import ClassVar

from vmflab.control import LabError
from vmflab.host import LabHost, RunningVm
from vmflab.vmlist import vm_name_of

CLASSIC_SHIMS_DIR = Path(__file__).resolve().parent / "shims_classic"
ESXI_ONLY_SHIMS = ("ps", "vmdumper", "esxcli", "vim-cmd", "awk")


class EsxClassicHost(LabHost):
    """VM names are .vmx basenames; a VM's "cartel" is its vmware-vmx PID."""

    kind: ClassVar[str] = "esx-classic"
    _next_pid: int | None = None

    def prepare_kind(self) -> None:
        """Swaps the ESXi shims for the service console's tools (after `HostFiles.prepare`)."""
        bin_dir = self.files.bin
        for name in ESXI_ONLY_SHIMS:
            (bin_dir / name).unlink(missing_ok=True)
        for shim in CLASSIC_SHIMS_DIR.iterdir():
            if shim.is_file():
                shutil.copyfile(shim, bin_dir / shim.name)
                (bin_dir / shim.name).chmod(0o755)
        tail = shutil.which("tail")
        if tail is None:
            raise LabError("no tail binary: the lab's vmware-vmx processes run it")
        # Exec'd through a link of that name, the process's comm is vmware-vmx as on ESX 3.
        link = bin_dir / "vmware-vmx"
        link.unlink(missing_ok=True)
        link.symlink_to(tail)

    def set_next_pid(self, pid: int) -> None:
        """Makes ``pid`` the PID of the next VM started by ``start_vm`` (not by vmware-cmd)."""
        self._claim_pid(pid)
        self._next_pid = pid

    def start_vm(self, name: str, *, world_offset: int = 1, busy: bool = False) -> int:
        """Starts the VM's vmware-vmx over ssh (creating the .vmx if needed); returns its PID.
        ``name``: a VM name or a .vmx path (``create_vm(name, directory=...)`` makes several
        .vmx files of one base name)."""
        del world_offset  # ESX 3 has no worlds separate from the process
        if busy:
            raise LabError("busy VMs exist on ESXi lab hosts only", host=self.name)
        path = self._config_of(name)
        pid, self._next_pid = self._next_pid, None
        command = f"vmflab-classic start {shlex.quote(path)}" + (f" {pid}" if pid else "")
        text = self.ssh(command).stdout.strip()
        if not text.isdigit():
            raise LabError(f"vmflab-classic start printed {text!r} for {name!r}", host=self.name)
        return int(text)

    def stop_vm(self, name: str) -> None:
        """``name``: a VM name (one running VM has it) or a .vmx path."""
        self.ssh(f"vmflab-classic stop {self._cartel_of(name)}")

    def running_vms(self) -> list[RunningVm]:
        """Live vmware-vmx processes (by comm, independent of vmfenced's argv parsing); lines
        end at "\n" only (the lab's .vmx paths hold no control characters)."""
        vms = []
        for line in self.ssh("vmflab-classic list").stdout.split("\n"):
            if not line:
                continue
            pid, sep, path = line.partition("\t")
            if not sep or not pid.isdigit():
                raise LabError(f"unexpected vmflab-classic line {line!r}", host=self.name)
            vms.append(
                RunningVm(
                    name=vm_name_of(path), cartel=int(pid), world=0, uuid="", config_file=path
                )
            )
        return vms

    def vm_processes(self) -> list[RunningVm]:
        """Every live vmware-vmx, exactly: the same as ``running_vms`` here."""
        return self.running_vms()

    def vmware_cmd(self, *args: str) -> str:
        """Runs the (slow) vmware-cmd shim; returns its output."""
        return self.ssh("vmware-cmd " + " ".join(shlex.quote(a) for a in args)).stdout
