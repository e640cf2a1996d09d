"""Fresh answers from the hosts, shared between the requests that need them.

A decision needs listings taken *after* its request arrived: an older one may predate a
migration or an HA restart. Many requests at once (every node fencing, a burst of status
checks) must not each list every host, so each host has one listing in flight at a time: a
request joins the one in flight if it started after the request did, otherwise waits for it
to end and joins (or starts) the next. A burst of N requests costs each host about two
listings, not N.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Generic, TypeVar

from vmfenced.daemon.host import Host
from vmfenced.daemon.verdict import HostView
from vmfenced.errors import LinkError, ListingDoubt
from vmfenced.model import RegisteredVM, RunningVM, VMMap

T = TypeVar("T")


class Coalesced(Generic[T]):
    """One host's answers of one kind: at most one query in flight, shared by every waiter
    whose `since` is not later than the query's start."""

    def __init__(self, run: Callable[[], Awaitable[T]]) -> None:
        self._run = run
        self._task: asyncio.Task[T] | None = None
        self._started = -math.inf

    async def get(self, since: float) -> T:
        while True:
            task = self._task
            if task is not None and self._started >= since:
                return await asyncio.shield(task)
            if task is not None and not task.done():
                # Started before this request: its answer may predate what we must see.
                await asyncio.wait([task])
                continue
            self._started = time.monotonic()
            self._task = asyncio.create_task(self._call())
            self._task.add_done_callback(_retrieve)

    async def _call(self) -> T:
        return await self._run()


def _retrieve(task: asyncio.Task[T]) -> None:
    # A query whose waiters all went away (timeout) must not log "exception never retrieved".
    if not task.cancelled():
        task.exception()


class Evidence:
    """Fresh process and registration listings of the configured hosts, written to the map."""

    def __init__(self, hosts: dict[str, Host], vmmap: VMMap, timeout: Callable[[], float]):
        self._hosts = hosts
        self._map = vmmap
        self._timeout = timeout
        self._listings: dict[str, tuple[Host, Coalesced[tuple[RunningVM, ...]]]] = {}
        self._registrations: dict[str, tuple[Host, Coalesced[tuple[RegisteredVM, ...]]]] = {}
        # Every name any host ever listed or registered: "known", for the unknown_vm answer.
        self.seen: set[str] = set()

    def views(self, vm: str) -> dict[str, HostView]:
        """One view per configured host, holding the map's belief (its latest listing)."""
        views = {}
        for name, host in self._hosts.items():
            inv = self._map.hosts.get(name)
            latest = None if inv is None else tuple(v for v in inv.running if v.answers_to(vm))
            if host.listing_problem is not None:
                # Its latest listing attempt could not be read: what it ran before that is no
                # belief to kill on (it runs on meanwhile).
                latest = None
            views[name] = HostView(name, latest=latest, node=host.config.node)
        return views

    def _listing(self, name: str) -> Coalesced[tuple[RunningVM, ...]]:
        host = self._hosts[name]
        entry = self._listings.get(name)
        if entry is None or entry[0] is not host:  # a reload replaced the host
            entry = (host, Coalesced(lambda: self._list(host)))
            self._listings[name] = entry
        return entry[1]

    def _registration(self, name: str) -> Coalesced[tuple[RegisteredVM, ...]]:
        host = self._hosts[name]
        entry = self._registrations.get(name)
        if entry is None or entry[0] is not host:
            entry = (host, Coalesced(lambda: self._list_registered(host)))
            self._registrations[name] = entry
        return entry[1]

    async def _list(self, host: Host) -> tuple[RunningVM, ...]:
        started = time.time()
        listing = await host.list_running(host.fence, self._timeout())
        self.record(host, listing, started)
        return listing

    def record(self, host: Host, listing: tuple[RunningVM, ...], at: float) -> None:
        if self._hosts.get(host.name) is host:
            self._map.update_running(host.name, listing, at)
        self.seen.update(v.name for v in listing)
        self.seen.update(v.vmid for v in listing if v.vmid is not None)

    async def _list_registered(self, host: Host) -> tuple[RegisteredVM, ...]:
        registered = await host.list_registered(self._timeout(), urgent=True)
        if self._hosts.get(host.name) is host:
            self._map.update_registered(host.name, registered)
        self.seen.update(r.name for r in registered)
        self.seen.update(r.vmid for r in registered if r.owner is not None)
        return registered

    async def list(
        self, vm: str, views: dict[str, HostView], names: tuple[str, ...], since: dict[str, float]
    ) -> None:
        """Fill `views[name].fresh` (or `.problem`) for each of `names`, all hosts at once."""
        answers = await _ask(names, lambda n: self._listing(n).get(since[n]), self._hosts)
        doubts = tuple(n for n, a in answers.items() if isinstance(a, ListingDoubt))
        if doubts:
            # Once more, from now: a process caught exiting is a doubt only for a moment.
            now = time.monotonic()
            answers.update(await _ask(doubts, lambda n: self._listing(n).get(now), self._hosts))
        for name, answer in answers.items():
            if isinstance(answer, LinkError):
                doubt = isinstance(answer, ListingDoubt)
                views[name] = replace(views[name], fresh=None, problem=answer.reason, doubt=doubt)
            elif isinstance(answer, str):
                views[name] = replace(views[name], fresh=None, problem=answer)
            else:
                mine = tuple(v for v in answer if v.answers_to(vm))
                views[name] = replace(views[name], fresh=mine, problem=None)

    async def registrations(
        self, vm: str, views: dict[str, HostView], names: tuple[str, ...], since: float
    ) -> None:
        """Fill `views[name].registered` (or `.reg_problem`) for each of `names`."""
        answers = await _ask(names, lambda n: self._registration(n).get(since), self._hosts)
        for name, answer in answers.items():
            if isinstance(answer, LinkError):
                views[name] = replace(views[name], registered=None, reg_problem=answer.reason)
            elif isinstance(answer, str):
                views[name] = replace(views[name], registered=None, reg_problem=answer)
            else:
                mine = tuple(r for r in answer if r.answers_to(vm))
                views[name] = replace(views[name], registered=mine, reg_problem=None)


async def _ask(
    names: tuple[str, ...], query: Callable[[str], Awaitable[T]], hosts: dict[str, Host]
) -> dict[str, T | str | LinkError]:
    """Every host's answer at once: the value, a LinkError, or why there is none."""
    asked = [n for n in names if n in hosts]
    answers = await asyncio.gather(*(query(n) for n in asked), return_exceptions=True)
    out: dict[str, T | str | LinkError] = {
        n: "no longer configured" for n in names if n not in hosts
    }
    for name, answer in zip(asked, answers, strict=True):
        if isinstance(answer, LinkError):
            out[name] = answer
        elif isinstance(answer, BaseException):
            raise answer
        else:
            out[name] = answer
    return out
