"""The unix socket: who may connect, one JSON line in, one JSON line out, never a crash."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from vmfenced.errors import StartupError
from vmfenced.protocol import MAX_REQUEST, ProtocolError, Request, decode, reply_error, reply_ok

Handler = Callable[[Request, "Peer"], Awaitable[dict[str, Any]]]
# A client that does not read its replies must not pin a connection forever.
WRITE_TIMEOUT = 10.0
MAX_CLIENTS = 1024


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return Peer(pid, uid, gid)


def _supplementary_groups(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


class SocketServer:
    def __init__(self, path: Path, mode: int, group: str | None, handler: Handler) -> None:
        self.path = path
        self._mode = mode
        self._group = group
        self._gid = grp.getgrnam(group).gr_gid if group else None
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._accepting = True
        self._log = structlog.get_logger("vmfenced.server")

    async def start(self) -> None:
        await self._refuse_if_live()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StartupError(f"cannot remove stale socket {self.path}: {exc.strerror}") from None
        old_umask = os.umask(0o177)  # never a window where the socket is world-connectable
        try:
            # A deep backlog: a burst of clients (every node's agent at once) queues, not fails.
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST, backlog=MAX_CLIENTS
            )
        except OSError as exc:
            raise StartupError(f"cannot listen on {self.path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        if self._gid is not None:
            os.chown(self.path, -1, self._gid)
        self.path.chmod(self._mode)

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
        if self._server is not None:
            self._server.close()

    async def close(self, grace: float) -> None:
        self.stop_accepting()
        if self._clients:
            _done, pending = await asyncio.wait(self._clients, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _allowed(self, peer: Peer) -> bool:
        if peer.uid in (0, os.geteuid()):
            return True
        if self._gid is None:
            return False
        if peer.gid == self._gid or self._gid in _supplementary_groups(peer.pid):
            return True
        try:
            name = pwd.getpwuid(peer.uid).pw_name
        except KeyError:
            return False
        return name in grp.getgrgid(self._gid).gr_mem

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            await self._conversation(reader, writer)
        except (ConnectionError, TimeoutError):
            pass
        except Exception:
            self._log.exception("client handler failed")
        finally:
            self._clients.discard(task)
            writer.close()

    async def _conversation(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        sock = writer.get_extra_info("socket")
        peer = peer_of(sock)
        if len(self._clients) > MAX_CLIENTS:
            await self._send(writer, reply_error(None, "unavailable", "too many clients"))
            return
        if not self._allowed(peer):
            self._log.warning("peer refused", uid=peer.uid, pid=peer.pid)
            message = f"uid {peer.uid} is not root" + (
                f" nor in group {self._group}" if self._group else ""
            )
            await self._send(writer, reply_error(None, "permission_denied", message))
            return
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    await self._send(writer, reply_error(None, "bad_request", "no final newline"))
                return
            except asyncio.LimitOverrunError:
                await self._send(
                    writer,
                    reply_error(None, "too_large", f"request over {MAX_REQUEST} bytes"),
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
