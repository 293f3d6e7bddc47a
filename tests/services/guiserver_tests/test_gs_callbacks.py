"""DifxCallbacks: the DiFX interface's message/warning/error/final/timeout/interval callbacks, fed by a
real broker from a GuiserverSession publishing through a Publisher, with the emulator running jobs.

Every wait is on a Condition fed by the callbacks, bounded; no sleeps."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flowbus.bus import BrokerProcess, Client, Publisher
from flowbus.schemas import GuiserverSessionConfig, LogLine, State, StateChanged
from flowbus.services import DifxCallbacks
from flowbus.services.guiserver import GuiserverSession
from flowbus.services.guiserver_emulator import GuiserverEmulator

SESSION = "difx"


class Calls:
    """Records every callback call by name; ``wait`` blocks on a predicate."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.got: dict[str, list[Any]] = {n: [] for n in ("message", "warning", "error", "final", "timeout", "interval")}
        self.order: list[str] = []  # callback names in call order

    def __getattr__(self, name: str) -> Callable[..., None]:
        if not name.startswith("on_"):
            raise AttributeError(name)
        kind = name[3:]

        def record(*args: Any) -> None:
            with self.cond:
                self.got[kind].append(args[0] if args else None)
                self.order.append(kind)
                self.cond.notify_all()
        return record

    def kwargs(self, *kinds: str) -> dict[str, Any]:
        return {f"on_{k}": getattr(self, f"on_{k}") for k in kinds}

    def wait(self, pred: Callable[[dict[str, list[Any]]], bool], timeout: float = 10.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: pred(self.got), timeout), f"timed out; got {self.got}"


class Rig:
    """A broker, a publisher with the session's source, a client, an emulator and a started session."""

    def __init__(self, broker: BrokerProcess, emu: GuiserverEmulator) -> None:
        self.emu = emu
        self.publisher = Publisher(broker.address, heartbeat_interval=0.1, retransmit_after=0.5)
        self.publisher.open_source(SESSION, "guiserver")
        self.client = Client(broker.address)
        cfg = GuiserverSessionConfig(name=SESSION, port=emu.port, allowed_dirs=["/data"], request_timeout=5.0)
        self.session = GuiserverSession(cfg)
        self.session.start(self.publisher.publish, {})
        self.callbacks: list[DifxCallbacks] = []

    def job(self, name: str) -> str:
        path = f"/data/exp/{name}.input"
        self.emu.real(path).write_text("# fake\n")
        return path

    def callbacks_for(self, job: str | None, **kwargs: Any) -> DifxCallbacks:
        cb = DifxCallbacks(self.client, SESSION, job, **kwargs)
        self.callbacks.append(cb)
        return cb

    def close(self) -> None:
        for cb in self.callbacks:
            cb.cancel()
        self.session.stop()
        self.client.close()
        self.publisher.close()


@pytest.fixture
def rig(broker_factory: Callable[..., BrokerProcess], tmp_path: Path) -> Iterator[Rig]:
    emu = GuiserverEmulator(tmp_path / "sandbox", outcomes={"warn_1": "warning", "part_1": "partial",
                                                           "fail_1": "failure", "slow_1": "slow",
                                                           "silent_1": "silent", "good_1": "good"}).start()
    emu.real("/data/exp").mkdir(parents=True)
    r: Rig | None = None
    try:
        r = Rig(broker_factory(journal=False), emu)
        yield r
    finally:
        if r is not None:
            r.close()
        emu.stop()


@pytest.mark.timeout(60)
class TestJobCallbacks:
    """Message, warning, error and final callbacks of one job."""

    def test_warning_job(self, rig: Rig) -> None:
        """A job with a warning: info lines to on_message, the warning to on_warning, then on_final(complete)."""
        calls = Calls()
        cb = rig.callbacks_for("warn_1", **calls.kwargs("message", "warning", "error", "final"))
        rig.session.call("start_job", rig.job("warn_1"))
        calls.wait(lambda g: bool(g["final"]))
        got = calls.got
        assert [e.state for e in got["final"]] == [State.COMPLETE] and got["final"][0].key == "warn_1"
        assert cb.final is got["final"][0] and cb.wait_final(0) is cb.final
        assert any(e.message == "WARNING: weak signal" for e in got["warning"])
        assert any(e.message.startswith("Checking /data/exp/warn_1.input") for e in got["message"])
        assert got["error"] == []
        for kind, levels in (("message", {"info"}), ("warning", {"warning"})):
            assert got[kind] and all(isinstance(e, LogLine) and e.key == "warn_1" and e.level in levels
                                     for e in got[kind])
        assert cb.calls["final"] == 1 and not cb.errors

    def test_error_lines_and_aborted(self, rig: Rig) -> None:
        """A failing job: its error lines to on_error (before the final), on_final(aborted)."""
        calls = Calls()
        rig.callbacks_for("fail_1", **calls.kwargs("error", "final"))
        rig.session.call("start_job", rig.job("fail_1"))
        calls.wait(lambda g: bool(g["final"]))
        assert calls.got["final"][0].state is State.ABORTED
        texts = [e.message for e in calls.got["error"]]
        assert "Error: disk read failed" in texts and "mpifxcorr FAILED" in texts
        assert all(e.key == "fail_1" and e.level in ("error", "critical") for e in calls.got["error"])

    def test_unrecoverable_after_crash_is_final(self, rig: Rig) -> None:
        """A server crash mid-job that loses the job's end for good: on_final(unknown) with the reason,
        once, and the timer stops (nothing more will ever come about the job)."""
        calls = Calls()
        cb = rig.callbacks_for("slow_1", interval=0.05, **calls.kwargs("message", "final", "interval"))
        rig.session.call("relay", False)
        rig.session.call("start_job", rig.job("slow_1"))
        calls.wait(lambda g: any(e.message == "tick 1" for e in g["message"]))
        stop = threading.Event()
        poller = threading.Thread(target=lambda: [stop.wait(rig.session.poll()) for _ in iter(stop.is_set, True)])
        poller.start()  # what the actor does: poll, which finds the loss, reconnects and resyncs
        try:
            rig.emu.crash()
            calls.wait(lambda g: bool(g["final"]), timeout=20)
        finally:
            stop.set()
            poller.join(10)
        final = calls.got["final"][0]
        assert final.state is State.UNKNOWN and final.attrs["unrecoverable"] is True
        assert "cannot be recovered" in final.detail
        assert cb.wait_final(0) is final and cb.calls["final"] == 1
        assert cb._timer is not None
        cb._timer.join(5)
        assert not cb.active

    def test_other_jobs_filtered(self, rig: Rig) -> None:
        """Callbacks for one job ignore another job's lines and final state; job=None sees both."""
        mine, every = Calls(), Calls()
        rig.callbacks_for("part_1", **mine.kwargs("warning", "error", "final"))
        rig.callbacks_for(None, **every.kwargs("final"))
        rig.session.call("start_job", rig.job("good_1"), wait=True, timeout=10)
        rig.session.call("start_job", rig.job("part_1"))
        mine.wait(lambda g: bool(g["final"]))
        every.wait(lambda g: {e.key for e in g["final"]} >= {"good_1", "part_1"})
        assert [(e.key, e.state, e.detail) for e in mine.got["final"]] == [("part_1", State.COMPLETE, "ended with errors: Error: disk read failed")]
        assert all(e.key == "part_1" for e in mine.got["error"] + mine.got["warning"])
        assert "Error: disk read failed" in [e.message for e in mine.got["error"]]

    def test_failing_callback_does_not_stop_others(self, rig: Rig) -> None:
        """An exception in on_message is recorded; on_final still fires."""
        calls = Calls()

        def boom(_: LogLine) -> None:
            raise RuntimeError("boom")

        cb = rig.callbacks_for("good_1", on_message=boom, on_final=calls.on_final)
        rig.session.call("start_job", rig.job("good_1"))
        calls.wait(lambda g: bool(g["final"]))
        assert cb.errors and all(e == "message: RuntimeError: boom" for e in cb.errors)


@pytest.mark.timeout(60)
class TestTimers:
    """The timeout and interval callbacks."""

    def test_timeout_on_silent_job(self, rig: Rig) -> None:
        """A job whose stream goes silent (statvfs failure) gets on_timeout once, and no final."""
        calls = Calls()
        cb = rig.callbacks_for("silent_1", timeout=0.5, **calls.kwargs("message", "timeout", "final"))
        rig.session.call("start_job", rig.job("silent_1"))
        # the job speaks (queued, config-check lines), then its stream stops: a timeout follows its last line
        calls.wait(lambda g: "message" in calls.order and calls.order[-1] == "timeout")
        assert calls.got["final"] == [] and cb.final is None
        assert set(calls.got["timeout"]) == {None} and cb.calls["timeout"] == len(calls.got["timeout"])
        assert cb.active  # still watching: the next event of the job re-arms the timeout

    def test_no_timeout_for_good_job(self, rig: Rig) -> None:
        """A job that ends within the timeout never times out; the timer stops at its final state."""
        calls = Calls()
        cb = rig.callbacks_for("good_1", timeout=5.0, **calls.kwargs("timeout", "final"))
        rig.session.call("start_job", rig.job("good_1"))
        calls.wait(lambda g: bool(g["final"]))
        assert cb._timer is not None
        cb._timer.join(5)
        assert not cb.active and calls.got["timeout"] == []

    def test_interval_while_running(self, rig: Rig) -> None:
        """on_interval ticks while a slow job runs and stops with its final state (cancelled by stop_job)."""
        calls = Calls()
        cb = rig.callbacks_for("slow_1", interval=0.05, **calls.kwargs("interval", "final"))
        rig.session.call("start_job", rig.job("slow_1"))
        calls.wait(lambda g: len(g["interval"]) >= 3)
        rig.session.call("stop_job", "slow_1")
        calls.wait(lambda g: bool(g["final"]))
        assert calls.got["final"][0].state is State.CANCELLED
        assert cb._timer is not None
        cb._timer.join(5)
        assert not cb.active
        n = len(calls.got["interval"])
        assert n == cb.calls["interval"] >= 3

    def test_cancel_and_context_manager(self, rig: Rig) -> None:
        """cancel() (and leaving a with block) stops the timer and the subscription thread."""
        calls = Calls()
        with DifxCallbacks(rig.client, SESSION, "slow_1", interval=0.02, **calls.kwargs("interval")) as cb:
            calls.wait(lambda g: len(g["interval"]) >= 2)
            assert cb.active
        assert not cb.active and not cb._callback._thread.is_alive()
        cb.cancel()  # idempotent

    def test_cancel_from_inside_callback(self, rig: Rig) -> None:
        """A callback may cancel its own DifxCallbacks (no deadlock)."""
        done = threading.Event()
        holder: list[DifxCallbacks] = []

        def stop(_: StateChanged) -> None:
            holder[0].cancel()
            done.set()

        holder.append(rig.callbacks_for("good_1", on_final=stop, interval=1.0, on_interval=lambda: None))
        rig.session.call("start_job", rig.job("good_1"))
        assert done.wait(10)
        holder[0]._callback._thread.join(5)
        assert not holder[0].active and not holder[0]._callback._thread.is_alive()

    def test_bad_arguments(self, rig: Rig) -> None:
        """on_timeout/on_interval need a positive period; the session name must be a topic segment."""
        with pytest.raises(ValueError, match="timeout"):
            DifxCallbacks(rig.client, SESSION, on_timeout=lambda: None)
        with pytest.raises(ValueError, match="interval"):
            DifxCallbacks(rig.client, SESSION, on_interval=lambda: None, interval=0)
        with pytest.raises(ValueError, match="session"):
            DifxCallbacks(rig.client, "a/b")
