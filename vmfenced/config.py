"""Configuration: frozen pydantic models read from TOML, and the checks that need the filesystem."""

from __future__ import annotations

import grp
import ipaddress
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vmfenced import wire
from vmfenced.errors import ConfigError

DEFAULT_SOCKET = Path(wire.DEFAULT_SOCKET)
DEFAULT_STATE_DIRECTORY = Path("/var/lib/vmfenced")
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"

Seconds = Annotated[float, Field(gt=0, le=86400)]
Mode = Literal["shell", "helper"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


class DaemonConfig(_Frozen):
    socket: Path = DEFAULT_SOCKET
    socket_mode: int = 0o660
    socket_group: str | None = None
    inventory_interval: Annotated[float, Field(ge=1, le=86400)] = 30
    fence_timeout: Annotated[float, Field(gt=0, le=600)] = 10
    # `on`, and the on half of `reboot`, answer within this (a power-on still running then goes
    # on in the background). Off (fence_timeout) plus this stays below the agent's default limit
    # (power_timeout 20 s + 5 s).
    on_timeout: Annotated[float, Field(gt=0, le=600)] = 14
    shutdown_timeout: Annotated[float, Field(gt=0, le=600)] = 15
    # A socket client that sends no complete request line this long after connecting or after
    # its last reply is closed: an idle or slow client cannot hold a connection slot forever.
    client_idle_timeout: Annotated[float, Field(ge=0.1, le=3600)] = 10
    # The fence journal (fences.jsonl) lives here; systemd's StateDirectory=vmfenced.
    state_directory: Path = DEFAULT_STATE_DIRECTORY
    journal_max_bytes: Annotated[int, Field(ge=4096, le=1 << 30)] = 8 << 20
    journal_keep: Annotated[int, Field(ge=1, le=100)] = 5

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _octal(cls, value: Any) -> Any:
        # TOML has no octal strings users would write naturally; "0660" must not become 660.
        if isinstance(value, str):
            try:
                value = int(value, 8)
            except ValueError:
                raise ValueError(f"must be an octal string like '0660', not {value!r}") from None
        if isinstance(value, int) and not 0 <= value <= 0o777:
            raise ValueError("must be between 0000 and 0777")
        return value

    @field_validator("socket", "state_directory")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("must be an absolute path")
        return value


class MetricsConfig(_Frozen):
    # "ADDRESS:PORT" ("[::1]:9105" for IPv6) of the Prometheus HTTP endpoint; off when unset.
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            split_endpoint(value)
        return value

    def endpoint(self) -> tuple[str, int] | None:
        return None if self.listen is None else split_endpoint(self.listen)


def split_endpoint(text: str) -> tuple[str, int]:
    """ADDRESS:PORT ("127.0.0.1:9105", "[::1]:9105") -> (address, port), or a ValueError."""
    address, sep, port_text = text.rpartition(":")
    if not sep or not address:
        raise ValueError(f"must be ADDRESS:PORT like '127.0.0.1:9105', not {text!r}")
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    elif ":" in address:
        raise ValueError(f"write an IPv6 address in brackets, like '[::1]:9105', not {text!r}")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{address!r} is not an IP address (names are not resolved)") from None
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 1 to 65535, not {port_text!r}")
    return address, int(port_text)


class SSHConfig(_Frozen):
    username: Annotated[str, Field(min_length=1, max_length=64)] = "root"
    client_keys: Annotated[tuple[Path, ...], Field(min_length=1)] = (
        Path("/etc/vmfenced/id_ed25519"),
    )
    known_hosts: Path = Path("/etc/vmfenced/known_hosts")
    connect_timeout: Seconds = 5
    # A silent host is down 2 to 2.5 s after the last thing it sent (asyncssh drops the
    # connection when a keepalive beyond count_max goes unanswered): under the 3 s a cluster
    # administrator expects, with two seconds of slack for a busy host.
    keepalive_interval: Seconds = 0.5
    keepalive_count_max: Annotated[int, Field(ge=1, le=100)] = 4
    # Local address the SSH connections bind to, so fencing traffic leaves through the
    # signalling network's interface; None lets the kernel choose.
    source_address: str | None = None
    # "shell": the key opens a shell and vmfenced sends its scripts; "helper": the key is bound
    # to `vmfenced-host` (docs/host-helper.md), which runs only vmfenced's own operations.
    mode: Mode = "shell"

    @field_validator("source_address")
    @classmethod
    def _source(cls, value: str | None) -> str | None:
        return _ip_literal(value)


def _ip_literal(value: str | None) -> str | None:
    if value is not None:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address literal") from None
    return value


# Keys only an SSH host has, and keys only a vSphere API host (kind = "vsphere") has.
_SSH_ONLY = (
    "fallback_addresses",
    "libvirt_uri",
    "client_keys",
    "known_hosts",
    "keepalive_interval",
    "keepalive_count_max",
    "vsphere_name",
    # A vsphere entry speaks the API, not SSH: it has no helper to bind a key to.
    "mode",
)
_VSPHERE_ONLY = ("password_file", "tls_ca_file", "tls_thumbprint", "tls_verify", "datacenter")
VSPHERE_PORT = 443


class HostConfig(_Frozen):
    name: Annotated[str, Field(pattern=_NAME)]
    address: Annotated[str, Field(min_length=1, max_length=255)]
    # 22 for the SSH kinds; a vsphere entry without a port gets 443 (_vsphere_port).
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    kind: Literal["esxi", "libvirt", "esx-classic", "proxmox", "vsphere"] = "esxi"
    # Other addresses of this same host (say its management network), tried in order when
    # `address` is unreachable; each is checked against known_hosts on its own.
    fallback_addresses: tuple[Annotated[str, Field(min_length=1, max_length=255)], ...] = ()
    # libvirt hosts only: the libvirtd that virsh talks to (LIBVIRT_DEFAULT_URI on the host).
    libvirt_uri: Annotated[str, Field(pattern=r"^[a-z][a-z0-9+.-]*://[^\s]*$", max_length=1024)] = (
        "qemu:///system"
    )
    # proxmox hosts only: this host's node name in the Proxmox cluster (its directory under
    # /etc/pve/nodes), when it differs from `name`.
    pve_node: Annotated[str, Field(pattern=_NAME)] | None = None
    # Per-host overrides of [ssh]; None means "use the default".
    username: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    client_keys: Annotated[tuple[Path, ...], Field(min_length=1)] | None = None
    known_hosts: Path | None = None
    connect_timeout: Seconds | None = None
    keepalive_interval: Seconds | None = None
    keepalive_count_max: Annotated[int, Field(ge=1, le=100)] | None = None
    source_address: str | None = None
    mode: Mode | None = None
    # kind = "vsphere" (a vCenter or a standalone ESXi host's API; docs/vsphere.md): a root-only
    # file holding the password (never in the TOML, never logged), and how its TLS certificate
    # is trusted: the system's CAs, tls_ca_file, or a pinned SHA-256 thumbprint.
    # tls_verify = false trusts anything: for labs only, and `vmfencectl status` says so.
    password_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_thumbprint: str | None = None
    tls_verify: bool = True
    # Only this datacenter's VMs and hosts (its name); None: the whole inventory.
    datacenter: Annotated[str, Field(min_length=1, max_length=80)] | None = None
    # SSH kinds: this host's name in a vsphere entry's inventory. The vCenter map then places
    # VMs on this host, and a fence of a VM it runs goes over this host's SSH lane.
    vsphere_name: Annotated[str, Field(min_length=1, max_length=255)] | None = None

    @field_validator("source_address")
    @classmethod
    def _source(cls, value: str | None) -> str | None:
        return _ip_literal(value)

    @model_validator(mode="before")
    @classmethod
    def _vsphere_port(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") == "vsphere" and "port" not in data:
            return {**data, "port": VSPHERE_PORT}
        return data

    @field_validator("tls_thumbprint")
    @classmethod
    def _thumbprint(cls, value: str | None) -> str | None:
        """SHA-256 only (SHA-1 pins are forgeable), as hex with or without colons; kept as
        lower-case colon pairs, the form pyvmomi and vCenter show."""
        if value is None:
            return None
        digits = value.replace(":", "").lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digits) or (
            ":" in value and not re.fullmatch(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){31}", value)
        ):
            raise ValueError("must be a SHA-256 thumbprint: 64 hex digits, or 32 pairs with ':'")
        return ":".join(digits[i : i + 2] for i in range(0, 64, 2))

    @model_validator(mode="after")
    def _kind_keys(self) -> HostConfig:
        given = self.model_fields_set
        if self.kind == "vsphere":
            wrong = [k for k in _SSH_ONLY if k in given]
            if wrong:
                raise ValueError(f'{", ".join(wrong)}: not for kind = "vsphere" (SSH hosts only)')
            # No default from [ssh]: vCenter's user is not the hypervisors' root.
            if self.username is None or self.password_file is None:
                raise ValueError('kind = "vsphere" needs username and password_file')
            if not self.tls_verify and (self.tls_ca_file or self.tls_thumbprint):
                raise ValueError("tls_verify = false contradicts tls_ca_file / tls_thumbprint")
        else:
            wrong = [k for k in _VSPHERE_ONLY if k in given]
            if wrong:
                raise ValueError(f'{", ".join(wrong)}: only for kind = "vsphere"')
        return self

    @model_validator(mode="after")
    def _fallbacks(self) -> HostConfig:
        seen = {self.address}
        for address in self.fallback_addresses:
            if not address.strip():
                raise ValueError("fallback_addresses: an address is blank")
            if address in seen:
                raise ValueError(
                    f"fallback_addresses: {address!r} is listed twice or is the primary address"
                )
            seen.add(address)
        return self

    def addresses(self) -> tuple[str, ...]:
        """The primary address, then the fallbacks, in the order they are tried."""
        return (self.address, *self.fallback_addresses)

    @model_validator(mode="after")
    def _kind_only_keys(self) -> HostConfig:
        if self.kind != "libvirt" and "libvirt_uri" in self.model_fields_set:
            raise ValueError(f'libvirt_uri: only for kind = "libvirt" (this host is {self.kind})')
        if self.kind != "proxmox" and self.pve_node is not None:
            raise ValueError(f'pve_node: only for kind = "proxmox" (this host is {self.kind})')
        if self.kind not in ("esxi", "esx-classic") and self.vsphere_name is not None:
            # Only an ESXi host is in a vCenter's inventory.
            raise ValueError(f"vsphere_name: only for ESXi hosts (this host is {self.kind})")
        return self

    @property
    def node(self) -> str | None:
        """The Proxmox node this host is (None for the other kinds)."""
        if self.kind != "proxmox":
            return None
        return self.pve_node or self.name


_SSH_KEYS = tuple(SSHConfig.model_fields)


class Config(_Frozen):
    daemon: DaemonConfig = DaemonConfig()
    ssh: SSHConfig = SSHConfig()
    hosts: tuple[HostConfig, ...]
    aliases: dict[Annotated[str, Field(min_length=1, max_length=256)], str] = {}
    metrics: MetricsConfig = MetricsConfig()

    @model_validator(mode="after")
    def _unique(self) -> Config:
        if not self.hosts:
            raise ValueError("hosts: at least one [[hosts]] entry is needed")
        seen: dict[str, int] = {}
        endpoints: dict[tuple[str, int], str] = {}
        for host in self.hosts:
            if host.name in seen:
                raise ValueError(f"hosts: name {host.name!r} is used twice")
            seen[host.name] = 1
            endpoint = (host.address, host.port)
            if endpoint in endpoints:
                raise ValueError(
                    f"hosts: {host.name!r} and {endpoints[endpoint]!r} both use "
                    f"{host.address}:{host.port}"
                )
            endpoints[endpoint] = host.name
        nodes: dict[str, str] = {}
        for host in self.hosts:
            # A VM's owner node must name one configured host: "already off" and power-on
            # are decided on that host's answers.
            if host.node is not None and nodes.setdefault(host.node, host.name) != host.name:
                raise ValueError(
                    f"hosts: {host.name!r} and {nodes[host.node]!r} are both Proxmox node "
                    f"{host.node!r}"
                )
        mapped = [h.vsphere_name for h in self.hosts if h.vsphere_name is not None]
        twice = sorted({n for n in mapped if mapped.count(n) > 1})
        if twice:
            raise ValueError(f"hosts: vsphere_name {twice[0]!r} is given to two hosts")
        for alias, vm in self.aliases.items():
            if not vm or len(vm) > 256:
                raise ValueError(f"aliases.{alias}: VM name must be 1 to 256 characters")
        return self

    def ssh_for(self, host: HostConfig) -> SSHConfig:
        overrides = {k: getattr(host, k) for k in _SSH_KEYS if getattr(host, k) is not None}
        return self.ssh.model_copy(update=overrides)

    def host(self, name: str) -> HostConfig:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)


def _where(loc: tuple[int | str, ...], data: Any) -> str:
    """Name the key like the user wrote it: hosts[1] (esx2).port."""
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            if isinstance(node, list) and 0 <= part < len(node):
                node = node[part]
                if isinstance(node, dict) and isinstance(node.get("name"), str):
                    out += f" ({node['name']})"
            else:
                node = None
        else:
            out += f".{part}" if out else part
            node = node.get(part) if isinstance(node, dict) else None
    return out


def parse(data: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = "unknown key"
            if err["loc"]:
                message = f"{_where(tuple(err['loc']), data)}: {message}"
            problems.append(message)
        raise ConfigError(source, problems) from None


def load(path: Path) -> Config:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None
    return parse(data, str(path))


def check_environment(config: Config) -> list[str]:
    """What a config needs from this machine: readable keys and known_hosts, an existing group."""
    problems: list[str] = []
    files: dict[Path, str] = {}
    for host in config.hosts:
        if host.kind == "vsphere":
            problems += _vsphere_environment(host)
            continue
        ssh = config.ssh_for(host)
        for key in ssh.client_keys:
            files.setdefault(key, f"client key of {host.name}")
        files.setdefault(ssh.known_hosts, f"known_hosts of {host.name}")
    for path, what in files.items():
        if not path.is_file():
            problems.append(f"{what}: {path} does not exist or is not a file")
        elif not os.access(path, os.R_OK):
            problems.append(f"{what}: {path} is not readable")
    group = config.daemon.socket_group
    if group is not None:
        try:
            grp.getgrnam(group)
        except KeyError:
            problems.append(f"daemon.socket_group: no group named {group!r}")
    return problems


def _vsphere_environment(host: HostConfig) -> list[str]:
    problems = []
    path = host.password_file
    if path is not None:
        try:
            info = path.stat()
        except OSError as exc:
            problems.append(f"password_file of {host.name}: {path}: {exc.strerror}")
        else:
            # Root-only: anyone else who reads it can power off every VM of the inventory.
            if not stat.S_ISREG(info.st_mode):
                problems.append(f"password_file of {host.name}: {path} is not a file")
            elif info.st_uid != 0 or info.st_mode & 0o077:
                problems.append(
                    f"password_file of {host.name}: {path} must be owned by root and not "
                    f"readable by others (chmod 600), not mode {stat.S_IMODE(info.st_mode):04o}"
                )
    ca = host.tls_ca_file
    if ca is not None and not (ca.is_file() and os.access(ca, os.R_OK)):
        problems.append(f"tls_ca_file of {host.name}: {ca} is not a readable file")
    return problems
