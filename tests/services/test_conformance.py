"""One conformance suite for every backend adapter, run against real backends (the way pykka runs
each test against every runtime): ecFlow, QCG-PilotJob, soma-workflow (light mode), ctrl_bps with
Parsl, the guiServer emulator, and a real guiServer when ``FLOWBUS_GUISERVER_BIN`` names one. The
harness (tests/support/conformance.py) gives each backend the same small interface; the sessions are driven as a BackendActor drives them: ``session_for``,
``start(emit, known={})``, ``poll()`` from one thread, ``stop()``. No Ray, no broker.

Where a backend cannot do something, the test says why in an explicit skip.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from flowbus.schemas import (
    BackendError,
    BackendRejected,
    Connected,
    Disconnected,
    Event,
    Freshness,
    RecoveryAttempted,
    Resynced,
    UnknownOperation,
)
from flowbus.schemas._freshness import is_resource
from flowbus.services import Releasable, session_for
from support import poll
from support.conformance import Backend, Host, harness_for, live_descendants
from support.recorder import Recorder, show

#: the session's name: every error and event of the session must carry it
NAME = "conf-s7"

PARAMS = [pytest.param("ecflow", id="ecflow"), pytest.param("qcg", id="qcg", marks=pytest.mark.qcg),
          pytest.param("soma", id="soma"), pytest.param("wms", id="wms"), pytest.param("guiserver", id="guiserver"),
          pytest.param("guiserver-real", id="guiserver-real")]

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=PARAMS)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """One backend (not started yet); at teardown everything it started is ended, and no process
    started during the test may be left."""
    me = os.getpid()
    before = live_descendants(me)
    h = harness_for(request.param, tmp_path / request.param)
    yield h
    left = h.close()
    assert not left, f"{h.backend}: left behind by the backend: {left}"
    try:
        poll.until(lambda: not (live_descendants(me) - before), 15, "the test's processes to end")
    except AssertionError:
        import psutil

        stray = [psutil.Process(p) for p in live_descendants(me) - before if psutil.pid_exists(p)]
        names = [f"{p.pid}: {' '.join(p.cmdline())[:80]}" for p in stray]
        for p in stray:
            p.kill()
        raise AssertionError(f"{h.backend}: processes left behind (now killed): {names}") from None


@pytest.fixture
def drive(harness: Backend) -> Iterator[Callable[..., Host]]:
    """Factory: a session for the harness's backend with a recorder; started and polled unless told
    otherwise; closed at teardown, which then fails if poll() raised."""
    made: list[Host] = []

    def make(config: Any = None, start: bool = True, poll: bool = True) -> Host:
        host = Host(session_for(config or harness.config(NAME)), Recorder())
        made.append(host)
        if start:
            host.start()
        if poll:
            host.start_polling()
        return host

    yield make
    for host in made:
        host.close()
    errors = [exc for host in made for exc in host.errors]
    assert not errors, f"{harness.backend}: poll() or stop() raised: {errors!r}"


# -- helpers ----------------------------------------------------------------------------------------


def first(cls: type[Any], start: int = 0, pred: Callable[[Any], bool] = lambda e: True) -> Callable[[list[Event]], Any]:
    """The first ``cls`` event at or after index ``start`` that satisfies ``pred``."""
    return lambda evs: next((e for e in evs[start:] if isinstance(e, cls) and pred(e)), None)


def connected(h: Backend, host: Host, timeout: float = 30.0) -> Connected:
    ev: Connected = host.rec.wait_for(first(Connected), timeout, f"{h.backend}: Connected")
    return ev


def converged(h: Backend, host: Host, timeout: float, key: str | None = None) -> None:
    """Wait until the last states the session published equal the backend's own view."""
    def same() -> bool:
        with host.rec.cond:
            events = list(host.rec.events)
        pub, truth = h.published(events), h.truth()
        return pub == truth if key is None else key in truth and pub.get(key) == truth[key]

    def diff() -> str:
        with host.rec.cond:
            events = list(host.rec.events)
        pub, truth = h.published(events), h.truth()
        keys = sorted(set(pub) | set(truth)) if key is None else [key]
        return (f"{h.backend}: the session's last published states to equal the backend's; differing "
                f"(key: published vs backend): {[(k, pub.get(k), truth.get(k)) for k in keys if pub.get(k) != truth.get(k)]}")

    poll.until(same, timeout, diff)


def events_of(host: Host) -> list[Event]:
    with host.rec.cond:
        return list(host.rec.events)


def stale_and_fresh(events: list[Event]) -> tuple[set[str], set[str]]:
    """The resource keys whose latest state a bus reader would now mark stale, and the others:
    the events numbered in order (as the bus numbers them) and fed to ``schemas.Freshness``."""
    numbered = [msgspec.structs.replace(e, seq=i + 1) for i, e in enumerate(events)]
    fresh = Freshness(numbered)
    latest = {(e.FAMILY, e.key): e for e in numbered if is_resource(e)}
    stale = {f"{f}:{k}" for (f, k), e in latest.items() if fresh.is_stale(e)}
    return stale, {f"{f}:{k}" for f, k in latest} - stale


# -- the suite --------------------------------------------------------------------------------------


def test_start_publishes_connected(harness: Backend, drive: Callable[..., Host]) -> None:
    """1. start() publishes Connected naming the session and its backend."""
    harness.start_backend()
    host = drive()
    conn = connected(harness, host, 10)
    assert (conn.source, conn.backend) == (NAME, harness.backend), show(conn)
    before = events_of(host)[:host.rec.index(conn)]
    assert not [e for e in before if isinstance(e, Disconnected)], [show(e) for e in before]


def test_unknown_operation_lists_known_ones(harness: Backend, drive: Callable[..., Host]) -> None:
    """2. An unknown operation raises UnknownOperation naming it and listing the known operations."""
    harness.start_backend()
    host = drive()
    assert harness.known_op in host.session.operations()
    with pytest.raises(UnknownOperation) as info:
        host.session.call("no_such_operation")
    text = str(info.value)
    assert "no_such_operation" in text and harness.known_op in text, text


def test_bad_arguments_are_rejected(harness: Backend, drive: Callable[..., Host]) -> None:
    """3. Wrong arity or wrong argument types to real operations are BackendRejected naming the
    operation; the session keeps working."""
    harness.start_backend()
    host = drive()
    connected(harness, host)
    unclear = []
    for op, args, kwargs in harness.bad_args:
        with pytest.raises(BackendRejected) as info:
            host.session.call(op, *args, **kwargs)
        assert not isinstance(info.value, UnknownOperation), f"{op}{args}: {info.value}"
        if op not in str(info.value):
            unclear.append(f"{op}{args!r}: {info.value}")
    op, args, kwargs = harness.health
    host.session.call(op, *args, **kwargs)
    assert not unclear, f"{harness.backend}: rejections that do not name the operation: {unclear}"


def test_killed_backend_is_disconnected_within_bound(harness: Backend, drive: Callable[..., Host]) -> None:
    """4. The backend killed: Disconnected(will_retry=True) of this session within the harness's bound."""
    if harness.kill_skip:
        pytest.skip(harness.kill_skip)
    harness.start_backend()
    host = drive()
    connected(harness, host)
    killed = time.monotonic()
    harness.kill_backend(host.session)
    lost: Disconnected = host.rec.wait_for(first(Disconnected), harness.bound_s + 10, f"{harness.backend}: Disconnected")
    after = host.rec.times[host.rec.index(lost)] - killed
    assert (lost.source, lost.backend, lost.will_retry) == (NAME, harness.backend, True), show(lost)
    assert after <= harness.bound_s, f"{harness.backend}: Disconnected {after:.2f} s after the kill (bound {harness.bound_s} s)"


def test_backend_back_is_recovered_and_resynced(harness: Backend, drive: Callable[..., Host]) -> None:
    """5. The backend back: RecoveryAttempted, Connected, then Resynced, and the last published
    state of every key equals the backend's own view, a change made while disconnected included.
    Between Disconnected and Resynced every resource of the source reads as stale on the bus
    (schemas.Freshness, which status, snapshots and waits use); after Resynced none does."""
    if harness.kill_skip:
        pytest.skip(harness.kill_skip)
    harness.start_backend()
    host = drive()
    connected(harness, host)
    work = harness.make_work(host.session)
    converged(harness, host, 20, work)
    harness.kill_backend(host.session)
    lost = host.rec.wait_for(first(Disconnected), harness.bound_s + 10, f"{harness.backend}: Disconnected")
    stale, fresh = stale_and_fresh(events_of(host)[:host.rec.index(lost) + 1])
    assert stale and not fresh, f"{harness.backend}: after Disconnected, resources not marked stale: {sorted(fresh)}"
    host.pause()  # the change below is made while the session is away
    harness.restart_backend()
    changed = harness.change_while_down()
    host.resume()
    i = host.rec.index(lost)
    conn = host.rec.wait_for(first(Connected, i), 30, f"{harness.backend}: Connected again")
    converged(harness, host, 30)
    if changed is not None:
        assert changed in harness.truth(), f"{harness.backend}: the change to {changed} is not in the backend"
    j = host.rec.index(conn)
    around = [show(e) for e in events_of(host)[i:j + 4]]
    problems = []
    attempts = [e for e in events_of(host)[i:j] if isinstance(e, RecoveryAttempted)]
    if not attempts:
        problems.append("no RecoveryAttempted between Disconnected and Connected")
    elif not attempts[-1].ok:
        problems.append("the last RecoveryAttempted before Connected is not ok=True")
    try:
        resynced = host.rec.wait_for(first(Resynced, j), 10, "Resynced")
    except AssertionError:
        problems.append("no Resynced after Connected within 10 s")
    else:
        stale, _ = stale_and_fresh(events_of(host)[:host.rec.index(resynced) + 1])
        if stale:
            problems.append(f"still stale after Resynced: {sorted(stale)}")
    strangers = [show(e) for e in events_of(host)[i:] if e.source != NAME]
    if strangers:
        problems.append(f"events of another source: {strangers}")
    assert not problems, f"{harness.backend}: {'; '.join(problems)}; events from Disconnected on: {around}"


def test_unreachable_at_start_keeps_retrying(harness: Backend, drive: Callable[..., Host]) -> None:
    """6. Nothing to connect to at start: start() returns, Disconnected(will_retry) and
    RecoveryAttempted follow, calls fail naming the session; the backend started later is
    Connected and Resynced."""
    if harness.unreachable_skip:
        pytest.skip(harness.unreachable_skip)
    host = drive(start=False, poll=False)
    t0 = time.monotonic()
    raised: BackendError | None = None
    try:
        host.start()
    except BackendError as exc:
        raised = exc
    if raised is not None:
        pytest.fail(f"{harness.backend}: start() with the backend down raised {type(raised).__name__}: {raised} "
                    "(it must return, publish Disconnected and keep retrying)")
    assert time.monotonic() - t0 < 10, f"{harness.backend}: start() took {time.monotonic() - t0:.1f} s"
    host.start_polling()
    lost: Disconnected = host.rec.wait_for(first(Disconnected), 10, f"{harness.backend}: Disconnected")
    assert (lost.source, lost.backend, lost.will_retry) == (NAME, harness.backend, True), show(lost)
    host.rec.wait_for(lambda evs: len([e for e in evs if isinstance(e, RecoveryAttempted)]) >= 2 or None, 10,
                      f"{harness.backend}: two RecoveryAttempted")
    op, args, kwargs = harness.health
    with pytest.raises(BackendError) as info:
        host.session.call(op, *args, **kwargs)
    assert NAME in str(info.value), f"{harness.backend}: the error does not name the session: {info.value}"
    mark = len(events_of(host))
    harness.start_backend()
    conn = host.rec.wait_for(first(Connected, mark), 30, f"{harness.backend}: Connected once the backend runs")
    host.rec.wait_for(first(Resynced, host.rec.index(conn)), 10, f"{harness.backend}: Resynced")
    host.session.call(op, *args, **kwargs)


def test_breaking_operations_are_refused(harness: Backend, drive: Callable[..., Host]) -> None:
    """7. Operations that would detach or end the session's connection are BackendRejected with a
    message naming them; the session keeps working (calls and observation)."""
    if harness.breaking_skip:
        pytest.skip(harness.breaking_skip)
    harness.start_backend()
    host = drive()
    connected(harness, host)
    mark = len(events_of(host))
    accepted, unclear = [], []
    for op, args, kwargs in harness.breaking:
        what = str(args[0]) if op == "client" and args else op
        try:
            host.session.call(op, *args, **kwargs)
        except BackendRejected as exc:
            if what not in str(exc):
                unclear.append(f"{op}{args!r}: {exc}")
        except BackendError as exc:
            accepted.append(f"{op}{args!r} raised {type(exc).__name__}, not BackendRejected: {exc}")
        else:
            accepted.append(f"{op}{args!r} was accepted")
    assert not accepted, f"{harness.backend}: not refused: {accepted}"
    assert not unclear, f"{harness.backend}: refusals that do not name the operation: {unclear}"
    op, args, kwargs = harness.health
    host.session.call(op, *args, **kwargs)
    work = harness.make_work(host.session)
    converged(harness, host, 20, work)
    lost = [e for e in events_of(host)[mark:] if isinstance(e, Disconnected)]
    assert not lost, [show(e) for e in lost]


def test_release_publishes_nothing_and_leaves_the_work(harness: Backend, drive: Callable[..., Host]) -> None:
    """8. Fenced: release() emits no event, and the backend's work runs on (still in its own view)."""
    harness.start_backend()
    host = drive()
    connected(harness, host)
    assert isinstance(host.session, Releasable), f"{harness.backend}: the session has no release()"
    work = harness.make_work(host.session)
    assert harness.truth()[work] in harness.running
    host.stop_polling()  # the host stops polling a fenced session before it releases it
    mark = len(events_of(host))
    host.session.release()
    assert events_of(host)[mark:] == [], [show(e) for e in events_of(host)[mark:]]
    after = harness.truth()
    assert after.get(work) in harness.running, f"{harness.backend}: {work} after release: {after.get(work)!r}"
    host.session.release()
    host.session.stop()
    host.session.kill()
    assert events_of(host)[mark:] == [], [show(e) for e in events_of(host)[mark:]]
    assert harness.truth().get(work) in harness.running


def test_stop_leaves_no_thread_or_process(harness: Backend, drive: Callable[..., Host]) -> None:
    """9. stop() leaves no thread and no process of the session (the backend's own are not its)."""
    harness.start_backend()
    me = os.getpid()
    threads = set(threading.enumerate())
    kids = live_descendants(me)
    host = drive(config=harness.own_config(NAME))
    connected(harness, host)
    harness.make_work(host.session)
    host.close()

    def leftovers() -> tuple[list[str], list[int]]:
        new_threads = [t.name for t in threading.enumerate() if t not in threads and t.is_alive()]
        owned = set().union(*[{p, *live_descendants(p)} for p in harness.owned_pids()])
        return new_threads, sorted(live_descendants(me) - kids - owned)

    poll.until(lambda: leftovers() == ([], []), 15,
               lambda: f"{harness.backend}: threads and processes of the session to end; left: {leftovers()}")


def test_logs_answers_in_one_shape(harness: Backend, drive: Callable[..., Host]) -> None:
    """10. ``logs`` of a running resource answers ``{key, parts: [{name, path, text, truncated}],
    reason}`` (reason only without parts) within ``max_bytes``, as plain data; an unknown key and a
    ``max_bytes`` outside 1..1048576 are BackendRejected naming the operation; the session goes on."""
    harness.start_backend()
    host = drive()
    connected(harness, host)
    work = harness.make_work(host.session)
    assert "logs" in host.session.operations()
    got = host.session.call("logs", work, max_bytes=4096)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(got)) == got, got
    assert got["key"] == work and isinstance(got["parts"], list), got
    for part in got["parts"]:
        assert set(part) == {"name", "path", "text", "truncated"}, part
        assert isinstance(part["name"], str) and part["name"] and isinstance(part["truncated"], bool), part
        assert part["path"] is None or isinstance(part["path"], str), part
        assert isinstance(part["text"], str) and len(part["text"].encode()) <= 4096, part
    if got["parts"]:
        assert "reason" not in got, got
    else:
        assert isinstance(got.get("reason"), str) and got["reason"], f"{harness.backend}: no parts and no reason: {got}"
    unknown = "999999/no-such-job" if harness.backend == "soma" else "/no-such/job" if harness.backend == "ecflow" \
        else "no-such-job"
    for args, kwargs, what in [((unknown,), {}, "no-such"), ((work,), {"max_bytes": 0}, "max_bytes"),
                               ((work,), {"max_bytes": 1048577}, "max_bytes")]:
        with pytest.raises(BackendRejected) as info:
            host.session.call("logs", *args, **kwargs)
        assert "logs" in str(info.value), f"{harness.backend}: {info.value}"
        if what != "no-such" or harness.backend != "soma":  # soma names the workflow id it does not know
            assert what in str(info.value), f"{harness.backend}: {info.value}"
    op, args, kwargs = harness.health
    host.session.call(op, *args, **kwargs)
