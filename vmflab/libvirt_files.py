"""Files of one lab libvirt host: its libvirt trees, sshd files and domain XML.

``<workdir>/hosts/<name>/`` holds ``etc/`` (the host's /etc/libvirt), ``lib/``, ``log/``,
``cache/`` (its /var/lib, /var/log, /var/cache/libvirt), ``bashrc`` (an empty file mounted on
root's ~/.bashrc: no login scripts), ``domains/`` (domain XML given to ``virsh define``) and
sshd's config, keys and log.
"""

from __future__ import annotations

import os
import shutil
import uuid as uuid_module
from pathlib import Path
from xml.sax.saxutils import escape

from vmflab.control import LabError
from vmflab.sshd import SshdFiles

SYSTEM_LIBVIRT = Path("/etc/libvirt")
MAX_DOMAIN_NAME = 200
# Root runs qemu: /dev/kvm stays root-only here (no udev), and nothing outside the lab changes.
# No cgroups: every host shares this machine's cgroupfs, where two hosts would both create
# machine/qemu-1-NAME.libvirt-qemu. No private /dev per qemu: faster starts, nothing to gain.
QEMU_CONF = """user = "root"
group = "root"
remember_owner = 0
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "logd"
"""


def check_domain_name(name: str) -> None:
    """What libvirt accepts (no '/', no newline) and XML 1.0 can carry (of the C0 controls, tab
    and CR only, as character references)."""
    if not 1 <= len(name) <= MAX_DOMAIN_NAME or name != name.strip(" "):
        raise LabError(f"invalid domain name {name!r}")
    bad = [c for c in name if c == "/" or (ord(c) < 32 and c not in "\t\r") or ord(c) == 127]
    if bad:
        raise LabError(f"domain name {name!r} contains unsupported characters {bad!r}")


def pid_file_name(name: str) -> str:
    """The file libvirt 9.0 writes the qemu PID in: the name with &, ', ", <, > as XML entities
    (seen on the lab: `a&b` -> `a&amp;b.pid`)."""
    return escape(name, {"'": "&apos;", '"': "&quot;"}) + ".pid"


def xml_text(name: str) -> str:
    """`name` as XML character data: a literal tab or CR would be normalised by the parser."""
    return escape(name).replace("\t", "&#9;").replace("\r", "&#13;")


def domain_xml(name: str, uuid: str, *, kvm: bool, memory_mib: int = 32) -> str:
    """A microvm domain without disk or network: boots in a few ms of CPU, ~33 MiB RSS."""
    check_domain_name(name)
    return f"""<domain type='{"kvm" if kvm else "qemu"}'>
  <name>{xml_text(name)}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='microvm'>hvm</type></os>
  <devices>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
    <serial type='null'/>
  </devices>
</domain>
"""


class LibvirtFiles(SshdFiles):
    """Paths and file operations of one lab libvirt host (all paths are the same inside it)."""

    def __init__(self, root: Path) -> None:
        SshdFiles.__init__(self, root)
        self.etc = root / "etc"
        self.lib = root / "lib"
        self.log_dir = root / "log"
        self.cache = root / "cache"
        self.bashrc = root / "bashrc"
        self.domains = root / "domains"
        self.authorized_keys = root / "authorized_keys"
        # vmfenced-host and the lab's logger stand-in (vmflab.helper), first on root's PATH.
        self.bin = root / "bin"
        self.syslog = root / "syslog"

    def prepare(self, client_public_key: Path) -> None:
        for directory in (self.root, self.lib, self.log_dir, self.cache, self.domains, self.bin):
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        (self.cache / "qemu").mkdir(mode=0o755, exist_ok=True)  # mount point of the shared cache
        if not self.etc.exists():
            shutil.copytree(SYSTEM_LIBVIRT, self.etc, symlinks=True)
            # The packaged default network would create virbr0 and run dnsmasq on this machine.
            autostart = self.etc / "qemu" / "networks" / "autostart"
            if autostart.is_dir():
                shutil.rmtree(autostart)
            (self.etc / "qemu.conf").write_text(QEMU_CONF)
        shutil.copyfile(client_public_key, self.authorized_keys)
        self.authorized_keys.chmod(0o600)
        self.init_err.write_bytes(b"")
        self.bashrc.write_bytes(b"")
        self.new_host_key()

    def sshd_options(self) -> list[str]:
        # Root logs in with the lab key only: virsh on qemu:///system and kill -9 of qemu need it,
        # as on a real KVM host.
        return [
            f"AuthorizedKeysFile {self.authorized_keys}",
            "AllowUsers root",
            f"SetEnv PATH={self.bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            f" VMFLAB_SYSLOG={self.syslog}",
        ]

    def write_domain(self, name: str, *, kvm: bool, uuid: str | None = None) -> Path:
        """The domain's XML, in a file named by its UUID (a name may hold any character)."""
        text_uuid = str(uuid_module.UUID(uuid)) if uuid else str(uuid_module.uuid4())
        path = self.domains / f"{text_uuid}.xml"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(domain_xml(name, text_uuid, kvm=kvm), encoding="utf-8")
        tmp.replace(path)
        return path
