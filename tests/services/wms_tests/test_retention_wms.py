"""Retention on a WMS session against the real lsst.ctrl.bps Parsl plugin: a finished run past
retention is forgotten (``Forgotten``) and, by default (``forget-in-backend``), the submit
directory the session made for it goes too; with ``forget-in-backend = false`` it stays."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

pytest.importorskip("lsst.ctrl.bps.parsl")

from flowbus.schemas import Event, Forgotten, State
from support import wms_run as _wr
from support.wms_run import Running

wms = _wr.wms

pytestmark = pytest.mark.timeout(90)


def _forgotten(key: str) -> Callable[[list[Event]], Forgotten | None]:
    return lambda evs: next((e for e in evs if isinstance(e, Forgotten) and e.key == key), None)


def _run_one(w: Running, name: str) -> str:
    r = w.call("submit_workflow", {"name": name, "jobs": [{"name": "j", "command": ["bash", "-c", "echo hi"]}]})
    wid: str = r["wms_id"]
    assert w.final(wid).state is State.COMPLETE
    assert os.path.isdir(wid)
    return wid


class TestWmsRetention:
    def test_by_default_the_run_directory_goes_with_the_run(self, wms: Callable[..., Running]) -> None:
        """retain-hours 0 / retain-count 0: the workflow and its job are forgotten and the submit
        directory the session made is removed."""
        w = wms(retain_hours=0, retain_count=0)
        wid = _run_one(w, "gone")
        ev = w.rec.wait_for(_forgotten(wid), 30, f"Forgotten {wid}")
        assert ev.in_backend and ev.last_state is State.COMPLETE
        w.rec.wait_for(_forgotten(f"{wid}/j"), 30, "the job forgotten too")
        assert not os.path.exists(wid)
        assert os.path.isdir(os.path.dirname(wid)), "the session's submit-dir itself stays"

    def test_opted_out_the_files_stay(self, wms: Callable[..., Running]) -> None:
        """With forget-in-backend = false the session forgets the run in memory only; its directory stays."""
        w = wms(retain_hours=0, retain_count=0, forget_in_backend=False)
        wid = _run_one(w, "kept")
        ev = w.rec.wait_for(_forgotten(wid), 30, f"Forgotten {wid}")
        assert not ev.in_backend
        assert os.path.isdir(wid) and os.listdir(wid)
