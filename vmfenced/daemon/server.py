"""The unix socket: who may connect, one JSON line in, one JSON line out, never a crash.

Connections are accepted here, not by asyncio's server (which accepts a whole backlog at once,
before any check runs): a client over a limit (clientlimits.ClientLimits) is refused with one
error line and closed at once, so the descriptors in use never exceed the limits. A client that
sends no complete request line within `idle_timeout` is told so and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from vmfenced.daemon.clientlimits import MAX_CLIENTS, ClientLimits, nofile_for, reserved_fds
from vmfenced.daemon.peercred import Peer, peer_of
from vmfenced.errors import StartupError
from vmfenced.protocol import ProtocolError, Request, decode, reply_error, reply_ok
from vmfenced.wire import MAX_REQUEST_BYTES

Handler = Callable[[Request, Peer], Awaitable[dict[str, Any]]]
# A client that does not read its replies must not pin a connection forever.
WRITE_TIMEOUT = 10.0
# Accepted per wake-up of the listening socket, so a flood cannot monopolise the event loop.
ACCEPT_BATCH = 64
# After EMFILE/ENFILE on accept (something else used the descriptors): retry then, not in a loop.
ACCEPT_RETRY = 0.5
# Refusals for a limit are logged at most this often (with how many were not logged).
REFUSAL_LOG_EVERY = 10.0

__all__ = ["Peer", "SocketServer", "reserved_fds"]


class SocketServer:
    def __init__(
        self,
        path: Path,
        mode: int,
        group: str | None,
        handler: Handler,
        idle_timeout: float = 10.0,
    ) -> None:
        self.path = path
        self._mode = mode
        self._group = group
        self._gid = grp.getgrnam(group).gr_gid if group else None
        self._handler = handler
        # Seconds a client may take to send a complete request line, after connecting or
        # after its last reply; read for each line, so a reload changes it at once.
        self.idle_timeout = idle_timeout
        # Until set_reserved_fds() (the daemon calls it before start()): MAX_CLIENTS, no lanes.
        self.limits = ClientLimits.compute(MAX_CLIENTS + reserved_fds(0), reserved_fds(0))
        self._listener: socket.socket | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._by_uid: dict[int, int] = {}
        self._accepting = True
        self._refusals: dict[str, tuple[float, int]] = {}
        self._log = structlog.get_logger("vmfenced.server")

    def set_reserved_fds(self, reserved: int) -> ClientLimits:
        """Recompute the client limits for `reserved` descriptors kept for other uses.

        StartupError (nothing changed) when too few would be left for clients. Clients already
        connected stay; new ones are admitted against the new limits."""
        self.limits = ClientLimits.compute(nofile_for(reserved + MAX_CLIENTS), reserved)
        return self.limits

    async def start(self) -> None:
        await self._refuse_if_live()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StartupError(f"cannot remove stale socket {self.path}: {exc.strerror}") from None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # never a window where the socket is world-connectable
        try:
            listener.bind(str(self.path))
            # A deep backlog: a burst of clients (every node's agent at once) queues, not fails.
            listener.listen(MAX_CLIENTS)
        except OSError as exc:
            listener.close()
            raise StartupError(f"cannot listen on {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        listener.setblocking(False)
        self._listener = listener
        if self._gid is not None:
            os.chown(self.path, -1, self._gid)
        self.path.chmod(self._mode)
        asyncio.get_running_loop().add_reader(listener, self._on_readable)

    async def _refuse_if_live(self) -> None:
        if not self.path.exists():
            return
        try:
            _reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.path)), 2
            )
        except (OSError, TimeoutError):
            return  # stale: nobody listens
        writer.close()
        raise StartupError(f"socket {self.path} is in use by a live daemon")

    def set_access(self, mode: int, group: str | None) -> None:
        """Apply a reloaded socket_mode / socket_group to the live socket; StartupError if not."""
        try:
            gid = grp.getgrnam(group).gr_gid if group else None
            os.chown(self.path, -1, os.getegid() if gid is None else gid)
            self.path.chmod(mode)
        except KeyError:
            raise StartupError(f"daemon.socket_group: no group named {group!r}") from None
        except OSError as exc:
            raise StartupError(f"cannot set access on {self.path}: {exc.strerror}") from None
        self._mode, self._group, self._gid = mode, group, gid

    def stop_accepting(self) -> None:
        self._accepting = False
        listener, self._listener = self._listener, None
        if listener is not None:
            asyncio.get_running_loop().remove_reader(listener)
            listener.close()

    async def close(self, grace: float) -> None:
        self.stop_accepting()
        if self._clients:
            _done, pending = await asyncio.wait(self._clients, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # -- admission -----------------------------------------------------------------------------

    def _on_readable(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if self._listener is None:
                return
            try:
                conn, _address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors or memory: stop listening for a moment, keep the backlog.
                self._log.error("cannot accept a client", reason=exc.strerror)
                loop = asyncio.get_running_loop()
                loop.remove_reader(self._listener)
                loop.call_later(ACCEPT_RETRY, self._resume, self._listener)
                return
            try:
                self._admit(conn)
            except Exception:
                # A bug in a check must not leak the descriptor nor stop the accept loop.
                self._log.exception("client admission failed")
                conn.close()

    def _resume(self, listener: socket.socket) -> None:
        if listener is self._listener:
            asyncio.get_running_loop().add_reader(listener, self._on_readable)

    def _admit(self, conn: socket.socket) -> None:
        try:
            peer = peer_of(conn)
        except OSError as exc:
            self._log.error("cannot read a client's credentials", reason=exc.strerror)
            self._refuse(conn, ("internal", "credentials", f"cannot read your credentials: {exc}"))
            return
        refusal = self._refusal(peer)
        if refusal is not None:
            self._refuse(conn, refusal, peer)
            return
        self._by_uid[peer.uid] = self._by_uid.get(peer.uid, 0) + 1
        task = asyncio.get_running_loop().create_task(self._serve(conn, peer))
        self._clients.add(task)
        # A done callback, not a finally: a task cancelled before it ran has no finally.
        task.add_done_callback(lambda done: self._release(done, peer.uid))

    def _release(self, task: asyncio.Task[None], uid: int) -> None:
        self._clients.discard(task)
        left = self._by_uid.pop(uid) - 1
        if left:
            self._by_uid[uid] = left

    def _privileged(self, uid: int) -> bool:
        return uid in (0, os.geteuid())

    def _refusal(self, peer: Peer) -> tuple[str, str, str] | None:
        """Why this peer may not connect now (code, which limit, message), or None."""
        limits = self.limits
        if len(self._clients) >= limits.clients:
            return (
                "unavailable",
                "clients",
                (
                    f"too many clients: {len(self._clients)} connected, the limit is "
                    f"{limits.clients} (RLIMIT_NOFILE {limits.nofile} minus {limits.reserved} "
                    "kept for the SSH lanes, the journal and metrics)"
                ),
            )
        if not self._allowed(peer):
            message = f"uid {peer.uid} is not root" + (
                f" nor in group {self._group}" if self._group else ""
            )
            if peer.groups is None and self._group:
                message += " (its supplementary groups could not be read)"
            return "permission_denied", "access", message
        if self._privileged(peer.uid):
            return None
        mine = self._by_uid.get(peer.uid, 0)
        if mine >= limits.per_uid:
            return (
                "unavailable",
                "per_uid",
                (
                    f"too many clients of uid {peer.uid}: it has {mine} connected, the limit per "
                    f"uid is {limits.per_uid}"
                ),
            )
        unprivileged = len(self._clients) - sum(
            self._by_uid.get(uid, 0) for uid in {0, os.geteuid()}
        )
        if unprivileged >= limits.clients - limits.kept:
            return (
                "unavailable",
                "kept",
                (
                    f"too many clients: {len(self._clients)} connected, the last {limits.kept} of "
                    f"{limits.clients} are kept for root and the daemon's own user"
                ),
            )
        return None

    def _refuse(
        self, conn: socket.socket, refusal: tuple[str, str, str], peer: Peer | None = None
    ) -> None:
        """One error line and close, at once: a refused client holds no slot, not even briefly."""
        code, limit, message = refusal
        try:
            # A fresh connection's send buffer is empty: one short line always fits.
            conn.send(reply_error(None, code, message), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError:
            pass
        finally:
            conn.close()
        # A flood is thousands of refusals: one line per limit every REFUSAL_LOG_EVERY seconds.
        now = time.monotonic()
        last, unlogged = self._refusals.get(limit, (-REFUSAL_LOG_EVERY, 0))
        if now - last >= REFUSAL_LOG_EVERY:
            self._log.warning(
                "peer refused",
                code=code,
                limit=limit,
                reason=message,
                uid=None if peer is None else peer.uid,
                pid=None if peer is None else peer.pid,
                unlogged=unlogged,
            )
            self._refusals[limit] = (now, 0)
        else:
            self._refusals[limit] = (last, unlogged + 1)

    def _allowed(self, peer: Peer) -> bool:
        if self._privileged(peer.uid):
            return True
        if self._gid is None:
            return False
        if peer.gid == self._gid or (peer.groups is not None and self._gid in peer.groups):
            return True
        try:
            return pwd.getpwuid(peer.uid).pw_name in grp.getgrgid(self._gid).gr_mem
        except KeyError:  # a uid without a name, or the group deleted since
            return False

    # -- conversation --------------------------------------------------------------------------

    async def _serve(self, conn: socket.socket, peer: Peer) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=MAX_REQUEST_BYTES)
            await self._conversation(reader, writer, peer)
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            self._log.exception("client handler failed")
        finally:
            if writer is None:
                conn.close()
            elif writer.transport.get_write_buffer_size():
                # Unsent replies (a client that does not read): close() would wait for them
                # forever, keeping the descriptor this slot was counted for.
                writer.transport.abort()
            else:
                writer.close()

    async def _conversation(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> None:
        while True:
            idle = self.idle_timeout
            try:
                async with asyncio.timeout(idle):
                    line = await reader.readuntil(b"\n")
            except TimeoutError:
                message = f"no complete request line within {idle:g} s (client_idle_timeout)"
                await self._send(writer, reply_error(None, "unavailable", message))
                return
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    await self._send(writer, reply_error(None, "bad_request", "no final newline"))
                return
            except asyncio.LimitOverrunError:
                await self._send(
                    writer,
                    reply_error(None, "too_large", f"request over {MAX_REQUEST_BYTES} bytes"),
                )
                return
            if not line.strip():
                continue
            await self._send(writer, await self._answer(line, peer))

    async def _answer(self, line: bytes, peer: Peer) -> bytes:
        try:
            request = decode(line)
            if not self._accepting:
                raise ProtocolError("unavailable", "the daemon is shutting down", request.id)
            self._log.debug("request", op=request.op, uid=peer.uid, pid=peer.pid)
            return reply_ok(request.id, await self._handler(request, peer))
        except ProtocolError as exc:
            return reply_error(exc.request_id, exc.code, exc.message, exc.vm)
        except Exception as exc:
            self._log.exception("request failed")
            return reply_error(None, "internal", f"{type(exc).__name__}: {exc}")

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()
