"""Files of the lab's Proxmox VE nodes: the shared tree's directories, each node's sshd files,
``.members`` and the ``qm``/``ha-manager`` scripts.

``<workdir>/pve/`` holds ``etc-pve/`` (the shared tree, every node's ``/etc/pve``), ``state/``
(the lab's lock and counters, beside the tree), ``sbin/`` (``qm``, ``ha-manager``) and ``bin/``
(``kvm``: the stand-in built from ``vmflab/shims_pve/kvm.c``).
``<workdir>/hosts/<node>/`` holds the node's ``members`` (bind-mounted on ``/etc/pve/.members``
in that node only), ``bashrc`` and sshd's config, keys and log.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

from vmflab.nsproc import PACKAGE_PARENT
from vmflab.sshd import SshdFiles

# What a Perl tool of Proxmox loads before its first line of work, cut down to Perl's core
# modules that PVE's code uses (the PVE modules themselves, e.g. PVE::QemuServer with 8459
# lines, are not here): 60 ms of start-up measured on this machine (median of 7), against
# 3 ms for ``perl -e 1``. A lower bound of the real ``qm``'s start-up, paid for real.
PERL_MODULES = (
    "POSIX", "JSON::PP", "IO::Socket::IP", "IO::Socket::UNIX", "IO::Select", "Getopt::Long",
    "Data::Dumper", "Storable", "Digest::SHA", "MIME::Base64", "Encode", "File::Path",
    "File::Basename", "File::stat", "Fcntl", "Time::HiRes", "Socket", "Sys::Hostname",
    "Scalar::Util", "List::Util", "File::Temp", "IPC::Open3", "Time::Local", "Net::Domain",
    "HTTP::Tiny", "Text::ParseWords", "Term::ANSIColor",
)  # fmt: skip
TOOLS = ("qm", "ha-manager")


def tool_script(tool: str, state: Path, perl: bool = True) -> str:
    """``/usr/sbin/<tool>`` on a node: the Perl start-up, then ``vmflab.proxmox_cli``."""
    boot = (
        "import sys; sys.path.insert(0, sys.argv.pop(1)); "
        "from vmflab.proxmox_cli import main; sys.exit(main(sys.argv[1:]))"
    )
    lines = ["#!/bin/sh"]
    if perl:
        modules = " ".join(f"-M{m}" for m in PERL_MODULES)
        lines.append(f"/usr/bin/perl {modules} -e 1 || exit 255")
    python = shlex.join([sys.executable, "-I", "-S", "-c", boot, str(PACKAGE_PARENT), tool])
    lines.append(f'exec {python} {shlex.quote(str(state))} "$@"')
    return "\n".join(lines) + "\n"


class PveDirs:
    """The cluster-wide directories under ``<workdir>/pve``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tree = root / "etc-pve"
        self.state = root / "state"
        self.sbin = root / "sbin"
        self.bin = root / "bin"

    def prepare(self, kvm_binary: Path, *, perl: bool = True) -> None:
        """A new, empty cluster: a lab directory used before starts from nothing."""
        for old in (self.tree, self.state):
            if old.exists():
                shutil.rmtree(old)
        for directory in (self.tree, self.state, self.sbin, self.bin):
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        for tool in TOOLS:
            path = self.sbin / tool
            path.write_text(tool_script(tool, self.state, perl))
            path.chmod(0o755)
        shutil.copyfile(kvm_binary, self.bin / "kvm")
        (self.bin / "kvm").chmod(0o755)
        # The mount point of .members inside the tree (each node mounts its own on it).
        (self.tree / ".members").touch()


class ProxmoxFiles(SshdFiles):
    """One node's files (``<workdir>/hosts/<node>``)."""

    def __init__(self, root: Path) -> None:
        SshdFiles.__init__(self, root)
        self.members = root / "members"
        self.bashrc = root / "bashrc"
        self.authorized_keys = root / "authorized_keys"
        # Where the lab's logger stand-in (vmflab.helper) writes the helper's refusals.
        self.syslog = root / "syslog"

    def prepare(self, client_public_key: Path) -> None:
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        shutil.copyfile(client_public_key, self.authorized_keys)
        self.authorized_keys.chmod(0o600)
        self.init_err.write_bytes(b"")
        self.bashrc.write_bytes(b"")
        self.members.write_bytes(b"")
        self.new_host_key()

    def write_members(self, text: str) -> None:
        """In place, not by rename: the node's bind mount holds this very inode."""
        with self.members.open("r+", encoding="utf-8") as handle:
            handle.truncate(0)
            handle.write(text)

    def sshd_options(self) -> list[str]:
        # Root logs in with the lab key only, as on a Proxmox node (qm needs root).
        return [
            f"AuthorizedKeysFile {self.authorized_keys}",
            "AllowUsers root",
            f"SetEnv VMFLAB_SYSLOG={self.syslog}",
        ]
