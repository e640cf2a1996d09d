"""Fresh answers shared between requests: one query in flight per host, never an older one."""

from __future__ import annotations

import asyncio
import time

import pytest

from vmfenced.daemon.evidence import Coalesced


class Counter:
    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def __call__(self) -> int:
        self.calls += 1
        await self.release.wait()
        return self.calls


@pytest.mark.asyncio
async def test_requests_at_once_share_one_query() -> None:
    run = Counter()
    shared = Coalesced(run)
    since = time.monotonic()
    waiters = [asyncio.create_task(shared.get(since)) for _ in range(20)]
    await asyncio.sleep(0)  # let every waiter reach the query (scheduling, not timing)
    run.release.set()
    assert await asyncio.gather(*waiters) == [1] * 20
    assert run.calls == 1


@pytest.mark.asyncio
async def test_a_query_older_than_the_request_is_never_its_answer() -> None:
    run = Counter()
    shared = Coalesced(run)
    first = asyncio.create_task(shared.get(time.monotonic()))
    await asyncio.sleep(0)
    later = asyncio.create_task(shared.get(time.monotonic()))  # arrives while #1 runs
    await asyncio.sleep(0)
    run.release.set()
    assert await first == 1
    assert await later == 2  # waited for #1 to end, then had its own
    assert run.calls == 2


@pytest.mark.asyncio
async def test_a_failure_reaches_every_waiter_and_the_next_request_asks_again() -> None:
    calls = 0

    async def failing() -> int:
        nonlocal calls
        calls += 1
        raise OSError("host gone")

    shared = Coalesced(failing)
    since = time.monotonic()
    results = await asyncio.gather(shared.get(since), shared.get(since), return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results) and calls == 1
    with pytest.raises(OSError):
        await shared.get(time.monotonic())
    assert calls == 2
