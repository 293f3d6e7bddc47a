"""Bounded polling of state that no event reports (another process's files, a server's log, a
callback's list): the one loop the tests share for it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def until(cond: Callable[[], T], timeout: float, what: str, every: float = 0.05) -> T:
    """Call ``cond`` until it returns something truthy and return that; fail naming ``what``
    once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(every)  # the state is polled: there is no event to arm
    return got


__all__ = ["until"]
