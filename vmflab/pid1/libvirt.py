"""The libvirt (KVM) layer of the lab's PID 1 (see ``core``).

* It gives the host its own libvirt state: a tmpfs on ``/run/libvirt`` and bind mounts of the
  host's directories on ``/etc/libvirt``, ``/var/lib/libvirt``, ``/var/log/libvirt`` and
  ``/var/cache/libvirt`` (and of an empty file on root's ``~/.bashrc``);
  ``/var/cache/libvirt/qemu`` (the capabilities cache) is shared by every host, so only the first
  libvirtd ever started pays for the probe;
* it starts ``virtlogd`` and ``libvirtd`` in the foreground as its children (the core's reaper
  makes a qemu killed with ``kill -9`` vanish at once, as under systemd).

Its own verb: ``wait-libvirtd <seconds>`` -> ``ready <seconds since libvirtd started>`` |
``error <text>``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from vmflab.pid1.core import Init
from vmflab.pid1.system import ENV, MS_BIND, MS_REC, InitError, mount, spawn

VIRSH_PROBE = ["virsh", "-c", "qemu:///system", "version"]
PROBE_INTERVAL_S = 0.05


@dataclass
class Probe:
    """A pending ``wait-libvirtd``: ``virsh version`` run again until it succeeds."""

    deadline: float
    pid: int | None = None
    status: int | None = None
    next_at: float = 0.0


class LibvirtInit(Init):
    def __init__(self, args: argparse.Namespace, log_file: TextIO) -> None:
        Init.__init__(self, args, log_file)
        self._started = 0.0
        self._probe: Probe | None = None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--root", required=True, type=Path, help="the host's directory")
        parser.add_argument("--caps", required=True, type=Path, help="shared capabilities cache")

    def set_up(self) -> None:
        root: Path = self.args.root
        Path("/run/libvirt").mkdir(mode=0o755, exist_ok=True)
        mount("tmpfs", "/run/libvirt", "tmpfs", 0, "mode=0755")
        for source, target in (
            (root / "etc", "/etc/libvirt"),
            (root / "lib", "/var/lib/libvirt"),
            (root / "log", "/var/log/libvirt"),
            (root / "cache", "/var/cache/libvirt"),
            (self.args.caps, "/var/cache/libvirt/qemu"),
        ):
            mount(str(source), target, None, MS_BIND | MS_REC, None)
        # bash runs root's ~/.bashrc for every ssh command: mask it (not /root, which may hold the
        # Python running this very init).
        if Path("/root/.bashrc").is_file():
            mount(str(root / "bashrc"), "/root/.bashrc", None, MS_BIND, None)
        # Their default pid files are in /run itself, which every host shares.
        log_fd = self._log.fileno()
        for name in ("virtlogd", "libvirtd"):
            argv = [name, "--pid-file", f"/run/libvirt/{name}.pid"]
            self.started(name, spawn(argv, out_fd=log_fd, env=ENV))
        self._started = time.monotonic()

    def request(self, words: list[str]) -> bool:
        match words:
            case ["wait-libvirtd", seconds]:
                self.wait_libvirtd(seconds)  # tick replies
            case _:
                return False
        return True

    def wait_libvirtd(self, text: str) -> None:
        """Starts answering ``wait-libvirtd``; ``tick`` replies later.

        Never blocking: libvirtd's capability probe waits for its probe qemu to be reaped, by us.
        """
        try:
            deadline = time.monotonic() + float(text)
        except ValueError:
            raise InitError(f"not a number of seconds: {text!r}") from None
        if self._probe is not None:
            raise InitError("already waiting for libvirtd")
        self._probe = Probe(deadline=deadline)

    def on_exit(self, pid: int, code: int) -> None:
        probe = self._probe
        if probe is not None and pid == probe.pid:
            probe.status = code
            probe.next_at = time.monotonic() + PROBE_INTERVAL_S

    def timeout(self) -> float | None:
        return None if self._probe is None else PROBE_INTERVAL_S

    def tick(self) -> None:
        probe = self._probe
        if probe is None:
            return
        now = time.monotonic()
        if probe.pid is not None and probe.status is None:
            if now < probe.deadline:
                return  # virsh still waiting for libvirtd
            with contextlib.suppress(ProcessLookupError):
                os.kill(probe.pid, signal.SIGKILL)
        if probe.status == 0:
            self._probe = None
            self.reply(f"ready {now - self._started:.3f}")
            return
        code = self.exit_code("libvirtd")
        if code is not None or now >= probe.deadline:
            self._probe = None
            why = f"exited with {code}" if code is not None else ""
            self.log(f"libvirtd not ready: {why or 'timeout'}")
            self.reply(f"error libvirtd {why or 'not answering in time'}")
            return
        if now >= probe.next_at:
            probe.pid = spawn(VIRSH_PROBE, env=ENV)
            probe.status = None
