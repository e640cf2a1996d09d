"""The `vmfenced-host` helper on lab hosts: installed as `vmfencectl host-helper` prints it,
bound to a second lab key (the helper key) with the authorized_keys line it prints.

The lab's own key keeps its shell (the lab drives its hosts through it); the daemon of a
helper-mode test logs in with the helper key and can only talk to the helper. ESXi lab hosts
run it under busybox ash (ESXi's shell), the other kinds under the host's /bin/sh (dash).

`logger` on lab hosts is a stand-in (no syslog in the namespaces) that appends to the host's
syslog file, read by `syslog_lines`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vmfenced.clients.hosthelper import authorized_keys_line, program
from vmflab.control import LabError

HELPER_NAME = "vmfenced-host"
LOGGER_SHIM = """#!/bin/sh
# Lab stand-in for logger(1): appends "TAG: MESSAGE" to this host's syslog file.
tag=logger
while [ $# -gt 0 ]; do
  case $1 in
    -t) tag=$2; shift 2;;
    -p) shift 2;;
    --) shift; break;;
    *) break;;
  esac
done
printf '%s: %s\\n' "$tag" "$*" >> "$VMFLAB_SYSLOG"
"""


def install(
    *,
    kind: str,
    bin_dir: Path,
    ns_bin: str,
    authorized_keys: Path,
    helper_public_key: Path,
    busybox_ash: bool,
) -> None:
    """Writes the helper and the logger shim into `bin_dir` (`ns_bin` inside the host) and
    appends the helper key's restricted line to `authorized_keys`."""
    text = program(kind)
    if busybox_ash:
        ash = bin_dir / "ash"
        busybox = shutil.which("busybox")
        if busybox is None:
            raise LabError("no busybox: ESXi lab hosts run the helper under its ash")
        ash.unlink(missing_ok=True)
        ash.symlink_to(busybox)
        text = text.replace("#!/bin/sh\n", f"#!{ns_bin}/ash\n", 1)
    helper = bin_dir / HELPER_NAME
    helper.write_text(text)
    helper.chmod(0o755)
    logger = bin_dir / "logger"
    logger.write_text(LOGGER_SHIM)
    logger.chmod(0o755)
    line = authorized_keys_line(
        f"{ns_bin}/{HELPER_NAME}", helper_public_key.read_text().strip(), kind
    )
    with authorized_keys.open("a") as keys:
        keys.write(line)


def key_blob(public_key: Path) -> str:
    """The base64 part of an OpenSSH public key line."""
    return public_key.read_text().split()[1]


def syslog_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").split("\n")[:-1]
    except FileNotFoundError:
        return []
