"""The ESXi (and esx-classic) layer of the lab's PID 1 (see ``core``).

It bind-mounts the host's directory on ``/vmfs`` (and, best effort, overlays ``/usr/lib`` so that
``/usr/lib/vmware/bin/vmdumper`` exists as on ESXi), and serves the control FIFO through which
the lab's start shim, running as the lab user, has the init (root) set ``ns_last_pid`` right
before the fork that must get the PID (see ``LabHost.set_next_pid``).

Control FIFO lines: ``nextpid <N> <reply fifo under the run dir>``; the reply is ``ok`` or
``error <text>``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
from pathlib import Path
from typing import TextIO

from vmflab.pid1.core import Init, split_lines
from vmflab.pid1.system import MS_BIND, MS_REC, InitError, mount, set_next_pid


class EsxiInit(Init):
    def __init__(self, args: argparse.Namespace, log_file: TextIO) -> None:
        Init.__init__(self, args, log_file)
        self._ctl_fd = -1
        self._ctl_buffer = b""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--vmfs", required=True, help="directory bind-mounted on /vmfs")
        parser.add_argument("--ctl", required=True, help="control FIFO (path inside the host)")
        parser.add_argument("--run-dir", required=True, help="run directory (path inside the host)")
        parser.add_argument("--usrlib-upper", help="overlay upper dir for /usr/lib (best effort)")
        parser.add_argument("--usrlib-work", help="overlay work dir for /usr/lib")

    def set_up(self) -> None:
        args = self.args
        mount(args.vmfs, "/vmfs", None, MS_BIND | MS_REC, None)
        if args.usrlib_upper and args.usrlib_work:
            options = f"lowerdir=/usr/lib,upperdir={args.usrlib_upper},workdir={args.usrlib_work}"
            try:
                mount("overlay", "/usr/lib", "overlay", 0, options)
            except OSError as exc:
                self.log(f"no /usr/lib/vmware ({exc}); the shims stay reachable by PATH")
        self._ctl_fd = os.open(args.ctl, os.O_RDWR | os.O_NONBLOCK)
        self.watch(self._ctl_fd, self.on_ctl)

    def on_ctl(self) -> None:
        try:
            chunk = os.read(self._ctl_fd, 65536)
        except BlockingIOError:
            return
        lines, self._ctl_buffer = split_lines(self._ctl_buffer, chunk)
        for line in lines:
            self.handle_ctl(line)

    def handle_ctl(self, line: str) -> None:
        words = line.split(" ")
        if len(words) != 3 or words[0] != "nextpid":
            self.log(f"bad control line {line!r}")
            return
        _, pid, reply_path = words
        run_dir = self.args.run_dir.rstrip("/") + "/"
        if not reply_path.startswith(run_dir) or "/../" in reply_path:
            self.log(f"control reply path outside {run_dir}: {reply_path!r}")
            return
        try:
            set_next_pid(pid)
            answer = "ok"
        except (InitError, OSError) as exc:
            answer = f"error {exc}"
        self.log(f"control nextpid {pid}: {answer}")
        try:
            if not stat.S_ISFIFO(os.lstat(reply_path).st_mode):
                return
            fd = os.open(reply_path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError as exc:
            self.log(f"control reply to {reply_path!r} failed: {exc}")
            return
        try:
            os.write(fd, (answer + "\n").encode())
        except OSError as exc:
            self.log(f"control reply to {reply_path!r} failed: {exc}")
        finally:
            os.close(fd)
        # Removed here: the requester must not fork between its request and its next fork.
        with contextlib.suppress(OSError):
            Path(reply_path).unlink()
