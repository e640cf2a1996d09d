"""One lab ESXi host: a PID + mount namespace with its own init, sshd, shims and VM processes."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from vmflab.control import InitControl, LabError, SshCommandError
from vmflab.vmfs import NS_VOLUMES, HostFiles, vmx_text
from vmflab.vmlist import RunningVm, parse_vm_list, parse_vmdumper, vm_name_of

__all__ = ["LabHost", "RunningVm", "SshSettings", "parent_pid", "run_ssh", "ssh_argv"]

INIT_SCRIPT = Path(__file__).with_name("init.py")
START_TIMEOUT_S = 10.0
SSHD_PORT_RETRIES = 3
MAX_WORLD_OFFSET = 1_000_000


@dataclass(frozen=True)
class SshSettings:
    """How the OpenSSH client reaches the lab's hosts."""

    username: str
    client_key: Path
    known_hosts: Path


class LabHost:
    """A lab ESXi host. Reached only through SSH, except ``set_next_pid`` and teardown."""

    kind: ClassVar[str] = "esxi"

    def __init__(
        self,
        *,
        name: str,
        address: str,
        port: int,
        files: HostFiles,
        ssh_settings: SshSettings,
        pick_port: Callable[[str], int],
        on_key_change: Callable[[], None],
    ) -> None:
        self.name = name
        self.address = address
        self.port = port
        self.files = files
        self._ssh = ssh_settings
        self._pick_port = pick_port
        self._on_key_change = on_key_change
        self._proc: subprocess.Popen[bytes] | None = None
        self._control: InitControl | None = None
        self._init_pid: int | None = None
        self._pid_ns: int | None = None
        self._vms: dict[str, str] = {}
        self._lock = threading.Lock()
        # Other loopback addresses the host's sshd also listens on (a second network).
        self.fallback_addresses: tuple[str, ...] = ()
        self._primary_cut = False

    @property
    def username(self) -> str:
        """The login user of this host."""
        return self._ssh.username

    # ----------------------------------------------------------------- lifecycle
    def launch(self) -> None:
        """Starts the namespace and its init and asks for sshd; ``wait_ready`` completes it."""
        if self._proc is not None:
            raise LabError("host already launched", host=self.name)
        self._write_sshd_config()
        init_err = self.files.init_err.open("ab")
        try:
            self._proc = subprocess.Popen(
                [
                    "unshare",
                    "--pid",
                    "--fork",
                    "--kill-child",
                    "--mount-proc",
                    "--mount",
                    "--propagation",
                    "private",
                    "--",
                    *self._init_command(),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=init_err,
                close_fds=True,
            )
        finally:
            init_err.close()
        self._control = InitControl(self._proc, host=self.name, err_file=self.files.init_err)
        self._control.send("start-sshd")

    def prepare_kind(self) -> None:
        """Adjusts the host's files for its kind once they exist (ESXi: nothing to do)."""

    def _write_sshd_config(self) -> None:
        listen = self.fallback_addresses if self._primary_cut else (self.address,)
        self.files.write_sshd_config(listen[0], self.port, listen[1:] + self.fallback_addresses)

    def _init_command(self) -> list[str]:
        files = self.files
        return [
            sys.executable,
            "-I",
            "-S",
            str(INIT_SCRIPT),
            "--vmfs",
            str(files.vmfs),
            "--sshd-config",
            str(files.sshd_config),
            "--log",
            str(files.log),
            "--ctl",
            files.ns_ctl,
            "--run-dir",
            files.ns_run,
            "--usrlib-upper",
            str(files.usrlib_upper),
            "--usrlib-work",
            str(files.usrlib_work),
        ]

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Waits until sshd listens; picks another port if the chosen one was taken meanwhile."""
        control = self._require_control()
        answer = control.read_reply(timeout)
        for _ in range(SSHD_PORT_RETRIES):
            if answer == "ready" or "Address already in use" not in self.files.log_tail():
                break
            self.port = self._pick_port(self.address)
            self._write_sshd_config()
            answer = control.request("start-sshd", timeout)
        self._check_sshd_answer(answer)
        self._init_pid = self._find_init_pid()
        self._pid_ns = Path(f"/proc/{self._init_pid}/ns/pid").stat().st_ino

    def _check_sshd_answer(self, answer: str) -> None:
        if answer != "ready":
            raise LabError(
                f"sshd did not start ({answer}); its log ends with:\n{self.files.log_tail()}",
                host=self.name,
            )

    def _find_init_pid(self) -> int:
        proc = self._require_proc()
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except FileNotFoundError:  # kernel without CONFIG_PROC_CHILDREN
            children = [
                entry.name
                for entry in Path("/proc").iterdir()
                if entry.name.isdigit() and parent_pid(entry) == proc.pid
            ]
        if len(children) != 1:
            raise LabError(f"unshare {proc.pid} has children {children}", host=self.name)
        return int(children[0])

    def kill(self) -> None:
        """SIGKILLs the host's init: the kernel then kills every process of the namespace."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        pid = self._init_pid
        if pid is None:
            with contextlib.suppress(LabError, OSError, ValueError):
                pid = self._find_init_pid()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid if pid is not None else proc.pid, signal.SIGKILL)

    def close(self) -> None:
        """Kills the host (every process of its namespace) and waits until it is gone."""
        proc = self._proc
        if proc is None:
            return
        self.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()  # --kill-child: the init follows unshare
            proc.wait(timeout=10)
        if self._control is not None:
            self._control.close()
        self._control = None
        self._proc = None

    @property
    def unshare_pid(self) -> int | None:
        """PID of the host's ``unshare`` process (parent of its init), while the host runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def init_pid(self) -> int | None:
        """PID (in the lab's namespace) of the host's init, once the host is ready."""
        return self._init_pid

    def namespace_pids(self) -> list[int]:
        """PIDs (as seen from outside) of every process still in this host's PID namespace."""
        if self._pid_ns is None:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if (entry / "ns" / "pid").stat().st_ino == self._pid_ns:
                        found.append(int(entry.name))
        return found

    # ---------------------------------------------------------------------- ssh
    def ssh_argv(self, command: str) -> list[str]:
        """The OpenSSH client command line that runs ``command`` on this host as the lab user."""
        address = self.fallback_addresses[0] if self._primary_cut else self.address
        return ssh_argv(self._ssh, address, self.port, command)

    def ssh(
        self, command: str, *, check: bool = True, timeout: float = 15
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``command`` through the host's login shell (/bin/sh) over a new SSH connection."""
        return run_ssh(self.ssh_argv(command), self.name, command, check=check, timeout=timeout)

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
        if name.startswith(NS_VOLUMES + "/"):
            cartels = [vm.cartel for vm in self.vm_processes() if vm.config_file == name]
            cartel = cartels[0] if cartels else None
        else:
            cartel = self.vm_pids().get(name)
        if cartel is None:
            raise LabError(f"VM {name!r} is not running", host=self.name)
        self.ssh(f"vmflab-vm stop {cartel}")

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
        if not 2 <= pid < 2**22:
            raise LabError(f"PID {pid} outside 2..{2**22 - 1}")
        answer = self._require_control().request(f"pid-free {pid}", START_TIMEOUT_S)
        if answer != "ok":
            raise LabError(f"cannot give PID {pid} to the next VM: {answer}", host=self.name)
        self.files.write_next_pid(pid)

    # --------------------------------------------------------------------- sshd
    def stop_sshd(self) -> None:
        """Kills every sshd process of the host (listener and sessions): connections reset."""
        answer = self._require_control().request("stop-sshd", START_TIMEOUT_S)
        if answer != "stopped":
            raise LabError(f"cannot stop sshd: {answer}", host=self.name)

    def start_sshd(self) -> None:
        """Starts sshd again (same address, port and host key); returns once it listens."""
        answer = self._require_control().request("start-sshd", START_TIMEOUT_S)
        self._check_sshd_answer(answer)

    def cut_primary(self) -> None:
        """sshd restarts listening on the fallback addresses only: the primary refuses."""
        if not self.fallback_addresses:
            raise LabError("no fallback address to keep", host=self.name)
        self._restart_sshd(cut=True)

    def restore_primary(self) -> None:
        """sshd restarts listening on every address again."""
        self._restart_sshd(cut=False)

    def _restart_sshd(self, *, cut: bool) -> None:
        self.stop_sshd()
        self._primary_cut = cut
        self._write_sshd_config()
        self.start_sshd()

    def rekey(self, *, trust: bool = True) -> None:
        """Gives the host a new host key (restarting sshd). ``trust``: update known_hosts."""
        self.stop_sshd()
        self.files.new_host_key()
        self.start_sshd()
        if trust:
            self._on_key_change()

    def known_hosts_line(self) -> str:
        key_type, key_b64 = self.files.host_public_key()
        patterns = ",".join(f"[{a}]:{self.port}" for a in (self.address, *self.fallback_addresses))
        return f"{patterns} {key_type} {key_b64}"

    # ----------------------------------------------------------------- helpers
    def _require_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise LabError("host not started", host=self.name)
        return self._proc

    def _require_control(self) -> InitControl:
        if self._control is None:
            raise LabError("host not started", host=self.name)
        return self._control

    def __repr__(self) -> str:
        return f"LabHost({self.name!r}, {self.address}:{self.port})"


def ssh_argv(settings: SshSettings, address: str, port: int, command: str) -> list[str]:
    """The OpenSSH client command line that runs ``command`` on a lab host."""
    known_hosts = f"UserKnownHostsFile={settings.known_hosts}"
    return [
        *("ssh", "-F", "/dev/null", "-i", str(settings.client_key), "-o", "IdentitiesOnly=yes"),
        *("-o", "BatchMode=yes", "-o", known_hosts, "-o", "GlobalKnownHostsFile=/dev/null"),
        *("-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR"),
        *("-p", str(port), "-l", settings.username, "--", address, command),
    ]


def run_ssh(
    argv: list[str], host: str, command: str, *, check: bool, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Runs an ``ssh_argv`` command line; SshCommandError when ``check`` and it fails.

    The output is decoded as is: text mode would also turn "\r" into "\n" (universal
    newlines), and a host's answer must reach a parser exactly as the host wrote it."""
    raw = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
    )
    result = subprocess.CompletedProcess(
        raw.args,
        raw.returncode,
        raw.stdout.decode("utf-8", errors="replace"),
        raw.stderr.decode("utf-8", errors="replace"),
    )
    if check and result.returncode != 0:
        raise SshCommandError(
            host=host,
            command=command,
            returncode=result.returncode,
            stdout=result.stdout,
            stderr=result.stderr,
        )
    return result


def parent_pid(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
