"""What each socket operation answers: daemon state and fencer results, shaped for the protocol."""

from __future__ import annotations

import os
import time
from typing import Any

from vmfenced import __version__
from vmfenced.errors import FenceFailed, UnknownVM
from vmfenced.fence import Fencer
from vmfenced.host import Host
from vmfenced.model import LinkState, VMMap, alias_of
from vmfenced.protocol import (
    FenceRequest,
    ListRequest,
    ProtocolError,
    Request,
    StatusRequest,
    VMStatusRequest,
)


class Api:
    def __init__(self, fencer: Fencer, hosts: dict[str, Host], vmmap: VMMap) -> None:
        self._fencer = fencer
        self._hosts = hosts
        self._map = vmmap
        self._started = time.monotonic()

    async def handle(self, request: Request) -> dict[str, Any]:
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
                case FenceRequest(vm=name, action=action):
                    result, joined = await self._fencer.fence(name, action)
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
                    return out
        except UnknownVM as exc:
            raise ProtocolError("unknown_vm", str(exc), request.id, vm=exc.vm) from None
        except FenceFailed as exc:
            where = f" (host {exc.host})" if exc.host else ""
            raise ProtocolError(
                "fence_failed", f"{exc.reason}{where}", request.id, vm=exc.vm
            ) from None
        raise ProtocolError("unknown_op", "unhandled op", request.id)  # pragma: no cover

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
        }

    def _vms(self) -> list[dict[str, Any]]:
        aliases = self._fencer.aliases
        out: list[dict[str, Any]] = []
        running: set[str] = set()
        for host_name, inv in self._map.hosts.items():
            up = self._hosts[host_name].state is LinkState.UP
            for vm in inv.running:
                running.add(vm.name)
                out.append(
                    {
                        "name": vm.name,
                        "alias": alias_of(vm.name, aliases),
                        "host": host_name,
                        "state": "on" if up else "unknown",
                        "cartel": vm.cartel,
                        "world": vm.world,
                        "uuid": vm.uuid,
                        "config_file": vm.config_file,
                    }
                )
        for host_name, inv in self._map.hosts.items():
            up = self._hosts[host_name].state is LinkState.UP
            for reg in inv.registered or ():
                if reg.name in running:
                    continue
                out.append(
                    {
                        "name": reg.name,
                        "alias": alias_of(reg.name, aliases),
                        "host": host_name,
                        "state": "off" if up else "unknown",
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
