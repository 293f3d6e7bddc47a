"""A dead or frozen QCG manager is reported within the liveness bound, with the default settings,
for a manager the session started (mode ``local``) and one it connected to (mode ``connect``).

The bound with the defaults is ``liveness_interval + liveness_timeout`` plus one poll (about
1.65 s); the tests assert it with a margin for a loaded machine. Every process a test stops is
continued or killed in a ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from flowbus.schemas import BackendUnavailable, Connected, Disconnected, State
from flowbus.services.qcg._probe import Prober
from support.qcg import (
    DEFAULTS,
    Running,
    first,
    foreign_manager,
    qcg_fixture,  # noqa: F401 - provides the `qcg` fixture
    reached,
)

#: what the defaults promise (interval + timeout + one poll) ...
BOUND_S = DEFAULTS.liveness_interval + DEFAULTS.liveness_timeout + 0.05
#: ... and what the tests accept, with room for a loaded 2-core machine
ASSERTED_S = 2.0 + 1.0
#: the settings a user gets (the fixture's own are faster)
AS_DEFAULT = {"reconcile_interval": DEFAULTS.reconcile_interval, "request_timeout": DEFAULTS.request_timeout,
              "liveness_interval": DEFAULTS.liveness_interval, "liveness_timeout": DEFAULTS.liveness_timeout}


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[float]:
    """SIGSTOP ``pid``; yields when it was stopped; SIGCONT at exit (if it still exists)."""
    t0 = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        yield t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def reported_after(run: Running, t0: float) -> tuple[Disconnected, float]:
    dis = run.rec.wait_for(first(Disconnected), 10, "disconnected")
    return dis, run.rec.times[run.rec.index(dis)] - t0


def test_the_default_bound_is_under_two_seconds() -> None:
    """The defaults keep the liveness bound under 2 s."""
    assert BOUND_S < 2.0, BOUND_S


@pytest.mark.timeout(30)
class TestProber:
    @contextlib.contextmanager
    def rep(self, answer: bool) -> Iterator[str]:
        """A REP socket on 127.0.0.1 that answers every request (``answer``) or none."""
        ctx: zmq.Context[Any] = zmq.Context()
        sock = ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        done = threading.Event()

        def serve() -> None:
            while not done.is_set():
                if sock.poll(20) and answer:
                    sock.recv()
                    sock.send(b'{"code": 0}')

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        try:
            yield f"tcp://127.0.0.1:{port}"
        finally:
            done.set()
            server.join(2)
            sock.close(0)
            ctx.term()

    def test_a_silent_peer_gets_a_verdict_within_interval_plus_timeout(self) -> None:
        """A peer that never answers is named by the verdict within interval + timeout."""
        with self.rep(answer=False) as address:
            prober = Prober(address, interval=0.1, timeout=0.3).start()
            t0 = time.monotonic()
            try:
                while not prober.verdict:
                    assert time.monotonic() - t0 < 3.0, "no verdict"
                    time.sleep(0.01)
                took = time.monotonic() - t0
            finally:
                prober.close()
            assert took < 0.1 + 0.3 + 0.5 and "within 0.3 s" in prober.verdict and address in prober.verdict

    def test_an_answering_peer_gets_none(self) -> None:
        """A peer that answers is probed again and again and never blamed."""
        with self.rep(answer=True) as address:
            prober = Prober(address, interval=0.02, timeout=1.0).start()
            try:
                deadline = time.monotonic() + 5
                while prober.answered < 10:
                    assert time.monotonic() < deadline, f"only {prober.answered} probes answered"
                    time.sleep(0.01)
            finally:
                prober.close()
            assert prober.verdict == ""


@pytest.mark.qcg
@pytest.mark.timeout(60)
class TestLocalManager:
    def test_kill9_is_reported_within_the_bound(self, qcg: Callable[..., Running]) -> None:
        """kill -9 of the manager the session started: Disconnected within the bound."""
        run = qcg(recovery="none", **AS_DEFAULT)
        pid = run.session.service_pid
        assert pid is not None
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        dis, took = reported_after(run, t0)
        assert took <= ASSERTED_S, f"Disconnected after {took:.2f} s"
        assert "ended" in dis.reason and not dis.will_retry, dis

    def test_sigstop_is_reported_within_the_bound_and_recovered(self, qcg: Callable[..., Running]) -> None:
        """A SIGSTOPped manager of the session's: Disconnected within the bound naming the probe,
        the frozen manager is killed, a new one started and the running job resubmitted."""
        run = qcg(recovery="resubmit", **AS_DEFAULT)
        run.call("submit", [{"name": "long", "exec": "/bin/sleep", "args": ["1"]}])
        run.rec.wait_for(reached("long", State.ACTIVE), 15, "long active")
        pid = run.session.service_pid
        assert pid is not None
        first_id = run.session.instance_id
        with stopped(pid) as t0:
            dis, took = reported_after(run, t0)
            assert took <= ASSERTED_S, f"Disconnected after {took:.2f} s"
            assert "liveness probe" in dis.reason and dis.will_retry, dis
        conn = run.rec.wait_for(lambda evs: [e for e in evs if isinstance(e, Connected)][1:], 15, "reconnected")[0]
        assert conn.detail != first_id
        assert run.rec.final("long", 20).state is State.COMPLETE


@pytest.mark.qcg
@pytest.mark.timeout(60)
class TestConnectedManager:
    def test_kill9_is_reported_within_the_bound(self, qcg: Callable[..., Running], tmp_path: Path) -> None:
        """kill -9 of a manager the session connected to: Disconnected within the bound."""
        with foreign_manager(tmp_path / "foreign") as (pid, address):
            run = qcg(mode="connect", address=address, recovery="none", **AS_DEFAULT)
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            dis, took = reported_after(run, t0)
            assert took <= ASSERTED_S, f"Disconnected after {took:.2f} s"
            assert not dis.will_retry, dis

    def test_sigstop_is_reported_within_the_bound(self, qcg: Callable[..., Running], tmp_path: Path) -> None:
        """A SIGSTOPped manager the session connected to: Disconnected within the bound, naming
        the probe; the manager itself is left alone (not the session's to kill)."""
        with foreign_manager(tmp_path / "foreign") as (pid, address):
            run = qcg(mode="connect", address=address, recovery="none", **AS_DEFAULT)
            with stopped(pid) as t0:
                dis, took = reported_after(run, t0)
                assert took <= ASSERTED_S, f"Disconnected after {took:.2f} s"
                assert "liveness probe" in dis.reason, dis
                assert os.path.exists(f"/proc/{pid}"), "a manager the session connected to was killed"

    def test_call_hanging_on_a_frozen_manager_is_cut_short(self, qcg: Callable[..., Running],
                                                            tmp_path: Path) -> None:
        """A call waiting on a frozen manager fails when the probe gives its verdict, long before
        its own request timeout."""
        with foreign_manager(tmp_path / "foreign") as (pid, address):
            run = qcg(mode="connect", address=address, recovery="none", **{**AS_DEFAULT, "request_timeout": 20.0})
            with stopped(pid) as t0:
                with pytest.raises(BackendUnavailable, match="liveness probe") as err:
                    run.call("list")
                took = time.monotonic() - t0
            assert took <= ASSERTED_S, f"the call failed after {took:.2f} s: {err.value}"
            run.rec.wait_for(first(Disconnected), 5, "disconnected")
