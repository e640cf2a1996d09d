"""The lab: several real-OpenSSH "ESXi hosts" on loopback addresses, with real VM processes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import random
import re
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vmflab import helper
from vmflab.classic import EsxClassicHost
from vmflab.control import LabError
from vmflab.host import LabHost
from vmflab.libvirt import LibvirtHost, kvm_usable, start_hosts
from vmflab.libvirt_files import LibvirtFiles
from vmflab.lifecycle import Started
from vmflab.proxmox import KVM_SOURCE, ProxmoxCluster, ProxmoxHost
from vmflab.sshd import SshSettings
from vmflab.vmfs import NS_LAB, HostFiles

USERNAME = "vmflab"
PACKAGE_DIR = Path(__file__).resolve().parent
VMX_SOURCE = PACKAGE_DIR / "vmx.c"
WORLDS_SOURCE = PACKAGE_DIR / "worlds.c"
SHIMS_DIR = PACKAGE_DIR / "shims"
HOST_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
USERADD_LOCKED = 10  # useradd: cannot lock /etc/passwd (someone else is adding a user)
USERADD_EXISTS = 9


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vmflab"


def shadow_password(name: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/etc/shadow").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name and len(fields) > 1:
                return fields[1]
    return None


def ensure_user(name: str = USERNAME) -> pwd.struct_passwd:
    """The lab login user (shell /bin/sh like ESXi's ash), created if missing.

    Its password field is "*" (no password, key logins only): sshd without PAM refuses an
    account whose password is locked ("!"), which is what ``useradd`` leaves by default.
    """
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam(name)
            if (shadow_password(name) or "").startswith("!"):
                subprocess.run(["usermod", "-p", "*", name], capture_output=True, check=False)
            return user
        # Home "/" (ESXi root's home): sshd would print "Could not chdir" for a missing one.
        result = subprocess.run(
            [
                *("useradd", "--system", "--shell", "/bin/sh", "--no-create-home"),
                *("--home-dir", "/", "--password", "*", name),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode not in (0, USERADD_EXISTS, USERADD_LOCKED):
            raise LabError(f"useradd {name} failed: {result.stderr.strip()}")
        if time.monotonic() > deadline:
            raise LabError(f"cannot create user {name}: {result.stderr.strip()}")
        if result.returncode == USERADD_LOCKED:
            time.sleep(0.05)


def build_vmx(cache_dir: Path) -> Path:
    """Compiles vmx.c once per source version into the cache (shared by every lab)."""
    return build_c(VMX_SOURCE, cache_dir)


def build_c(source_path: Path, cache_dir: Path) -> Path:
    """Compiles one of the lab's C programs once per source version into the cache."""
    source = source_path.read_bytes()
    target = cache_dir / f"{source_path.stem}-{hashlib.sha256(source).hexdigest()[:16]}"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    errors = []
    # Static: no dynamic loader, so each VM process costs almost no memory.
    for flags in (["-static"], []):
        result = subprocess.run(
            ["gcc", "-O2", "-s", *flags, "-o", str(tmp), str(source_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode == 0:
            tmp.replace(target)
            return target
        errors.append(result.stderr.strip())
    raise LabError(f"cannot compile {source_path.name}: " + "\n".join(errors))


def free_port(address: str) -> int:
    """A port free on ``address`` right now (sshd binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


class Lab(Started):
    """Context manager; leaving it always tears every host down by PID."""

    def __init__(
        self,
        workdir: Path,
        host_names: Sequence[str] = ("esx1", "esx2", "esx3"),
        *,
        cache_dir: Path | None = None,
        libvirt_hosts: Sequence[str] = (),
        accel: str = "auto",
        classic_hosts: Sequence[str] = (),
        dual_homed: Sequence[str] = (),
        esxi_helper_ash: bool = True,
        proxmox_hosts: Sequence[str] = (),
        pve_ha_round: float = 10.0,
    ) -> None:
        """``libvirt_hosts``: KVM hosts with real qemu VMs (``vmflab.libvirt``), reached as root;
        ``accel``: "kvm", "tcg" or "auto" (KVM when /dev/kvm is usable);
        ``classic_hosts``: ESX 3.x service-console hosts (``vmflab.classic``), after the ESXi
        ones; ``dual_homed``: ESXi or classic hosts whose sshd also listens on a second
        loopback address (``LabHost.fallback_addresses``, ``cut_primary``);
        ``proxmox_hosts``: Proxmox VE nodes sharing one /etc/pve (``vmflab.proxmox``, ``self.pve``),
        whose HA stand-in runs a round every ``pve_ha_round`` seconds."""
        names = [*host_names, *classic_hosts]
        unknown = set(dual_homed) - set(names)
        if unknown:
            raise LabError(f"dual_homed hosts {sorted(unknown)} are not ESXi or classic hosts")
        every = [*names, *libvirt_hosts, *proxmox_hosts]
        for name in every:
            self._check_host_name(name)
        if len(set(every)) != len(every):
            raise LabError(f"duplicate host names in {every}")
        if accel not in ("auto", "kvm", "tcg"):
            raise LabError(f"accel must be auto, kvm or tcg, not {accel!r}")
        self.workdir = Path(workdir).resolve()
        self.username = USERNAME
        self.client_key = self.workdir / "client_ed25519"
        # Bound to vmfenced-host on every host (vmflab.helper): what helper-mode daemons use.
        self.helper_key = self.workdir / "helper_ed25519"
        # How lab daemons (vmflab.daemon) reach the hosts: "shell" with the lab key, "helper"
        # with the helper key.
        self.mode = "shell"
        self.known_hosts = self.workdir / "known_hosts"
        self.hosts: dict[str, LabHost] = {}
        self.libvirt: dict[str, LibvirtHost] = {}
        self._names = names
        self._classic = set(classic_hosts)
        self._dual_homed = set(dual_homed)
        self._libvirt_names = list(libvirt_hosts)
        self._pve_names = list(proxmox_hosts)
        self._pve_ha_round = pve_ha_round
        self.pve: ProxmoxCluster | None = None
        self._accel = accel
        self._esxi_helper_ash = esxi_helper_ash
        self._cache_dir = cache_dir or default_cache_dir()
        self._vmx: Path | None = None
        self._worlds: Path | None = None
        self._uid = -1
        self._gid = -1
        self._rng = random.SystemRandom()
        self._started = False

    def _check_host_name(self, name: str) -> None:
        if not HOST_NAME.match(name):
            raise LabError(f"invalid host name {name!r} (lowercase letters, digits, '-')")

    def start(self) -> None:
        """Starts every host; on failure everything started is torn down before raising."""
        if self._started:
            raise LabError("lab already started")
        self._started = True
        try:
            self._prepare()
            hosts = [self._new_host(name) for name in self._names]
            self._keygen([host.files for host in hosts], client=True)
            for host in hosts:
                host.prepare_kind()
                self._install_helper(host)
            for host in hosts:
                self.hosts[host.name] = host
                host.launch()
            kvms = [self._new_libvirt_host(name) for name in self._libvirt_names]
            for host in hosts:
                host.wait_ready()
            start_hosts(kvms, self._cache_dir / "libvirt-qemu")
            if self._pve_names:
                self._start_proxmox()
            self.write_known_hosts()
        except BaseException:
            self.close()
            raise

    def _prepare(self) -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (namespaces, sshd, useradd)")
        user = ensure_user(self.username)
        self._uid, self._gid = user.pw_uid, user.pw_gid
        Path("/vmfs").mkdir(mode=0o755, exist_ok=True)  # mount point of each host's /vmfs
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # sshd privsep dir
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "hosts").mkdir(exist_ok=True)
        self._vmx = build_vmx(self._cache_dir)
        self._worlds = build_c(WORLDS_SOURCE, self._cache_dir)

    def _keygen(self, files: list[HostFiles], *, client: bool) -> None:
        procs = [f.host_keygen() for f in files]
        if client:
            for key in (self.client_key, self.helper_key):
                for path in (key, key.with_name(key.name + ".pub")):
                    path.unlink(missing_ok=True)
                procs.append(
                    subprocess.Popen(
                        [
                            *("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key.stem),
                            *("-f", str(key)),
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                    )
                )
        failures = []
        for proc in procs:
            _, err = proc.communicate(timeout=30)
            if proc.returncode != 0:
                failures.append(err.decode(errors="replace").strip())
        if failures:
            raise LabError(f"ssh-keygen failed: {failures}")
        for host_files in files:
            host_files.prepare(
                vmx_binary=self._require_vmx(),
                worlds_binary=self._require_worlds(),
                shims=SHIMS_DIR,
                client_public_key=self.client_key.with_name(self.client_key.name + ".pub"),
            )

    @property
    def helper_public_key(self) -> Path:
        return self.helper_key.with_name(self.helper_key.name + ".pub")

    def _install_helper(self, host: LabHost) -> None:
        files = host.files
        helper.install(
            kind=host.kind,
            bin_dir=files.bin,
            ns_bin=f"{NS_LAB}/bin",
            authorized_keys=files.authorized_keys,
            helper_public_key=self.helper_public_key,
            busybox_ash=self._esxi_helper_ash and host.kind == "esxi",
        )
        # vmflab-session runs the helper for this key, as sshd would for its command=.
        (files.lab / "helper_key").write_text(helper.key_blob(self.helper_public_key) + "\n")

    def _require_vmx(self) -> Path:
        if self._vmx is None:
            raise LabError("lab not started")
        return self._vmx

    def _require_worlds(self) -> Path:
        if self._worlds is None:
            raise LabError("lab not started")
        return self._worlds

    def _new_address(self) -> str:
        used = {host.address for host in self._all_hosts()}
        used |= {a for host in self.hosts.values() for a in host.fallback_addresses}
        while True:
            address = f"127.77.{self._rng.randrange(1, 255)}.{self._rng.randrange(1, 255)}"
            if address not in used:
                return address

    def _new_libvirt_host(self, name: str) -> LibvirtHost:
        address = self._new_address()
        files = LibvirtFiles(self.workdir / "hosts" / name)
        files.prepare(self.client_key.with_name(self.client_key.name + ".pub"))
        helper.install(
            kind="libvirt",
            bin_dir=files.bin,
            ns_bin=str(files.bin),
            authorized_keys=files.authorized_keys,
            helper_public_key=self.helper_public_key,
            busybox_ash=False,
        )
        host = LibvirtHost(
            name=name,
            address=address,
            port=free_port(address),
            files=files,
            caps_dir=self._cache_dir / "libvirt-qemu",
            kvm=kvm_usable() if self._accel == "auto" else self._accel == "kvm",
            ssh_settings=SshSettings("root", self.client_key, self.known_hosts),
            pick_port=free_port,
        )
        self.libvirt[name] = host
        return host

    def _start_proxmox(self) -> None:
        self.pve = ProxmoxCluster(
            self.workdir / "pve",
            self._pve_names,
            ssh_settings=SshSettings("root", self.client_key, self.known_hosts),
            new_address=self._new_address,
            pick_port=free_port,
            ha_round=self._pve_ha_round,
            accel="kvm"
            if (kvm_usable() if self._accel == "auto" else self._accel == "kvm")
            else "tcg",
        )
        self.pve.build(
            self.workdir / "hosts",
            build_c(KVM_SOURCE, self._cache_dir),
            self.client_key.with_name(self.client_key.name + ".pub"),
            self.helper_public_key,
        )
        self.pve.start()

    def _pve_hosts(self) -> dict[str, ProxmoxHost]:
        return self.pve.nodes if self.pve is not None else {}

    def host(self, name: str) -> LabHost | LibvirtHost | ProxmoxHost:
        """An ESXi, libvirt or Proxmox host by name."""
        found = self.hosts.get(name) or self.libvirt.get(name) or self._pve_hosts().get(name)
        if found is None:
            raise KeyError(name)
        return found

    def _all_hosts(self) -> list[LabHost | LibvirtHost | ProxmoxHost]:
        return [*self.hosts.values(), *self.libvirt.values(), *self._pve_hosts().values()]

    def host_names(self) -> list[str]:
        """Every host, ESXi ones first, Proxmox nodes last."""
        return [*self.hosts, *self.libvirt, *self._pve_hosts()]

    def _new_host(self, name: str) -> LabHost:
        address = self._new_address()
        files = HostFiles(self.workdir / "hosts" / name, uid=self._uid, gid=self._gid)
        files.root.mkdir(mode=0o755, exist_ok=True)
        host = (EsxClassicHost if name in self._classic else LabHost)(
            name=name,
            address=address,
            port=free_port(address),
            files=files,
            ssh_settings=SshSettings(self.username, self.client_key, self.known_hosts),
            pick_port=free_port,
            on_key_change=self.write_known_hosts,
        )
        if name in self._dual_homed:
            # Drawn now: hosts enter self.hosts only later, so exclude this one by hand.
            while (fallback := self._new_address()) == address:
                pass
            host.fallback_addresses = (fallback,)
        return host

    def add_host(self, name: str) -> LabHost:
        """Adds a host and starts it at once."""
        if not self._started:
            raise LabError("lab not started")
        self._check_host_name(name)
        if name in self.hosts or name in self.libvirt:
            raise LabError(f"host {name!r} already exists")
        host = self._new_host(name)
        self._keygen([host.files], client=False)
        host.prepare_kind()
        self._install_helper(host)
        self.hosts[name] = host
        host.launch()
        host.wait_ready()
        self.write_known_hosts()
        return host

    def start_vms(self, plan: Mapping[str, Sequence[str]], workers: int = 8) -> dict[str, int]:
        """Powers on many VMs: one ssh session per host (``LabHost.start_vms``), ``workers``
        hosts at a time. ``plan``: VM names by ESXi host name; returns cartel IDs by VM name."""
        unknown = set(plan) - set(self.hosts)
        if unknown:
            raise LabError(f"no ESXi hosts {sorted(unknown)}")
        cartels: dict[str, int] = {}
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            started = pool.map(lambda item: self.hosts[item[0]].start_vms(item[1]), plan.items())
            for found in started:
                cartels.update(found)
        return cartels

    def write_known_hosts(self) -> None:
        """Rewrites known_hosts from every host's current key, address and port."""
        lines = [host.known_hosts_line() + "\n" for host in self._all_hosts()]
        tmp = self.known_hosts.with_name(self.known_hosts.name + ".tmp")
        tmp.write_text("".join(lines))
        tmp.replace(self.known_hosts)

    def close(self) -> None:
        """Kills every host by PID (SIGKILL of each init kills its whole namespace); idempotent."""
        hosts = self._all_hosts()
        for host in hosts:
            host.kill()  # all at once, then wait for each
        errors = []
        for host in hosts:
            try:
                host.close()
            except (OSError, subprocess.SubprocessError, LabError) as exc:
                errors.append(f"{host.name}: {exc}")
        if errors:
            raise LabError(f"teardown incomplete: {errors}")
