"""`vmfencectl host-helper`: prints the `vmfenced-host` program of a kind, or the one
authorized_keys line that binds a key to it.

The programs are package data (`vmfenced/hosthelper/KIND.sh`), written from the backends'
own scripts (`vmfenced.backends.helper`, which this client may not import); a unit test checks
that the shipped text is exactly what the daemon builds and expects.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

TYPE_CHECKING = False
if TYPE_CHECKING:  # every vmfencectl call imports this module: no typing at run time
    from typing import Any, TextIO

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

KINDS = ("esxi", "esx-classic", "libvirt", "proxmox")
DEFAULT_LIBVIRT_URI = "qemu:///system"
URI_MARK = "@VMFENCED_LIBVIRT_URI@"
# As config.py's libvirt_uri: a scheme, "://", no whitespace.
_URI = re.compile(r"^[a-z][a-z0-9+.-]*://[^\s]*$")
# An absolute path sshd can put in a quoted command= option without escaping.
_PATH = re.compile(r"^/[A-Za-z0-9._/+-]+$")
_KEY_TYPES = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-[a-z0-9@.-]+)$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


class HelperUsage(Exception):
    """A bad option value: exit status 2 with this message."""


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    helper = sub.add_parser(
        "host-helper",
        help="print the vmfenced-host program for a host kind (or its authorized_keys line)",
    )
    helper.add_argument("--kind", choices=KINDS, required=True)
    helper.add_argument(
        "--libvirt-uri",
        default=DEFAULT_LIBVIRT_URI,
        help=f"libvirt hosts: the libvirtd virsh talks to (default {DEFAULT_LIBVIRT_URI})",
    )
    helper.add_argument("--path", help="where the program is saved on the host")
    helper.add_argument("--public-key", type=Path, help="vmfenced's public key file (with --path)")


def program(kind: str, libvirt_uri: str = DEFAULT_LIBVIRT_URI) -> str:
    """The helper program for `kind`, exactly as the daemon expects it."""
    if kind not in KINDS:
        raise HelperUsage(f"unknown kind {kind!r}")
    if not _URI.match(libvirt_uri) or len(libvirt_uri) > 1024:
        raise HelperUsage(f"--libvirt-uri: not a libvirt URI: {libvirt_uri!r}")
    from importlib import resources  # only this command reads package data

    text = resources.files("vmfenced").joinpath("hosthelper", f"{kind}.sh").read_text()
    if kind != "libvirt" and libvirt_uri != DEFAULT_LIBVIRT_URI:
        raise HelperUsage("--libvirt-uri: only for --kind libvirt")
    return text.replace(URI_MARK, shlex.quote(libvirt_uri))


_OLD_SSHD_OPTIONS = "no-port-forwarding,no-agent-forwarding,no-X11-forwarding,no-pty"


def authorized_keys_line(path: str, public_key: str, kind: str = "libvirt") -> str:
    """`restrict,command="PATH" TYPE KEY COMMENT`: the key may run the helper and nothing
    else (no forwarding, no pty, no user rc). On ESXi the program is handed to /bin/sh
    rather than executed: a datastore file is no installed VIB, which hosts enforcing
    execInstalledOnly refuse to execute."""
    if not _PATH.match(path) or "/../" in path or path.endswith("/.."):
        raise HelperUsage(f"--path: an absolute path of letters, digits and ._/+- only: {path!r}")
    words = public_key.split()
    if len(words) < 2 or not _KEY_TYPES.match(words[0]) or not _BASE64.match(words[1]):
        raise HelperUsage("--public-key: not an OpenSSH public key line (TYPE BASE64 [COMMENT])")
    command = f"/bin/sh {path}" if kind == "esxi" else path
    # `restrict` came with OpenSSH 7.2; ESX 3.x/4.x service consoles run OpenSSH 3/4, which
    # refuse the whole key line for an option they do not know: name each restriction there.
    options = _OLD_SSHD_OPTIONS if kind == "esx-classic" else "restrict"
    line = f'{options},command="{command}" {words[0]} {words[1]}'
    comment = " ".join(words[2:])
    if comment and all(c.isprintable() and c != '"' for c in comment):
        line += f" {comment}"
    return line + "\n"


def run(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    try:
        if (args.path is None) != (args.public_key is None):
            raise HelperUsage("--path and --public-key go together")
        text = program(args.kind, args.libvirt_uri)
        if args.path is not None:
            try:
                key = args.public_key.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                stderr.write(f"vmfencectl: cannot read {args.public_key}: {exc}\n")
                return EXIT_FAILED
            text = authorized_keys_line(args.path, key.strip(), args.kind)
    except HelperUsage as exc:
        stderr.write(f"vmfencectl: error: {exc}\n")
        return EXIT_USAGE
    stdout.write(text)
    return EXIT_OK
