"""Files of one lab host: its /vmfs tree (VM configs, shims, run state) and its sshd files.

The host directory ``<workdir>/hosts/<name>`` holds ``vmfs/`` (bind-mounted on ``/vmfs`` inside
the host), sshd's config, host key, pid file and log, and the /usr/lib overlay dirs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import time
import uuid as uuid_module
from pathlib import Path

from vmflab.control import LabError
from vmflab.sshd import SshdFiles

NS_LAB = "/vmfs/.lab"
NS_VOLUMES = "/vmfs/volumes"
SHIM_PATH = f"{NS_LAB}/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_VM_NAME = 80
FORBIDDEN_IN_NAME = set('/\\"|')
# A display name is a .vmx value, not a path: it may hold any character but NUL (hostile names
# for the tests: control and line-separator characters, quotes, text shaped like records).
MAX_DISPLAY_NAME = 512
DATASTORE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,41}$")
VMWARE_UUID = re.compile(r"^([0-9a-f]{2} ){7}[0-9a-f]{2}-([0-9a-f]{2} ){7}[0-9a-f]{2}$")
LOCK_STALE_S = 3.0


def check_vm_name(name: str) -> None:
    """Rejects names a .vmx, the shims' tab-separated records or a path could not carry."""
    if not 1 <= len(name) <= MAX_VM_NAME:
        raise LabError(f"VM name must be 1 to {MAX_VM_NAME} characters: {name!r}")
    if name in (".", "..") or name != name.strip():
        raise LabError(f"invalid VM name {name!r}")
    bad = [c for c in name if c in FORBIDDEN_IN_NAME or ord(c) < 32 or 127 <= ord(c) < 160]
    if bad:
        raise LabError(f"VM name {name!r} contains unsupported characters {bad!r}")


def check_display_name(name: str) -> None:
    """Display names may hold anything a .vmx value can carry: every character but NUL."""
    if not 1 <= len(name) <= MAX_DISPLAY_NAME:
        raise LabError(f"display name must be 1 to {MAX_DISPLAY_NAME} characters: {name!r}")
    if "\0" in name:
        raise LabError(f"a display name cannot hold NUL: {name!r}")


def vmx_escape(value: str) -> str:
    """A .vmx value as VMware writes it: `|XX` for `|`, `"` and ASCII control characters (so a
    value stays on one line between its quotes); other characters as UTF-8. The shims decode
    it (vmflab.awk `vmx_decode`, worlds.c `vmx_decode`) when they print a name."""
    return "".join(
        f"|{ord(c):02X}" if c in '|"' or ord(c) < 0x20 or ord(c) == 0x7F else c for c in value
    )


def vmx_unescape(value: str) -> str:
    """The inverse of ``vmx_escape`` (also of the run files' escaped names)."""
    return re.sub(r"\|([0-9A-Fa-f]{2})", lambda m: chr(int(m[1], 16)), value)


def check_datastore(datastore: str) -> None:
    if not DATASTORE.match(datastore):
        raise LabError(f"invalid datastore name {datastore!r}")


def vmware_uuid(text: str | None) -> str:
    """A BIOS UUID in .vmx form (``56 4d ... 00-11 ...``); random when ``text`` is None."""
    if text is None:
        raw = uuid_module.uuid4().hex
    elif VMWARE_UUID.match(text.lower()):
        return text.lower()
    else:
        try:
            raw = uuid_module.UUID(text).hex
        except ValueError as exc:
            raise LabError(f"invalid UUID {text!r}") from exc
    pairs = [raw[i : i + 2] for i in range(0, 32, 2)]
    return " ".join(pairs[:8]) + "-" + " ".join(pairs[8:])


def vmx_text(
    name: str, uuid: str | None, display_name: str | None = None, annotation: str | None = None
) -> str:
    """``name``: the file's name; ``display_name`` (default: ``name``) may differ from it;
    ``annotation``: free text (newlines make vim-cmd's listing continue on following lines)."""
    check_vm_name(name)
    shown = name if display_name is None else display_name
    check_display_name(shown)
    if annotation is not None and "\0" in annotation:
        raise LabError("an annotation cannot hold NUL")
    bios = vmware_uuid(uuid)
    notes = [] if annotation is None else [f'annotation = "{vmx_escape(annotation)}"']
    return "\n".join(
        [
            '.encoding = "UTF-8"',
            'config.version = "8"',
            'virtualHW.version = "13"',
            f'displayName = "{vmx_escape(shown)}"',
            'guestOS = "otherlinux-64"',
            f'uuid.bios = "{bios}"',
            f'uuid.location = "{bios}"',
            'memSize = "32"',
            'numvcpus = "1"',
            *notes,
            "",
        ]
    )


class HostFiles(SshdFiles):
    """Paths and file operations of one lab host (``ns_*`` paths are as seen inside the host)."""

    def __init__(self, root: Path, *, uid: int, gid: int) -> None:
        SshdFiles.__init__(self, root)
        self.vmfs = root / "vmfs"
        self.lab = self.vmfs / ".lab"
        self.bin = self.lab / "bin"
        self.run = self.lab / "run"
        self.ctl = self.lab / "ctl"
        self.authorized_keys = self.lab / "authorized_keys"
        self.volumes = self.vmfs / "volumes"
        self.usrlib_upper = root / "usrlib" / "upper"
        self.usrlib_work = root / "usrlib" / "work"
        self.ns_ctl = f"{NS_LAB}/ctl"
        self.ns_run = f"{NS_LAB}/run"
        self._uid = uid
        self._gid = gid

    def prepare(
        self, *, vmx_binary: Path, worlds_binary: Path, shims: Path, client_public_key: Path
    ) -> None:
        """Creates the host's tree; the lab user may write only the run directory."""
        for directory in (self.root, self.vmfs, self.lab, self.bin, self.run, self.volumes):
            directory.mkdir(mode=0o755, exist_ok=True)
            directory.chmod(0o755)
        (self.volumes / "ds1").mkdir(mode=0o755, exist_ok=True)
        os.chown(self.run, self._uid, self._gid)
        for shim in shims.iterdir():
            if shim.is_file():
                shutil.copyfile(shim, self.bin / shim.name)
                executable = shim.stat().st_mode & 0o111
                (self.bin / shim.name).chmod(0o755 if executable else 0o644)
        # ESXi's shell tools are busybox applets: its awk, not gawk, runs the daemon's programs.
        busybox = shutil.which("busybox")
        if busybox is None:
            raise LabError("no busybox: ESXi lab hosts use its awk (apt-get install busybox)")
        (self.bin / "awk").unlink(missing_ok=True)
        (self.bin / "awk").symlink_to(busybox)
        # worlds.c answers as ps or vmdumper by the name it is called by, as busybox applets do.
        for binary, name in (
            (vmx_binary, "vmx"),
            (worlds_binary, "ps"),
            (worlds_binary, "vmdumper"),
        ):
            try:
                os.link(binary, self.bin / name)
            except OSError:
                shutil.copyfile(binary, self.bin / name)
            (self.bin / name).chmod(0o755)
        shutil.copyfile(client_public_key, self.authorized_keys)
        self.authorized_keys.chmod(0o644)
        if not self.ctl.exists():
            os.mkfifo(self.ctl)
        self.ctl.chmod(0o622)  # the lab user's start shim writes requests, only root reads
        vmware_bin = self.usrlib_upper / "vmware" / "bin"
        vmware_bin.mkdir(parents=True, exist_ok=True)
        self.usrlib_work.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            (vmware_bin / "vmdumper").symlink_to(f"{NS_LAB}/bin/vmdumper")
        self.init_err.write_bytes(b"")

    def sshd_options(self) -> list[str]:
        return [
            f"AuthorizedKeysFile {NS_LAB}/authorized_keys",
            "MaxSessions 1",  # hardened ESXi: one session channel per connection
            f"SetEnv PATH={SHIM_PATH} VMFLAB_SYSLOG={NS_LAB}/run/syslog",
            # vmflab-session reads which key logged in (the helper key runs vmfenced-host).
            "ExposeAuthInfo yes",
            # Runs the client's command unchanged; see the script for what it adds.
            f"ForceCommand {NS_LAB}/bin/vmflab-session",
        ]

    # ------------------------------------------------------------------- VM files
    def vmx_path(self, name: str, datastore: str, directory: str | None = None) -> str:
        """``/vmfs/volumes/<datastore>/<directory or name>/<name>.vmx``."""
        check_vm_name(name)
        check_datastore(datastore)
        folder = name if directory is None else directory
        check_vm_name(folder)
        return f"{NS_VOLUMES}/{datastore}/{folder}/{name}.vmx"

    def outside(self, ns_path: str) -> Path:
        """The path outside the host of a path under /vmfs inside it."""
        if not ns_path.startswith("/vmfs/") or "/../" in ns_path:
            raise LabError(f"not a path under /vmfs: {ns_path!r}")
        return self.vmfs / ns_path.removeprefix("/vmfs/")

    def write_vmx(self, name: str, datastore: str, text: str, directory: str | None = None) -> str:
        ns_path = self.vmx_path(name, datastore, directory)
        path = self.outside(ns_path)
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o644)
        tmp.replace(path)
        self._register(ns_path)
        return ns_path

    def remove_vmx(self, ns_path: str) -> None:
        path = self.outside(ns_path)
        try:
            path.unlink()
        except FileNotFoundError as exc:
            raise LabError(f"no such VM config {ns_path!r}") from exc
        with contextlib.suppress(OSError):
            path.parent.rmdir()

    def _register(self, ns_path: str) -> None:
        """Gives the .vmx the next Vmid unless it has one (same registry and lock as vim-cmd)."""
        registry = self.run / "vmids"
        lock = self.run / "vmids.lock"
        deadline = time.monotonic() + LOCK_STALE_S
        while True:
            try:
                lock.mkdir()
                break
            except FileExistsError:
                if time.monotonic() > deadline:
                    with contextlib.suppress(OSError):
                        lock.rmdir()  # left by a killed holder
                    deadline = time.monotonic() + LOCK_STALE_S
                time.sleep(0.005)
        try:
            entries = []
            with contextlib.suppress(FileNotFoundError):
                for line in registry.read_text(encoding="utf-8").split("\n"):
                    vmid, _, path = line.partition("\t")
                    if vmid.isdigit() and path:
                        entries.append((int(vmid), path))
            if all(path != ns_path for _, path in entries):
                entries.append((max((vmid for vmid, _ in entries), default=0) + 1, ns_path))
                tmp = self.run / f"vmids.tmp.py{os.getpid()}"
                tmp.write_text("".join(f"{v}\t{p}\n" for v, p in entries), encoding="utf-8")
                os.chown(tmp, self._uid, self._gid)
                tmp.replace(registry)
        finally:
            lock.rmdir()

    def write_next_pid(self, pid: int) -> None:
        tmp = self.run / ".nextpid.tmp"
        tmp.write_text(f"{pid}\n")
        os.chown(tmp, self._uid, self._gid)
        tmp.replace(self.run / "nextpid")

    def clear_next_pid(self) -> None:
        try:
            (self.run / "nextpid").unlink()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
