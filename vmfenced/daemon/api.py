"""What each socket operation answers: daemon state and fencer results, shaped for the protocol."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Protocol

from vmfenced import __version__
from vmfenced.daemon.fence import Fencer, FenceResult
from vmfenced.daemon.host import Host
from vmfenced.daemon.journal import FenceEntry
from vmfenced.daemon.server import Peer
from vmfenced.errors import ConfigError, FenceFailed, UnknownVM
from vmfenced.model import LinkState, VMMap, alias_of
from vmfenced.protocol import (
    FenceRequest,
    HistoryRequest,
    ListRequest,
    MetricsRequest,
    ProtocolError,
    ReloadRequest,
    Request,
    StatusRequest,
    VMStatusRequest,
)

# The state of a VM whose host does not answer: no fence of it can be confirmed.
UNCONFIRMABLE = "unconfirmable"


class DaemonOps(Protocol):
    """What the daemon provides beyond the fencer: reload, the journal, the metrics."""

    async def reload(self) -> dict[str, Any]:
        """Apply the config file again; raise ConfigError (nothing changed) if it cannot."""
        ...

    async def history(self, vm: str | None, since: float | None, limit: int) -> dict[str, Any]: ...

    def metrics_text(self) -> str: ...

    async def record(self, entry: FenceEntry) -> str | None:
        """Make the fence record durable before the reply goes out, within a bounded wait;
        never raises. None when it is on disk, else the warning the reply carries."""
        ...

    def record_nowait(self, entry: FenceEntry) -> None: ...


class Api:
    def __init__(
        self,
        fencer: Fencer,
        hosts: dict[str, Host],
        vmmap: VMMap,
        ops: DaemonOps | None = None,
    ) -> None:
        self._fencer = fencer
        self._hosts = hosts
        self._map = vmmap
        self._ops = ops
        self._started = time.monotonic()

    async def handle(self, request: Request, peer: Peer | None = None) -> dict[str, Any]:
        try:
            match request:
                case StatusRequest():
                    return self.status()
                case ListRequest():
                    return {"vms": [_short(vm) for vm in self._vms()]}
                case VMStatusRequest(vm=name):
                    state = await self._fencer.vm_status(name)
                    return {
                        "vm": state.vm,
                        "state": state.state,
                        "host": state.host,
                        "cartel": state.cartel,
                    }
                case FenceRequest():
                    return await self._fence(request, peer)
                case ReloadRequest():
                    try:
                        return await self._need_ops(request).reload()
                    except ConfigError as exc:
                        raise ProtocolError(
                            "reload_failed", f"configuration NOT changed: {exc}", request.id
                        ) from None
                case HistoryRequest(vm=vm, since=since, limit=limit):
                    return await self._need_ops(request).history(vm, since, limit)
                case MetricsRequest():
                    return {"text": self._need_ops(request).metrics_text()}
        except UnknownVM as exc:
            raise ProtocolError("unknown_vm", str(exc), request.id, vm=exc.vm) from None
        except FenceFailed as exc:
            where = f" (host {exc.host})" if exc.host else ""
            raise ProtocolError(
                "fence_failed", f"{exc.reason}{where}", request.id, vm=exc.vm
            ) from None
        raise ProtocolError("unknown_op", "unhandled op", request.id)  # pragma: no cover

    def _need_ops(self, request: Request) -> DaemonOps:
        if self._ops is None:
            raise ProtocolError("unavailable", f"{request.op} is not available here", request.id)
        return self._ops

    async def _fence(self, request: FenceRequest, peer: Peer | None) -> dict[str, Any]:
        """Fence, then journal the outcome (whatever it is) before the reply goes out."""
        arrived, start = time.time(), time.perf_counter()
        entry = _Entry(request, peer, arrived, self._fencer.target(request.vm))
        try:
            result, joined = await self._fencer.fence(request.vm, request.action)
        except asyncio.CancelledError:
            # Shutdown gave up on it: still on record, without holding the cancellation up.
            if self._ops is not None:
                self._ops.record_nowait(entry.failed("cancelled", "daemon shutting down", start))
            raise
        except UnknownVM as exc:
            await self._record(entry.failed("unknown_vm", str(exc), start))
            raise
        except FenceFailed as exc:
            await self._record(entry.failed("failed", exc.reason, start, exc.host))
            raise
        except Exception as exc:
            await self._record(entry.failed("error", f"{type(exc).__name__}: {exc}", start))
            raise
        journal_warning = await self._record(entry.done(result, joined, start))
        out: dict[str, Any] = {
            "vm": result.vm,
            "action": result.action,
            "outcome": result.outcome,
            "host": result.host,
            "cartel": result.cartel,
            "elapsed_ms": result.elapsed_ms,
            "joined": joined,
        }
        if result.warning:
            out["warning"] = result.warning
        if result.ha is not None:
            out["ha"] = result.ha
        if journal_warning:
            # The fence happened: a record the disk refused is said, never a failure.
            out["journal_warning"] = journal_warning
        return out

    async def _record(self, entry: FenceEntry) -> str | None:
        return None if self._ops is None else await self._ops.record(entry)

    def status(self) -> dict[str, Any]:
        hosts = []
        for name, host in self._hosts.items():
            inv = self._map.hosts.get(name)
            hosts.append(host.snapshot(inv.at if inv else None, len(inv.running) if inv else 0))
        return {
            "daemon": {
                "version": __version__,
                "pid": os.getpid(),
                "uptime_s": round(time.monotonic() - self._started, 3),
            },
            "hosts": hosts,
            "vms": self._vms(),
            "missing_nodes": self._missing_nodes(),
        }

    def _nodes(self) -> dict[str, str]:
        """Proxmox node -> the configured host that is that node."""
        return {h.config.node: n for n, h in self._hosts.items() if h.config.node is not None}

    def _missing_nodes(self) -> list[dict[str, Any]]:
        """Proxmox nodes that own VMs but are not configured: those VMs may run there unseen,
        so no fence of them can succeed (docs/proxmox.md)."""
        nodes = self._nodes()
        owned: dict[str, set[str]] = {}
        for inv in self._map.hosts.values():
            for reg in inv.registered or ():
                if reg.owner is not None and reg.owner not in nodes:
                    owned.setdefault(reg.owner, set()).add(reg.vmid)
        return [{"node": n, "vms": sorted(v, key=int)} for n, v in sorted(owned.items())]

    def _vms(self) -> list[dict[str, Any]]:
        """The map, not a live answer (that is vm_status). A VM whose latest listing placed it
        on a host that does not answer now is "unconfirmable": fencing it fails until the host
        answers. A VM is "off" here only while every configured host is up and listed, none
        running it (the map's form of the evidence `off` needs)."""
        aliases = self._fencer.aliases
        out: list[dict[str, Any]] = []
        running: set[str] = set()
        everyone = all(_up(h) and name in self._map.hosts for name, h in self._hosts.items())
        for host_name, inv in self._map.hosts.items():
            up = _up(self._hosts.get(host_name))
            for vm in inv.running:
                running.add(vm.name)
                out.append(
                    {
                        "name": vm.name,
                        "alias": alias_of(vm.name, aliases),
                        "host": host_name,
                        "state": "on" if up else UNCONFIRMABLE,
                        "cartel": vm.cartel,
                        "world": vm.world,
                        "uuid": vm.uuid,
                        "config_file": vm.config_file,
                    }
                )
        nodes = self._nodes()
        # Every Proxmox node lists the whole cluster's VMs: each is shown once, at its owner.
        shown: set[tuple[str, str]] = set()
        for host_name, inv in self._map.hosts.items():
            up = _up(self._hosts.get(host_name))
            for reg in inv.registered or ():
                if reg.name in running:
                    continue
                where, off = host_name, up and everyone
                if reg.owner is not None:
                    if (reg.owner, reg.vmid) in shown:
                        continue
                    shown.add((reg.owner, reg.vmid))
                    where, off = nodes.get(reg.owner, reg.owner), everyone and reg.owner in nodes
                out.append(
                    {
                        "name": reg.name,
                        "alias": alias_of(reg.name, aliases),
                        "host": where,
                        "state": "off" if off else "unknown",
                        "cartel": None,
                        "world": None,
                        "uuid": None,
                        "config_file": reg.config_file,
                    }
                )
        out.sort(key=lambda vm: (vm["name"], vm["host"]))
        return out


def _short(vm: dict[str, Any]) -> dict[str, Any]:
    return {k: vm[k] for k in ("name", "alias", "host", "state")}


def _up(host: Host | None) -> bool:
    # None: a host a reload is removing; its VMs are "unknown" from now on.
    return host is not None and host.state is LinkState.UP


class _Entry:
    """The parts of a journal record known when the request arrives."""

    def __init__(self, request: FenceRequest, peer: Peer | None, arrived: float, target: str):
        self._request = request
        self._peer = peer
        self._arrived = arrived
        self._target = target

    def _base(self, start: float) -> dict[str, Any]:
        request, peer = self._request, self._peer
        return {
            "t": self._arrived,
            "peer_uid": None if peer is None else peer.uid,
            "peer_pid": None if peer is None else peer.pid,
            "request_id": request.id,
            "vm": request.vm,
            "target": self._target,
            "action": request.action,
            "total_ms": round((time.perf_counter() - start) * 1000, 3),
        }

    def failed(self, result: str, reason: str, start: float, host: str | None = None) -> FenceEntry:
        return FenceEntry(**self._base(start), result=result, ok=False, host=host, reason=reason)

    def done(self, result: FenceResult, joined: bool, start: float) -> FenceEntry:
        return FenceEntry(
            **self._base(start),
            result=result.outcome,
            ok=True,
            host=result.host,
            cartel=result.cartel,
            reason=result.warning,
            ha=result.ha,
            joined=joined,
            elapsed_ms=result.elapsed_ms,
        )
