"""Waiting for a condition in the lab tests: poll it with a deadline, never sleep blindly."""

from __future__ import annotations

import time
from collections.abc import Callable

POLL_S = 0.02


def wait_for(condition: Callable[[], object], timeout: float = 30) -> bool:
    """True as soon as `condition()` holds; False once `timeout` seconds passed without it."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)  # polling a condition with a deadline, not a synchronisation sleep


def wait_until(condition: Callable[[], object], timeout: float = 30) -> float:
    """Seconds until `condition()` held; AssertionError once `timeout` passed without it."""
    start = time.monotonic()
    if not wait_for(condition, timeout):
        raise AssertionError(f"condition not met within {timeout} s")
    return time.monotonic() - start
