"""A hypervisor host: its two lanes (fence, inventory) and the backend's commands run over them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import asyncssh
import structlog

from vmfenced.backends import Arg, Backend, ShFunction
from vmfenced.backends import helper as host_helper
from vmfenced.backends.helper import LISTING_MARK
from vmfenced.config import HostConfig, SSHConfig
from vmfenced.daemon.knownhosts import KnownHosts
from vmfenced.daemon.link import Lane
from vmfenced.errors import LinkError, ListingDoubt, ParseError
from vmfenced.model import KillOutcome, LinkState, RegisteredVM, RunningVM

# The inventory lane's keepalive interval, in fence-lane intervals (2 s at the defaults).
INVENTORY_KEEPALIVE_FACTOR = 4

HostListener = Callable[["Host", Lane], None]
Spawn = Callable[[Coroutine[Any, Any, None], str], object]


class Host:
    """Two connections per host so a fence never queues behind a slow inventory listing."""

    def __init__(
        self,
        config: HostConfig,
        ssh: SSHConfig,
        backend: Backend,
        client_keys: list[asyncssh.SSHKey],
        on_change: HostListener,
        *,
        known_hosts: KnownHosts | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.backend = backend
        self.rtt: float | None = None
        # Why the latest process listing failed on a host that answers (an unreadable name, a
        # process that cannot be judged): fences that need this host fail until it clears.
        self.listing_problem: str | None = None
        self.mode = ssh.mode
        helper = None
        if ssh.mode == "helper":
            helper = host_helper.spec(backend, config.libvirt_uri, config.node)

        def listener(lane: Lane) -> None:
            on_change(self, lane)

        lane_args: dict[str, Any] = {
            "setup": backend.session_setup(config),
            "client_keys": client_keys,
            "on_change": listener,
            "known_hosts": known_hosts,
            "helper": helper,
        }
        self.fence = Lane(config, ssh, "fence", **lane_args)
        # The host's state is its fence lane's: only that lane must notice a hung host within
        # seconds. Keepalives are most of the daemon's CPU at rest (two per host per interval).
        self.inventory = Lane(
            config, ssh, "inventory", keepalive_factor=INVENTORY_KEEPALIVE_FACTOR, **lane_args
        )
        self._log = structlog.get_logger("vmfenced.host").bind(host=self.name)

    @property
    def state(self) -> LinkState:
        return self.fence.state

    def start(self, spawn: Spawn) -> None:
        spawn(self.fence.supervise(), f"{self.name}-fence")
        spawn(self.inventory.supervise(), f"{self.name}-inventory")

    async def close(self) -> None:
        await asyncio.gather(self.fence.close(), self.inventory.close())

    async def probe(self, timeout: float) -> float:
        """Round trip of a no-op over the warm fence shell."""
        result = await self.fence.run(":" if self.mode == "shell" else "ping", timeout)
        self.rtt = result.elapsed
        return result.elapsed

    async def list_running(self, lane: Lane, timeout: float) -> tuple[RunningVM, ...]:
        """The fastest listing that works; a listing we cannot read is never taken as empty."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        failures = []
        for number, listing in enumerate(self.backend.listings, 1):
            command = listing.command if self.mode == "shell" else f"list {number}"
            result = await lane.run(command, deadline - loop.time())
            if result.status != 0:
                # The scripts say why on their last lines (`vmf:doubt ...`); their text is long.
                failures.append(f"listing {number} exited {result.status}: {_tail(result)}")
                continue
            try:
                running = listing.parse(result.output)
            except ParseError as exc:
                failures.append(str(exc))
                continue
            self.listing_problem = None
            return running
        self._log.warning("no listing worked", failures=failures)
        reason = "cannot list running VMs: " + "; ".join(failures)
        self.listing_problem = reason
        raise ListingDoubt(self.name, lane.name, reason)

    async def list_registered(
        self, timeout: float, *, urgent: bool = False
    ) -> tuple[RegisteredVM, ...]:
        """`urgent`: a request waits for it (an `off` by absence, `status`, `on`). If the
        inventory lane is busy (a registration listing through hostd can take seconds), the
        fence lane runs it instead of making the request wait for two."""
        command = self._command(self.backend.registered, (), "registered")
        lane = self.inventory
        if urgent and lane.busy and not self.fence.busy and self.fence.state is LinkState.UP:
            lane = self.fence
        result = await lane.run(command, timeout)
        if result.status != 0:
            raise LinkError(
                self.name, lane.name, f"{command!r} exited {result.status}: {_tail(result)}"
            )
        try:
            return self.backend.parse_registered(result.output)
        except ParseError as exc:
            raise LinkError(self.name, lane.name, str(exc)) from None

    async def guarded_kill(self, vm: RunningVM, timeout: float) -> KillOutcome:
        # The host-side wait gets most of the budget; the rest covers the round trip.
        args = self.backend.kill_args(vm, max(0.05, timeout * 0.8))
        result = await self.fence.run(self._command(self.backend.kill, args, "kill"), timeout)
        try:
            return self.backend.parse_kill(result.output)
        except ParseError as exc:
            raise LinkError(self.name, "fence", f"guarded kill: {exc.reason}") from None

    async def kill_and_list(
        self, vm: RunningVM, timeout: float
    ) -> tuple[KillOutcome, tuple[RunningVM, ...] | None]:
        """The guarded kill, then the fast listing, in one round trip: confirming that no other
        instance of the VM runs on this host costs no second exchange. The listing is None when
        it failed or could not be read (the caller lists again, with every fallback)."""
        listing = self.backend.listings[0]
        args = self.backend.kill_args(vm, max(0.05, timeout * 0.8))
        if self.mode == "helper":
            command = host_helper.request("kill-list", self.backend.kill, args)
        else:
            command = self.backend.kill.call(*args) + f"\necho {LISTING_MARK}\n" + listing.command
        result = await self.fence.run(command, timeout)
        lines = result.output.split("\n")
        # The kill part's output is ours (markers, awk's errors); the first mark ends it.
        if LISTING_MARK not in lines:
            raise LinkError(self.name, "fence", f"guarded kill: no answer: {_tail(result)}")
        at = lines.index(LISTING_MARK)
        try:
            outcome = self.backend.parse_kill("\n".join(lines[:at]))
        except ParseError as exc:
            raise LinkError(self.name, "fence", f"guarded kill: {exc.reason}") from None
        if result.status != 0:
            return outcome, None
        try:
            return outcome, listing.parse("\n".join(lines[at + 1 :]))
        except ParseError as exc:
            self._log.warning("listing after the kill not readable", reason=exc.reason)
            return outcome, None

    async def power_on(self, vm: RegisteredVM) -> None:
        args = self.backend.power_on_args(vm)
        command = self._command(self.backend.power_on, args, "on")
        result = await self.inventory.run(command, self.backend.power_on_timeout)
        if result.status != 0:
            raise LinkError(self.name, "inventory", f"power-on failed: {_tail(result)}")

    async def hold_off(self, vmid: str, timeout: float) -> str:
        """The HA hold-off's answer (Proxmox), after a confirmed kill, over the inventory lane:
        ha-manager may hang for its whole bound while the cluster has no quorum, and on the
        fence lane it would delay every other fence that needs this node's listing (a timeout
        there also resets the fence lane)."""
        if self.backend.hold_off is None:
            raise LinkError(
                self.name, "inventory", f"{self.backend.kind} hosts have no HA hold-off"
            )
        command = self._command(self.backend.hold_off, (vmid,), "hold-off")
        return str((await self.inventory.run(command, timeout)).output)

    def _command(self, function: ShFunction, args: tuple[Arg, ...], verb: str) -> str:
        """Shell text for a shell lane, or the same operation as a helper request."""
        if self.mode == "shell":
            return function.call(*args)
        return host_helper.request(verb, function, args)

    def snapshot(self, inventory_at: float | None, vm_count: int) -> dict[str, Any]:
        fence = self.fence
        return {
            "name": self.name,
            "address": self.config.address,
            "port": self.config.port,
            "kind": self.config.kind,
            "state": fence.state.value,
            "since": fence.since,
            "reason": fence.reason,
            "listing_problem": self.listing_problem,
            "lanes": {"fence": fence.state.value, "inventory": self.inventory.state.value},
            # Which of the host's addresses each lane reaches now (None while not connected).
            "connected_address": {
                "fence": fence.connected_address,
                "inventory": self.inventory.connected_address,
            },
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "inventory_age_s": None
            if inventory_at is None
            else round(max(0.0, time.time() - inventory_at), 3),
            "vm_count": vm_count,
            # "shell" or "helper"; the helper version the fence lane checked (helper mode, up).
            "mode": self.mode,
            "helper_version": fence.helper_version,
        }


def _tail(result: Any) -> str:
    text = " ".join(str(result.output).split())
    return text[-300:] if text else f"exit status {result.status}"
