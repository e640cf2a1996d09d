"""One lab ESXi host: a PID + mount namespace with its own init, sshd, shims and VM processes."""

from __future__ import annotations

import shlex
import threading
from collections.abc import Callable, Sequence
from typing import ClassVar, Unpack

from vmflab.control import LabError, SshCommandError
from vmflab.pid1.esxi import EsxiInit
from vmflab.sshd import SshdHost, SshdHostArgs
from vmflab.vmfs import NS_VOLUMES, HostFiles, vmx_text
from vmflab.vmlist import RunningVm, parse_vm_list, parse_vmdumper, vm_name_of

__all__ = ["LabHost", "RunningVm"]

MAX_WORLD_OFFSET = 1_000_000


class LabHost(SshdHost):
    """A lab ESXi host. Reached only through SSH, except ``set_next_pid`` and teardown."""

    kind: ClassVar[str] = "esxi"

    def __init__(
        self,
        *,
        files: HostFiles,
        on_key_change: Callable[[], None],
        **common: Unpack[SshdHostArgs],
    ) -> None:
        SshdHost.__init__(self, files=files, **common)
        self.files = files
        self._on_key_change = on_key_change
        self._vms: dict[str, str] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- lifecycle
    def launch(self) -> None:
        """Starts the namespace and its init and asks for sshd; ``wait_ready`` completes it."""
        files = self.files
        self._launch_sshd(
            EsxiInit,
            [
                *("--vmfs", str(files.vmfs), "--ctl", files.ns_ctl, "--run-dir", files.ns_run),
                *("--usrlib-upper", str(files.usrlib_upper)),
                *("--usrlib-work", str(files.usrlib_work)),
            ],
        )

    def prepare_kind(self) -> None:
        """Adjusts the host's files for its kind once they exist (ESXi: nothing to do)."""

    # ---------------------------------------------------------------------- VMs
    def create_vm(
        self,
        name: str,
        *,
        datastore: str = "ds1",
        uuid: str | None = None,
        display_name: str | None = None,
        directory: str | None = None,
        annotation: str | None = None,
    ) -> str:
        """Writes and registers /vmfs/volumes/<datastore>/<directory or name>/<name>.vmx;
        returns its path (the handle of this VM when several share a name).

        ``display_name`` (default ``name``): any text but NUL (control and line-separator
        characters, quotes, text shaped like a listing record), as a hostile guest admin could
        set it; the .vmx stores it |XX-escaped as VMware does. The file and directory names
        stay plain names (no "/", no control characters). ``annotation``: free text; its
        newlines continue ``vim-cmd vmsvc/getallvms`` rows on following lines, as on ESXi.
        """
        with self._lock:
            text = vmx_text(name, uuid, display_name, annotation)
            path = self.files.write_vmx(name, datastore, text, directory)
            self._vms[name] = path
            return path

    def _config_of(self, vm: str) -> str:
        """A VM given by .vmx path (as ``create_vm`` returns it) or by name (created if new)."""
        if vm.startswith(NS_VOLUMES + "/"):
            return vm
        return self._vms.get(vm) or self.create_vm(vm)

    def start_vm(self, name: str, *, world_offset: int = 1, busy: bool = False) -> int:
        """Powers the VM on over ssh (creating it if needed); returns its cartel ID.

        ``name``: a VM name, or the .vmx path ``create_vm`` returned (to start one of several
        VMs of one name). ``busy``: the VM's process spins on a CPU until killed instead of
        sleeping (load).
        """
        if not 0 <= world_offset <= MAX_WORLD_OFFSET:
            raise LabError(f"world_offset {world_offset} outside 0..{MAX_WORLD_OFFSET}")
        path = self._config_of(name)
        mode = " busy" if busy else ""
        result = self.ssh(f"vmflab-vm start {shlex.quote(path)} {world_offset}{mode}")
        text = result.stdout.strip()
        if not text.isdigit():
            raise LabError(f"vmflab-vm start printed {text!r} for {name!r}", host=self.name)
        return int(text)

    def start_vms(self, names: Sequence[str], *, world_offset: int = 1) -> dict[str, int]:
        """Powers several VMs on over one ssh session (one login instead of one per VM);
        returns their cartel IDs by name. Stops at the first VM that fails to start."""
        if not names:
            return {}
        if not 0 <= world_offset <= MAX_WORLD_OFFSET:
            raise LabError(f"world_offset {world_offset} outside 0..{MAX_WORLD_OFFSET}")
        paths = [self._config_of(name) for name in names]
        command = " && ".join(f"vmflab-vm start {shlex.quote(p)} {world_offset}" for p in paths)
        lines = self.ssh(command, timeout=15 + len(names)).stdout.split()
        if len(lines) != len(names) or not all(line.isdigit() for line in lines):
            raise LabError(
                f"vmflab-vm start printed {lines!r} for {len(names)} VMs", host=self.name
            )
        return {name: int(line) for name, line in zip(names, lines, strict=True)}

    def stop_vm(self, name: str) -> None:
        """``kill -9`` of the VM's cartel over ssh, returning once the process is gone.
        ``name``: a VM name (one running VM has it) or a .vmx path."""
        self.ssh(f"vmflab-vm stop {self._cartel_of(name)}")

    def _cartel_of(self, name: str) -> int:
        """The running VM's cartel; ``name``: a VM name (one running VM has it) or a .vmx path."""
        if name.startswith(NS_VOLUMES + "/"):
            cartels = [vm.cartel for vm in self.vm_processes() if vm.config_file == name]
            cartel = cartels[0] if cartels else None
        else:
            cartel = self.vm_pids().get(name)
        if cartel is None:
            raise LabError(f"VM {name!r} is not running", host=self.name)
        return cartel

    def running_vms(self) -> list[RunningVm]:
        """Running VMs as ``vmdumper -l`` (over ssh) reports them.

        Strict, as the daemon's parser: lines end at "\n" only, every line must be read, and
        a name holding a control or line-separator character, or a cartel listed twice, is a
        LabError (``vm_processes`` tells such VMs apart exactly).
        """
        return parse_vmdumper(self.ssh("vmdumper -l").stdout, self.name)

    def vm_processes(self) -> list[RunningVm]:
        """Running VMs, exactly (display names of any text): from the host's process table
        and the run files, where names stay |XX-escaped, never through vmdumper's text."""
        return parse_vm_list(self.ssh("vmflab-vm list").stdout, self.name)

    def vm_pids(self) -> dict[str, int]:
        """Cartel IDs of the running VMs by display name (zombies excluded). A name that two
        running VMs share is a LabError: use ``vm_processes`` for those."""
        pids: dict[str, int] = {}
        for vm in self.running_vms():
            if vm.name in pids:
                raise LabError(f"two running VMs are called {vm.name!r}", host=self.name)
            pids[vm.name] = vm.cartel
        return pids

    def pid_alive(self, pid: int) -> bool:
        """Whether ``pid`` is a live (non-zombie) process of this host."""
        if pid < 1:
            raise LabError(f"not a PID: {pid}")
        result = self.ssh(f"vmflab-vm alive {pid}", check=False)
        if result.returncode not in (0, 1):
            raise SshCommandError(
                host=self.name,
                command=f"vmflab-vm alive {pid}",
                returncode=result.returncode,
                stdout=result.stdout,
                stderr=result.stderr,
            )
        return result.returncode == 0

    def unregister_vm(self, name: str) -> None:
        """Removes the VM's .vmx (the VM moved away); a running VM keeps running.
        ``name``: a VM name or a .vmx path."""
        with self._lock:
            if name.startswith(NS_VOLUMES + "/"):
                path: str | None = name
                if self._vms.get(vm_name_of(name)) == name:
                    del self._vms[vm_name_of(name)]
            else:
                path = self._vms.pop(name, None)
            self.files.remove_vmx(path or self.files.vmx_path(name, "ds1"))

    def set_next_pid(self, pid: int) -> None:
        """Makes ``pid`` the PID, hence the cartel ID, of the next VM started on this host.

        By ``start_vm`` or ``vim-cmd vmsvc/power.on``: the start shim claims the PID and asks
        the host's init (root) to write ``ns_last_pid = pid - 1`` right before the VM's fork.
        Writing it now would not do: the ssh session that starts the VM forks first and would
        take the PID. Raises LabError if ``pid`` is in use now; the start fails if it is in use
        then.
        """
        self._claim_pid(pid)
        self.files.write_next_pid(pid)

    def rekey(self, *, trust: bool = True) -> None:
        """Gives the host a new host key (restarting sshd). ``trust``: update known_hosts."""
        self.stop_sshd()
        self.files.new_host_key()
        self.start_sshd()
        if trust:
            self._on_key_change()

    def __repr__(self) -> str:
        return f"LabHost({self.name!r}, {self.address}:{self.port})"
