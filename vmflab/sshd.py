"""What every lab hypervisor host has in common: an sshd of its own that the lab reaches with
the OpenSSH client, its files (config, host key, log), and the init's sshd verbs.

``SshdHost`` is the base of the ESXi, esx-classic and libvirt hosts; ``SshdFiles`` the base of
their files.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypedDict

from vmflab.control import LabError, SshCommandError
from vmflab.nsproc import NamespaceProcess
from vmflab.pid1.core import Init

START_TIMEOUT_S = 10.0
SSHD_PORT_RETRIES = 3


@dataclass(frozen=True)
class SshSettings:
    """How the OpenSSH client reaches the lab's hosts."""

    username: str
    client_key: Path
    known_hosts: Path


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


class SshdFiles:
    """A host's sshd files under its directory ``root``; a kind adds its own options."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sshd_config = root / "sshd_config"
        self.host_key = root / "ssh_host_ed25519_key"
        self.pid_file = root / "sshd.pid"
        self.log = root / "host.log"
        self.init_err = root / "init.err"

    def sshd_options(self) -> list[str]:
        """The kind's lines of sshd_config (login, authorized keys, session)."""
        return []

    def write_sshd_config(self, address: str, port: int, extra: Sequence[str] = ()) -> None:
        """``extra``: more addresses sshd listens on (same port); duplicates are dropped."""
        others = [a for a in dict.fromkeys(extra) if a != address]
        lines = [
            f"ListenAddress {address}:{port}",
            *(f"ListenAddress {a}:{port}" for a in others),
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_file}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "MaxStartups 100:30:200",
            "ClientAliveInterval 200",
            "ClientAliveCountMax 3",
            *self.sshd_options(),
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "DisableForwarding yes",
            "LogLevel INFO",
            "",
        ]
        self.sshd_config.write_text("\n".join(lines))

    def host_keygen(self) -> subprocess.Popen[bytes]:
        """Starts ``ssh-keygen`` for a new host key (the caller waits, to run several at once)."""
        for path in (self.host_key, self.host_key.with_name(self.host_key.name + ".pub")):
            path.unlink(missing_ok=True)
        return subprocess.Popen(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(self.host_key)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def new_host_key(self) -> None:
        proc = self.host_keygen()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise LabError("ssh-keygen did not finish within 30 s") from None
        if proc.returncode != 0:
            raise LabError(f"ssh-keygen failed: {err.decode(errors='replace').strip()}")

    def host_public_key(self) -> tuple[str, str]:
        fields = self.host_key.with_name(self.host_key.name + ".pub").read_text().split()
        return fields[0], fields[1]

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError:
            return ""


class SshdHostArgs(TypedDict):
    """What every kind of ``SshdHost`` is made with, besides its files."""

    name: str
    address: str
    port: int
    ssh_settings: SshSettings
    pick_port: Callable[[str], int]


class SshdHost(NamespaceProcess):
    """A lab host reached over SSH; its init starts and stops its sshd on request."""

    kind: ClassVar[str]
    ssh_timeout_s: ClassVar[float] = 15.0

    def __init__(
        self,
        *,
        name: str,
        address: str,
        port: int,
        files: SshdFiles,
        ssh_settings: SshSettings,
        pick_port: Callable[[str], int],
    ) -> None:
        NamespaceProcess.__init__(self, name, files.init_err)
        self.address = address
        self.port = port
        self._sshd_files = files
        self._ssh = ssh_settings
        self._pick_port = pick_port
        # Other loopback addresses the host's sshd also listens on (a second network).
        self.fallback_addresses: tuple[str, ...] = ()
        self._primary_cut = False

    @property
    def username(self) -> str:
        """The login user of this host."""
        return self._ssh.username

    def _write_sshd_config(self) -> None:
        listen = self.fallback_addresses if self._primary_cut else (self.address,)
        self._sshd_files.write_sshd_config(
            listen[0], self.port, listen[1:] + self.fallback_addresses
        )

    def _launch_sshd(self, kind: type[Init], args: Sequence[str]) -> None:
        """Starts the host's init (layer ``kind``, its ``args``) and asks for sshd;
        ``wait_ready`` waits."""
        self._write_sshd_config()
        files = self._sshd_files
        common = ["--log", str(files.log), "--sshd-config", str(files.sshd_config)]
        self._launch(kind, [*common, *args]).send("start-sshd")

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Waits until sshd listens; picks another port if the chosen one was taken meanwhile."""
        control = self._require_control()
        answer = control.read_reply(timeout)
        for _ in range(SSHD_PORT_RETRIES):
            if answer == "ready" or "Address already in use" not in self._sshd_files.log_tail():
                break
            self.port = self._pick_port(self.address)
            self._write_sshd_config()
            answer = control.request("start-sshd", timeout)
        self._check_sshd_answer(answer)
        self._found_init()

    def _check_sshd_answer(self, answer: str) -> None:
        if answer.startswith("error "):
            # The init's set-up failed before it read the request: not sshd's fault.
            raise LabError(
                f"the host's init failed: {answer.removeprefix('error ')}; its log ends with:\n"
                f"{self._sshd_files.log_tail()}",
                host=self.name,
            )
        if answer != "ready":
            raise LabError(
                f"sshd did not start ({answer}); its log ends with:\n{self._sshd_files.log_tail()}",
                host=self.name,
            )

    # ---------------------------------------------------------------------- ssh
    def ssh_argv(self, command: str) -> list[str]:
        """The OpenSSH client command line that runs ``command`` on this host as the lab user."""
        address = self.fallback_addresses[0] if self._primary_cut else self.address
        return ssh_argv(self._ssh, address, self.port, command)

    def pid_alive(self, pid: int) -> bool:
        """Whether ``pid`` is a live process of this host (a zombie is dead), read from /proc
        over SSH; kinds whose VMs are not plain processes override it."""
        if pid < 1:
            raise LabError(f"not a PID: {pid}")
        text = self.ssh(f"cat /proc/{pid}/stat 2>/dev/null || echo gone").stdout.strip()
        if text == "gone":
            return False
        _, sep, rest = text.rpartition(") ")
        if not sep or not rest:
            raise LabError(f"unexpected /proc/{pid}/stat {text!r}", host=self.name)
        return rest[0] not in "ZX"

    def ssh(
        self, command: str, *, check: bool = True, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``command`` through the login user's shell over a new SSH connection."""
        return run_ssh(
            self.ssh_argv(command),
            self.name,
            command,
            check=check,
            timeout=self.ssh_timeout_s if timeout is None else timeout,
        )

    # --------------------------------------------------------------------- sshd
    def stop_sshd(self) -> None:
        """Kills every sshd process of the host (listener and sessions): connections reset."""
        answer = self._request("stop-sshd", START_TIMEOUT_S)
        if answer != "stopped":
            raise LabError(f"cannot stop sshd: {answer}", host=self.name)

    def start_sshd(self) -> None:
        """Starts sshd again (same address, port and host key); returns once it listens."""
        self._check_sshd_answer(self._request("start-sshd", START_TIMEOUT_S))

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

    def known_hosts_line(self) -> str:
        key_type, key_b64 = self._sshd_files.host_public_key()
        patterns = ",".join(f"[{a}]:{self.port}" for a in (self.address, *self.fallback_addresses))
        return f"{patterns} {key_type} {key_b64}"
