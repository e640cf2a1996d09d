"""A warm vSphere API session (vCenter or a standalone ESXi host) and its live inventory map.

pyvmomi is blocking: every call runs in this session's own threads, bounded twice, by the
socket timeout pyvmomi applies to each request and by asyncio.wait_for around it. The session
is logged in once and kept; a call that finds it gone (NotAuthenticated: expired, or vCenter
restarted) marks it down, and the supervisor logs in again with a capped backoff, as an SSH
lane reconnects. State and reason read like a lane's (`vmfencectl status`).

The live map comes from a PropertyCollector of the session's own (CreatePropertyCollector), not
the session's default one: waiting on a task through the default collector takes its updates
(vcsim delivers them to the last waiter; docs/vsphere.md). WaitForUpdatesEx runs in a thread of
its own and hands each change to the event loop; there is no polling. Fences do not trust the
map alone: they read the VMs' properties afresh (`read`), as the SSH kinds list afresh.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

from vmfenced.config import HostConfig
from vmfenced.daemon.vsphere_calls import (
    SmartStubAdapter,
    SoapStubAdapter,
    apply_change,
    container_view,
    describe,
    filter_spec,
    power,
    quiet_disconnect,
    read_inventory,
    ssl_context,
    to_inventory,
    vim,
    vmodl,
)
from vmfenced.daemon.vsphere_views import Inventory
from vmfenced.errors import LinkDown, LinkError
from vmfenced.model import LinkState

T = TypeVar("T")

BACKOFF_FIRST = 0.2
BACKOFF_CAP = 10.0
# WaitForUpdatesEx returns at least this often with nothing new, so the watcher notices a
# close or a dead session within this (plus the call timeout).
WATCH_WAIT_S = 5
LOGIN_TIMEOUT = 10.0
CALL_TIMEOUT = 10.0

Listener = Callable[["VSphereSession"], None]


class SessionLost(LinkError):
    """vCenter no longer knows the session (NotAuthenticated): the supervisor logs in again."""


def read_password(path: Path) -> str:
    """The first line of the password file (no trailing newline); the password is never logged."""
    text = path.read_text(encoding="utf-8")
    return text.split("\n", 1)[0]


class VSphereSession:
    def __init__(
        self,
        config: HostConfig,
        password: str | Callable[[], str],
        *,
        on_change: Listener | None = None,
        call_timeout: float = CALL_TIMEOUT,
    ) -> None:
        self.config = config
        self.name = config.name
        self._password = password
        self._on_change = on_change
        self.call_timeout = call_timeout
        self.state = LinkState.CONNECTING
        self.since = time.time()
        self.reason: str | None = None
        self.inventory: Inventory | None = None
        self.map_at: float | None = None
        self.logins = 0
        self.watch_rounds = 0  # WaitForUpdatesEx calls answered (with news or none)
        self._si: Any = None
        self._content: Any = None
        self._view: Any = None
        self._lost = asyncio.Event()
        self._up = asyncio.Event()
        self._mapped = asyncio.Event()  # the first map arrived
        self._closing = threading.Event()
        # Calls and the watcher never share a thread: a WaitForUpdatesEx in flight must not
        # hold up a fence.
        self._calls = concurrent.futures.ThreadPoolExecutor(4, f"{self.name}-call")
        self._watch = concurrent.futures.ThreadPoolExecutor(1, f"{self.name}-watch")
        self._watcher: asyncio.Future[None] | None = None
        self._log = structlog.get_logger("vmfenced.vsphere").bind(host=self.name)

    # -- state ---------------------------------------------------------------------------------

    def _set(self, state: LinkState, reason: str | None) -> None:
        if state is not self.state or reason != self.reason:
            self.state, self.reason, self.since = state, reason, time.time()
            if self._on_change is not None:
                self._on_change(self)

    @property
    def warnings(self) -> list[str]:
        if not self.config.tls_verify:
            return ["tls_verify = false: any certificate is accepted (labs only)"]
        return []

    async def wait_mapped(self, timeout: float) -> bool:
        """True once the first map arrived (its hosts can be fenced), within `timeout`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._mapped.wait(), timeout)
        return self._mapped.is_set()

    async def wait_up(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout)
        return self._up.is_set()

    # -- the supervisor ------------------------------------------------------------------------

    async def supervise(self) -> None:
        """Log in, watch, and log in again whenever the session is lost, backing off."""
        backoff = BACKOFF_FIRST
        loop = asyncio.get_running_loop()
        while not self._closing.is_set():
            try:
                self._si, self._content, self._view = await asyncio.wait_for(
                    loop.run_in_executor(self._calls, self._login), LOGIN_TIMEOUT
                )
                self.logins += 1
                self._lost.clear()
                self._watcher = loop.run_in_executor(self._watch, self._watch_loop, loop)
                self._up.set()
                self._set(LinkState.UP, None)
                backoff = BACKOFF_FIRST
                lost: asyncio.Future[Any] = asyncio.ensure_future(self._lost.wait())
                watcher: asyncio.Future[Any] = self._watcher
                done, _ = await asyncio.wait({lost, watcher}, return_when=asyncio.FIRST_COMPLETED)
                lost.cancel()
                if self._closing.is_set():
                    return
                reason = "session lost"
                if self._watcher in done and self._watcher.exception() is not None:
                    reason = f"update watcher: {describe(self._watcher.exception())}"
                self._drop(reason)
            except TimeoutError:
                self._drop(f"login took more than {LOGIN_TIMEOUT} s")
            except Exception as exc:  # any failure to log in is a reason, shown as such
                self._drop(f"login failed: {describe(exc)}")
            if self._closing.is_set():
                return
            await asyncio.sleep(backoff)  # the reconnect backoff, not a synchronisation
            backoff = min(BACKOFF_CAP, backoff * 2)

    def _drop(self, reason: str) -> None:
        self._up.clear()
        si, self._si = self._si, None
        if si is not None:
            # Ends the watcher's WaitForUpdatesEx too (its requests fail on a closed session).
            self._calls.submit(quiet_disconnect, si)
        self._set(LinkState.DOWN, reason)
        self._log.warning("vsphere session down", reason=reason)

    def _login(self) -> tuple[Any, Any, Any]:
        """The stub first, then Login: a refused login must not leave its socket open
        (SmartConnect gives no way to close what it opened when Login fails)."""
        stub = SmartStubAdapter(
            host=self.config.address,
            port=self.config.port,
            sslContext=ssl_context(self.config),
            httpConnectionTimeout=self.call_timeout,
            connectionPoolTimeout=-1,
        )
        try:
            si = vim.ServiceInstance("ServiceInstance", stub)
            content = si.RetrieveContent()
            # A password file is read again at every login: a rotated password reaches the
            # next re-login without a restart (the session in use stays valid meanwhile).
            password = self._password() if callable(self._password) else self._password
            content.sessionManager.Login(self.config.username, password)
            # Kept for the session's life: a fresh read is then one round trip, not three.
            view = container_view(content, self.config.datacenter)
        except BaseException:
            stub.DropConnections()
            raise
        return si, content, view

    async def close(self) -> None:
        self._closing.set()
        self._up.clear()
        si, self._si = self._si, None
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            if si is not None:
                await asyncio.wait_for(
                    loop.run_in_executor(self._calls, quiet_disconnect, si), self.call_timeout
                )
            if self._watcher is not None:
                # Its WaitForUpdatesEx ends with the session (at most WATCH_WAIT_S later).
                await asyncio.wait_for(asyncio.shield(self._watcher), self.call_timeout)
        self._set(LinkState.DOWN, "closed")
        self._calls.shutdown(wait=False, cancel_futures=True)
        self._watch.shutdown(wait=False, cancel_futures=True)

    # -- calls ---------------------------------------------------------------------------------

    async def call(self, what: str, function: Callable[..., T], *args: Any) -> T:
        """`function(si, *args)` in a call thread, bounded; NotAuthenticated marks the session
        lost (the supervisor logs in again) and fails this call: nothing is retried blindly."""
        si = self._si
        if si is None or not self._up.is_set():
            raise LinkDown(self.name, "api", f"{what}: not logged in ({self.reason})")
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._calls, function, si, *args), self.call_timeout
            )
        except vim.fault.NotAuthenticated:
            self._lost.set()
            raise SessionLost(self.name, "api", f"{what}: session lost") from None
        except vmodl.fault.ManagedObjectNotFound as exc:
            if self._view is not None and getattr(exc.obj, "_moId", None) == self._view._moId:
                # The session's own view is gone: so is the session (vcsim deletes a
                # terminated session's objects before it answers NotAuthenticated).
                self._lost.set()
                raise SessionLost(self.name, "api", f"{what}: session lost") from None
            raise LinkError(self.name, "api", f"{what}: {describe(exc)}") from None
        except TimeoutError:
            raise LinkError(
                self.name, "api", f"{what}: no answer in {self.call_timeout} s"
            ) from None
        except LinkError:
            raise
        except Exception as exc:
            # A fault, a socket error, and anything else pyvmomi lets through (an
            # http.client.HTTPException, a malformed answer): a clean failure of this call,
            # never a crash of the request.
            raise LinkError(self.name, "api", f"{what}: {describe(exc)}") from None

    async def read(self) -> Inventory:
        """A fresh read of every VM's and host's properties (one RetrievePropertiesEx)."""
        return await self.call("inventory read", read_inventory, self._content, self._view)

    async def power_off(self, moref: str, instance_uuid: str) -> str | None:
        """PowerOffVM_Task on `moref` if it still is that VM; then a fresh read of its power
        state (None: unreadable). InvalidPowerState (already off) is not an error: the read
        tells."""
        return await self.call(
            "power off", power, moref, instance_uuid, "PowerOffVM_Task", self.call_timeout
        )

    async def power_on(self, moref: str, instance_uuid: str) -> str | None:
        return await self.call(
            "power on", power, moref, instance_uuid, "PowerOnVM_Task", self.call_timeout
        )

    # -- the watcher (its own thread) ----------------------------------------------------------

    def _watch_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        si = self._si
        if si is None:
            return
        # The session's own stub times out each request after call_timeout: a quiet
        # WaitForUpdatesEx lasts WATCH_WAIT_S, so with a short fence_timeout it would time out
        # and the session log in again and again. The watcher's stub shares the session (its
        # cookie) with a timeout above the wait.
        stub = SoapStubAdapter(
            host=self.config.address,
            port=self.config.port,
            version=si._stub.version,
            sslContext=ssl_context(self.config),
            httpConnectionTimeout=WATCH_WAIT_S + self.call_timeout,
            connectionPoolTimeout=-1,
        )
        stub.cookie = si._stub.cookie
        try:
            self._watch_with(loop, si, vim.ServiceInstance("ServiceInstance", stub))
        finally:
            stub.DropConnections()

    def _watch_with(self, loop: asyncio.AbstractEventLoop, si: Any, watch_si: Any) -> None:
        content = watch_si.RetrieveContent()
        collector = content.propertyCollector.CreatePropertyCollector()
        view = container_view(content, self.config.datacenter)
        collector.CreateFilter(filter_spec(view), partialUpdates=True)
        vms: dict[str, dict[str, Any]] = {}
        hosts: dict[str, dict[str, Any]] = {}
        version = ""
        options = vmodl.query.PropertyCollector.WaitOptions(maxWaitSeconds=WATCH_WAIT_S)
        try:
            while not self._closing.is_set() and self._si is si:
                update = collector.WaitForUpdatesEx(version, options)
                self.watch_rounds += 1
                if update is None:
                    continue
                version = update.version
                for filter_update in update.filterSet:
                    for change in filter_update.objectSet:
                        apply_change(change, vms, hosts)
                inventory = to_inventory(vms, hosts)
                loop.call_soon_threadsafe(self._publish, inventory)
        finally:
            if self._si is si:
                with contextlib.suppress(Exception):
                    collector.Destroy()

    def _publish(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self.map_at = time.time()
        self._mapped.set()
        if self._on_change is not None:
            self._on_change(self)

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "address": self.config.address,
            "port": self.config.port,
            "kind": self.config.kind,
            "state": self.state.value,
            "since": self.since,
            "reason": self.reason,
            "warnings": self.warnings,
            "logins": self.logins,
            "map_age_s": None if self.map_at is None else round(time.time() - self.map_at, 3),
            "vm_count": None if self.inventory is None else len(self.inventory.vms),
        }
