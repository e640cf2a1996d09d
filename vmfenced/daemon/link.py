"""One warm SSH shell per lane: framing, one command at a time, reconnect with capped backoff.

A lane is one SSH connection carrying one long-lived `exec /bin/sh` channel (hardened ESXi
allows one session per connection), or, in helper mode, one `vmfenced-host` channel that
takes requests instead of shell text and frames its answers the same way. Every command is
framed by a per-command random end marker
followed by its exit status, so output that happens to look like a marker cannot end a command
early. A command that is interrupted for any reason (timeout, cancellation, lost connection)
aborts the connection: the shell may still be running it, and its late output must never be read
as the answer to the next command.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncssh
import structlog

from vmfenced.backends.helper import HelperSpec, framed, request
from vmfenced.config import HostConfig, SSHConfig
from vmfenced.daemon.knownhosts import KnownHosts
from vmfenced.errors import CommandTimeout, LinkDown, LinkError
from vmfenced.model import LinkState

MAX_OUTPUT = 16 * 1024 * 1024
BACKOFF_FIRST = 0.1
# A host back from a reboot is reconnected within about a second.
BACKOFF_CAP = 1.0
RECONNECT_GRACE = 1.0
# AES-GCM first: one AEAD call per packet, where asyncssh's chacha20-poly1305 costs about
# 0.1 ms more per round trip here; ESXi's sshd offers GCM too. No CBC, 3DES or arcfour.
CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)


@dataclass(frozen=True, slots=True)
class CommandResult:
    status: int
    output: str
    elapsed: float


StateListener = Callable[["Lane"], None]


class _Client(asyncssh.SSHClient):
    def __init__(self) -> None:
        self.lost: Exception | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc


def describe(exc: BaseException) -> str:
    """A short reason for status lines: the class says more than an empty message."""
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return f"host key not verifiable (refusing to trust it): {exc.reason}"
    if isinstance(exc, asyncssh.PermissionDenied):
        return f"authentication refused: {exc.reason}"
    if isinstance(exc, asyncssh.DisconnectError):
        return f"disconnected: {exc.reason}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, LinkError):
        return exc.reason
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Lane:
    def __init__(
        self,
        host: HostConfig,
        ssh: SSHConfig,
        name: str,
        *,
        setup: str,
        client_keys: list[asyncssh.SSHKey],
        on_change: StateListener,
        known_hosts: KnownHosts | None = None,
        keepalive_factor: float = 1.0,
        helper: HelperSpec | None = None,
    ) -> None:
        self.host = host
        self.name = name
        self.state = LinkState.CONNECTING
        self.since = time.time()
        self.reason: str | None = "not connected yet"
        self.rtt: float | None = None
        self.ssh = ssh
        self._setup = setup
        self.helper = helper
        # The version the host's helper answered at this connection (helper mode only).
        self.helper_version: str | None = None
        self._client_keys = client_keys
        self._on_change = on_change
        self._known_hosts = known_hosts or KnownHosts()
        self._keepalive_factor = keepalive_factor
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._conn: asyncssh.SSHClientConnection | None = None
        self._client: _Client | None = None
        self._proc: asyncssh.SSHClientProcess[bytes] | None = None
        self._buffer = bytearray()
        self._broken: str | None = None
        self._attempting = False
        # The address of `host` this lane's connection reaches now (primary or a fallback).
        self.connected_address: str | None = None
        self._log = structlog.get_logger("vmfenced.link").bind(host=host.name, lane=name)

    # -- state ---------------------------------------------------------------------------------

    def _set(self, state: LinkState, reason: str | None) -> None:
        if state is self.state and reason == self.reason:
            return
        if state is not self.state:
            self.since = time.time()
        self.state, self.reason = state, reason
        self._changed.set()
        self._changed = asyncio.Event()
        self._on_change(self)

    async def wait_settled(self, timeout: float) -> LinkState:
        """Wait while the lane is connecting; return the state it settles in (or CONNECTING)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.state is LinkState.CONNECTING:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                break
        return self.state

    async def wait_state(self, wanted: LinkState, timeout: float) -> bool:
        """Wait until the lane is in `wanted`; False when the timeout ran out first."""
        try:
            async with asyncio.timeout(timeout):
                while self.state is not wanted:
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    # -- connection ----------------------------------------------------------------------------

    def _options(self) -> asyncssh.SSHClientConnectionOptions:
        ssh = self.ssh
        return asyncssh.SSHClientConnectionOptions(
            username=ssh.username,
            client_keys=self._client_keys,
            known_hosts=self._known_hosts.get(ssh.known_hosts),
            connect_timeout=ssh.connect_timeout,
            login_timeout=ssh.connect_timeout,
            keepalive_interval=ssh.keepalive_interval * self._keepalive_factor,
            keepalive_count_max=ssh.keepalive_count_max,
            config=None,
            agent_path=None,
            preferred_auth="publickey",
            encryption_algs=list(CIPHERS),
        )

    async def _open(self) -> None:
        """The primary address first, then each fallback in order, every time."""
        addresses = self.host.addresses()
        failures = []
        for address in addresses:
            try:
                async with asyncio.timeout(self.ssh.connect_timeout * 2):
                    await self._open_at(address)
            except (OSError, asyncssh.Error, TimeoutError, LinkError) as exc:
                self._drop()
                if len(addresses) == 1:
                    raise
                failures.append(f"{address}: {describe(exc)}")
                continue
            if address != addresses[0]:
                self._log.warning("using a fallback address", address=address, failed=failures)
            return
        raise LinkError(self.host.name, self.name, "; ".join(failures))

    async def _open_at(self, address: str) -> None:
        client = _Client()
        source = self.ssh.source_address
        conn = await asyncssh.connect(
            address,
            self.host.port,
            options=self._options(),
            client_factory=lambda: client,
            local_addr=() if source is None else (source, 0),
        )
        # An exec request, not a PTY shell: ESXi logs idle interactive shells out. A key bound
        # to the helper runs it whatever is asked; the helper refuses any other command.
        command = "exec /bin/sh" if self.helper is None else "vmfenced-host"
        try:
            proc = await conn.create_process(command, encoding=None, stderr=asyncssh.STDOUT)
        except BaseException:
            conn.abort()
            raise
        self._conn, self._client, self._proc = conn, client, proc
        self.connected_address = address
        self._buffer.clear()
        self._broken = None
        self.helper_version = None
        if self.helper is None:
            await self._exchange(self._setup, self.ssh.connect_timeout)
        else:
            await self._handshake(self.helper)

    async def _handshake(self, helper: HelperSpec) -> None:
        """`hello`: the host must run the helper of this kind, version and libvirt URI (or
        Proxmox node); any other answer is the lane's `down` reason."""
        try:
            output, _status = await self._exchange(
                request("hello", None, (helper.version,)), self.ssh.connect_timeout
            )
        except LinkError as exc:
            raise LinkError(
                self.host.name, self.name, f"no vmfenced-host answered: {exc.reason}"
            ) from None
        reason = helper.refusal(output)
        if reason is not None:
            raise LinkError(self.host.name, self.name, reason)
        self.helper_version = helper.version

    def abort(self, reason: str) -> None:
        """Drop the connection; the supervisor reconnects."""
        if self._broken is None:
            self._broken = reason
        if self._conn is not None:
            self._conn.abort()
            # At once, not when the supervisor wakes: no command may be queued on a dead shell.
            if self.state is LinkState.UP:
                self._set(LinkState.DOWN, reason)

    async def supervise(self) -> None:
        """Keep the lane connected until cancelled."""
        attempt = 0
        while True:
            # A lane that was up and lost stays "down" while it retries: operators and fences
            # must see the loss at once, not a hopeful "connecting" for connect_timeout.
            if self.state is not LinkState.DOWN:
                self._set(LinkState.CONNECTING, self.reason)
            self._attempting = True
            try:
                async with asyncio.timeout(
                    self.ssh.connect_timeout * 2 * len(self.host.addresses())
                ):
                    await self._open()
            except (OSError, asyncssh.Error, TimeoutError, LinkError) as exc:
                self._attempting = False
                self._drop()
                self._set(LinkState.DOWN, describe(exc))
                attempt += 1
                delay = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (attempt - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                continue
            except BaseException:
                self._drop()
                raise
            attempt = 0
            self._attempting = False
            self._set(LinkState.UP, None)
            self._log.info("link up", address=f"{self.connected_address}:{self.host.port}")
            reason = await self._until_closed()
            self._drop()
            self._set(LinkState.DOWN, reason)
            self._log.warning("link down", reason=reason)
            # A first retry at once: most losses are one dropped connection, not a dead host.
            attempt = 1

    async def _until_closed(self) -> str:
        conn, proc, client = self._conn, self._proc, self._client
        assert conn is not None and proc is not None and client is not None
        waiters = {
            asyncio.ensure_future(conn.wait_closed()),
            asyncio.ensure_future(proc.wait_closed()),
        }
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self._broken is not None:
            return self._broken
        if client.lost is not None:
            return f"connection lost: {describe(client.lost)}"
        return "the remote shell exited" if not conn.is_closed() else "connection closed"

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.abort()
        self._conn = self._proc = self._client = None
        self.connected_address = None

    async def close(self) -> None:
        conn = self._conn
        self._drop()
        if conn is not None:
            await conn.wait_closed()

    # -- commands ------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A command is running (or queued) on this lane now."""
        return self._lock.locked()

    async def run(self, command: str, timeout: float) -> CommandResult:
        """Run one command on the warm shell; raise LinkDown/CommandTimeout/LinkError."""
        # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
        start = time.perf_counter()
        if self.state is LinkState.CONNECTING:
            await self.wait_settled(timeout)
        elif self.state is LinkState.DOWN and self._attempting:
            # A healthy host is back in tens of milliseconds (say after our own reset); a hung
            # one must not hold a fence that could succeed elsewhere for connect_timeout.
            await self.wait_state(LinkState.UP, min(timeout, RECONNECT_GRACE))
        if self.state is not LinkState.UP:
            raise LinkDown(self.host.name, self.name, self.reason or self.state.value)
        try:
            async with asyncio.timeout(max(0.0, timeout - (time.perf_counter() - start))):
                async with self._lock:
                    output, status = await self._exchange(command, None)
        except TimeoutError:
            raise CommandTimeout(
                self.host.name, self.name, f"no answer within {timeout:g} s"
            ) from None
        return CommandResult(status, output, time.perf_counter() - start)

    async def _exchange(self, command: str, timeout: float | None) -> tuple[str, int]:
        proc = self._proc
        if proc is None or self._broken is not None:
            raise LinkDown(self.host.name, self.name, self._broken or "not connected")
        token = secrets.token_hex(8)
        marker = f"\n:vmf-end:{token}:".encode()
        if self.helper is not None:
            # A request line; the helper frames its answer as the shell framing below does.
            text = framed(token, command)
        else:
            # stdin from /dev/null: a command must never eat the shell's own input (the next
            # commands). The group's status is printed after a newline so output without a
            # final newline still ends cleanly.
            text = (
                f"{{ {command}\n}} </dev/null 2>&1; printf '\\n:vmf-end:%s:%d\\n' {token} \"$?\"\n"
            )
        done = False
        try:
            async with asyncio.timeout(timeout):
                if self._buffer:
                    self._log.warning("discarding stray output", size=len(self._buffer))
                    self._buffer.clear()
                proc.stdin.write(text.encode())
                output, status = await self._read_until(proc, marker)
            done = True
        except (OSError, asyncssh.Error, EOFError) as exc:
            raise LinkError(self.host.name, self.name, describe(exc)) from None
        finally:
            if not done:
                self.abort("a command was interrupted; connection reset")
        return output, status

    async def _read_until(
        self, proc: asyncssh.SSHClientProcess[bytes], marker: bytes
    ) -> tuple[str, int]:
        buf = self._buffer
        searched = 0
        while True:
            at = buf.find(marker, searched)
            if at >= 0:
                end = buf.find(b"\n", at + len(marker))
                if end >= 0:
                    break
            else:
                searched = max(0, len(buf) - len(marker))
            chunk = await proc.stdout.read(65536)
            if not chunk:
                raise EOFError("the remote shell closed its output")
            buf += chunk
            if len(buf) > MAX_OUTPUT:
                raise LinkError(self.host.name, self.name, "command output over 16 MiB")
        output = buf[:at].decode("utf-8", errors="replace")
        status_text = buf[at + len(marker) : end].decode("ascii", errors="replace")
        del buf[: end + 1]
        try:
            status = int(status_text)
        except ValueError:
            raise LinkError(self.host.name, self.name, f"bad status {status_text!r}") from None
        return output, status

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "since": self.since,
            "reason": self.reason,
            "connected_address": self.connected_address,
        }
