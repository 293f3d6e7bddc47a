"""PollScheduler: many sessions' polls on a bounded worker pool.

One scheduler thread keeps a heap of next-poll times and hands due sessions to a fixed pool of
worker threads. A session is never rescheduled while its poll is in flight, so a poll that
blocks (a frozen backend) occupies one worker and nothing else: as long as fewer sessions than
workers are stuck, every other session is polled on time. Each job's callable returns the
seconds until its next run (clamped to ``[min_delay, max_delay]``).

Thread-safety: every method may be called from any thread.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger("flowbus.scheduler")

#: a job runs once and returns the seconds until it should run again
Job = Callable[[], float]


@dataclass
class _Entry:
    key: str
    job: Job
    gen: int = 0  # bumped on every (re)schedule: heap items of an older generation are stale
    due: float = 0.0
    running_since: float | None = None
    runner: int = 0  # thread ident of the worker running it
    removed: bool = False
    runs: int = 0
    done: threading.Condition | None = field(default=None, repr=False)


class PollScheduler:
    """Run ``job()`` for every added key, each again after the delay it returns."""

    def __init__(self, workers: int = 8, *, name: str = "flowbus", min_delay: float = 0.005,
                 max_delay: float = 1.0, stuck_after: float = 5.0) -> None:
        if workers < 1:
            raise ValueError(f"PollScheduler: workers must be >= 1, got {workers}")
        self.workers = workers
        self.name = name
        self.min_delay = min_delay
        self.max_delay = max_delay
        #: a poll in flight for longer than this is reported by :meth:`stuck`
        self.stuck_after = stuck_after
        self._lock = threading.Lock()
        self._sched_cv = threading.Condition(self._lock)  # the scheduler thread waits here
        self._work_cv = threading.Condition(self._lock)  # idle workers wait here
        self._done_cv = threading.Condition(self._lock)  # remove() waits here for a poll in flight
        self._heap: list[tuple[float, int, str]] = []
        self._ready: deque[_Entry] = deque()
        self._entries: dict[str, _Entry] = {}
        self._gen = itertools.count(1)
        self._closed = False
        self._busy = 0
        self.stats: dict[str, int] = {"runs": 0, "late": 0, "errors": 0}
        self._threads = [threading.Thread(target=self._schedule_loop, name=f"{name}-sched", daemon=True)]
        self._threads += [threading.Thread(target=self._work_loop, name=f"{name}-poll{i}", daemon=True)
                          for i in range(workers)]
        for t in self._threads:
            t.start()

    # -- API ------------------------------------------------------------------------------------------

    def add(self, key: str, job: Job, delay: float = 0.0) -> None:
        """Schedule ``job`` under ``key`` (first run after ``delay`` s). Raises ValueError for a key
        that is already scheduled."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"scheduler {self.name!r} is closed")
            if key in self._entries:
                raise ValueError(f"scheduler {self.name!r}: {key!r} is already scheduled")
            entry = self._entries[key] = _Entry(key, job)
            self._push_locked(entry, time.monotonic() + max(0.0, delay))

    def remove(self, key: str, timeout: float = 10.0) -> bool:
        """Unschedule ``key``; waits up to ``timeout`` s for a poll in flight to return. True when
        nothing of it runs any more (False: its poll is still blocked, it will not run again).
        Called from inside the key's own job (e.g. a session that finds itself fenced), it
        returns at once: the job is not run again after it returns."""
        deadline = time.monotonic() + timeout
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return True
            entry.removed = True
            if entry.running_since is not None and entry.runner == threading.get_ident():
                return True
            while entry.running_since is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done_cv.wait(left)
        return True

    def wake(self, key: str) -> None:
        """Run ``key`` as soon as a worker is free (unless its poll is in flight)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.gen != 0 and entry.running_since is None:  # on the heap
                self._push_locked(entry, time.monotonic())

    def in_flight(self) -> dict[str, float]:
        """Seconds each running poll has been running, by key."""
        now = time.monotonic()
        with self._lock:
            return {e.key: now - e.running_since for e in self._entries.values() if e.running_since is not None}

    def stuck(self) -> dict[str, float]:
        """Polls in flight for longer than ``stuck_after`` seconds, by key."""
        return {k: round(s, 3) for k, s in self.in_flight().items() if s >= self.stuck_after}

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {"workers": self.workers, "busy": self._busy, "scheduled": len(self._entries),
                    "ready": len(self._ready), **self.stats}

    def close(self, timeout: float = 5.0) -> None:
        """Stop scheduling; joins idle threads (a worker blocked in a poll is left, daemon)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._entries.clear()
            self._heap.clear()
            self._ready.clear()
            self._sched_cv.notify_all()
            self._work_cv.notify_all()
            self._done_cv.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # -- internals ------------------------------------------------------------------------------------

    def _push_locked(self, entry: _Entry, due: float) -> None:
        entry.gen = next(self._gen)
        entry.due = due
        first = not self._heap or due < self._heap[0][0]
        heapq.heappush(self._heap, (due, entry.gen, entry.key))
        if first:
            self._sched_cv.notify()

    def _schedule_loop(self) -> None:
        heap = self._heap
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                moved = 0
                while heap and heap[0][0] <= now:
                    _due, gen, key = heapq.heappop(heap)
                    entry = self._entries.get(key)
                    if entry is None or entry.gen != gen or entry.running_since is not None:
                        continue  # removed, rescheduled since, or running (it reschedules itself)
                    entry.gen = 0  # queued: not on the heap any more
                    self._ready.append(entry)
                    moved += 1
                if moved:
                    if moved >= self.workers:
                        self._work_cv.notify_all()
                    else:
                        for _ in range(moved):
                            self._work_cv.notify()
                self._sched_cv.wait(heap[0][0] - now if heap else None)

    def _work_loop(self) -> None:
        while True:
            with self._lock:
                while not self._ready and not self._closed:
                    self._work_cv.wait()
                if self._closed:
                    return
                entry = self._ready.popleft()
                if entry.removed or entry.running_since is not None:
                    continue
                start = time.monotonic()
                if start - entry.due > self.max_delay:
                    self.stats["late"] += 1
                entry.running_since = start
                entry.runner = threading.get_ident()
                self._busy += 1
            try:
                delay = entry.job()
            except Exception as exc:  # noqa: BLE001 - the job reports its own errors; we go on
                self.stats["errors"] += 1
                log.error("scheduler.job.failed", scheduler=self.name, key=entry.key, error=repr(exc))
                delay = self.max_delay
            with self._lock:
                self._busy -= 1
                entry.running_since = None
                entry.runs += 1
                self.stats["runs"] += 1
                if entry.removed or self._closed:
                    self._done_cv.notify_all()
                    continue
                try:
                    d = float(delay)
                except (TypeError, ValueError):
                    d = self.max_delay
                self._push_locked(entry, time.monotonic() + min(max(d, self.min_delay), self.max_delay))
