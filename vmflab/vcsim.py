"""vcsim, VMware's vCenter/ESXi simulator, as the lab's vSphere API host.

``Vcsim`` starts one simulator (built by vmflab.vcsim_build) on 127.0.0.1 and a port the kernel
picks, waits until it answers and stops it by PID on the way out, whatever happened meanwhile.
Its quirks (docs/vsphere.md): tasks finish inside the call; property updates are delivered on a
250 ms tick; memory grows with every task, so long runs restart it.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from vmflab.control import LabError
from vmflab.vcsim_build import PASSWORD, USERNAME, VcsimBuild, build, vcsim_unavailable

__all__ = ["PASSWORD", "USERNAME", "Vcsim", "VcsimBuild", "build", "vcsim_unavailable"]

# The line vcsim prints once it listens: "export GOVC_URL=https://user:pass@127.0.0.1:PORT/sdk ..."
_URL_LINE = re.compile(rb"GOVC_URL=https://[^@\s]*@127\.0\.0\.1:(\d{1,5})/sdk")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


class Vcsim:
    """One vcsim on 127.0.0.1 (the kernel picks the port: no race with another lab).

    Context manager; leaving it stops the process by PID (SIGTERM, then SIGKILL)."""

    def __init__(
        self,
        build: VcsimBuild,
        *,
        esx: bool = False,
        hosts: int = 3,
        standalone_hosts: int = 1,
        vms: int = 2,
        method_delay: dict[str, int] | None = None,
        wsdl: bool = False,
        log_path: Path | None = None,
    ) -> None:
        self.build = build
        self.argv = [
            str(build.binary),
            *("-l", "127.0.0.1:0"),
            *("-username", USERNAME, "-password", PASSWORD),
        ]
        if esx:
            self.argv.append("-esx")
        else:
            self.argv += ["-host", str(hosts), "-standalone-host", str(standalone_hosts)]
        self.argv += ["-vm", str(vms)]
        if method_delay:
            self.argv += ["-method-delay", ",".join(f"{m}:{ms}" for m, ms in method_delay.items())]
        if wsdl:
            self.argv += ["-wsdl-dir", str(build.wsdl_dir)]
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self) -> Vcsim:
        log = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        finally:
            if self.log_path and not isinstance(log, int):
                log.close()
        try:
            self.port = self._read_port(START_TIMEOUT)
            self._wait_answering(START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    def _read_port(self, timeout: float) -> int:
        assert self.process is not None and self.process.stdout is not None
        out = self.process.stdout
        seen = b""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(out, selectors.EVENT_READ)
            while b"\n" not in seen:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise LabError(f"vcsim printed no address within {timeout} s: {seen[:200]!r}")
                chunk = os.read(out.fileno(), 4096)
                if not chunk:
                    raise LabError(f"vcsim exited {self.process.wait()}: {seen[:200]!r}")
                seen += chunk
        match = _URL_LINE.search(seen)
        if match is None:
            raise LabError(f"vcsim's first line is not its address: {seen[:200]!r}")
        return int(match.group(1))

    def _wait_answering(self, timeout: float) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # vcsim's built-in test certificate
        deadline = time.monotonic() + timeout
        problem = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(
                    f"{self.url}/vimServiceVersions.xml", context=context, timeout=2
                ) as r:
                    if r.status == 200:
                        return
            except OSError as exc:
                problem = str(exc)
            time.sleep(0.02)  # polling a condition with a deadline
        raise LabError(f"vcsim on port {self.port} does not answer: {problem}")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/sdk"

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def restart(self) -> None:
        """A new process on the same port (its state is lost, like a vCenter restart)."""
        port = self.port
        self.stop()
        self.argv[self.argv.index("-l") + 1] = f"127.0.0.1:{port}"
        self.start()

    def __enter__(self) -> Vcsim:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
