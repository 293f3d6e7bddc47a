"""Bounded polling of state that no event reports (another process's files, a server's log, a
callback's list): the one loop the tests share for it, and its twin for coroutines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _timed_out(timeout: float, what: str | Callable[[], str]) -> str:
    return f"timed out after {timeout} s waiting for {what() if callable(what) else what}"


def until(cond: Callable[[], T | None], timeout: float, what: str | Callable[[], str], every: float = 0.05) -> T:
    """Call ``cond`` until it returns something truthy and return that; fail naming ``what``
    (a string, or a function giving one, called only on the failure) once ``timeout`` seconds
    have passed."""
    deadline = time.monotonic() + timeout
    while True:
        if got := cond():
            return got
        assert time.monotonic() < deadline, _timed_out(timeout, what)
        time.sleep(every)  # the state is polled: there is no event to arm


async def until_async(cond: Callable[[], T | None], within: float, what: str | Callable[[], str],
                      every: float = 0.05) -> T:
    """:func:`until` inside a coroutine: waits with ``asyncio.sleep``, so the loop's other tasks
    (the ones that change the state) run meanwhile; fails naming ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        if got := cond():
            return got
        assert time.monotonic() < deadline, _timed_out(within, what)
        await asyncio.sleep(every)


__all__ = ["until", "until_async"]
