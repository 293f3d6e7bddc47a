"""``logs`` on a WMS session: the stdout and stderr the real lsst.ctrl.bps Parsl plugin wrote for a
job under the submit path (``<submitPath>/logs/<job>.stdout|.stderr``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("lsst.ctrl.bps.parsl")

from flowbus.schemas import BackendRejected, State, StateChanged
from support import wms_run as _wr
from support.wms_run import Running

wms = _wr.wms

pytestmark = pytest.mark.timeout(90)




def run_two(w: Running) -> str:
    r = w.call("submit_workflow", {"name": "lg", "jobs": [
        {"name": "talk", "command": ["bash", "-c", "echo parsl-out-line; echo parsl-err-line >&2; seq 1 2000"]},
        {"name": "fail", "command": ["bash", "-c", "echo going down >&2; exit 5"]}]})
    wid: str = r["wms_id"]
    w.final(wid)
    return wid


class TestWmsLogs:
    """What the Parsl plugin wrote, by the job's bus key."""

    def test_stdout_and_stderr_of_jobs(self, wms: Callable[..., Running]) -> None:
        """Both parts of a succeeded and a failed job, with their paths under <submitPath>/logs."""
        w = wms()
        wid = run_two(w)
        assert w.final(f"{wid}/fail").state is State.ABORTED
        got = w.call("logs", f"{wid}/talk")
        parts = {p["name"]: p for p in got["parts"]}
        assert got["key"] == f"{wid}/talk" and set(parts) == {"stdout", "stderr"}, got
        assert parts["stdout"]["path"] == str(Path(wid) / "logs" / "talk.stdout"), parts["stdout"]["path"]
        assert parts["stdout"]["text"].startswith("parsl-out-line\n1\n") and parts["stdout"]["text"].endswith("2000\n")
        assert "parsl-err-line" in parts["stderr"]["text"]
        failed = {p["name"]: p["text"] for p in w.call("logs", f"{wid}/fail")["parts"]}
        assert "going down" in failed["stderr"], failed

    def test_max_bytes_and_an_earlier_run(self, wms: Callable[..., Running]) -> None:
        """max_bytes keeps the end; a second session, which did not run the job, finds the files too."""
        w = wms()
        wid = run_two(w)
        parts = {p["name"]: p for p in w.call("logs", f"{wid}/talk", max_bytes=10)["parts"]}
        assert parts["stdout"]["text"] == "1999\n2000\n" and parts["stdout"]["truncated"], parts["stdout"]
        w.halt()
        w.session.stop()
        known = {e.key: e for e in w.rec.events if isinstance(e, StateChanged)}  # what the journal would hold
        again = wms("w1", known=known)
        parts = {p["name"]: p for p in again.call("logs", f"{wid}/talk")["parts"]}
        assert "parsl-out-line" in parts["stdout"]["text"], parts

    def test_workflow_key_and_unknown_key(self, wms: Callable[..., Running]) -> None:
        """A workflow key gives a reason naming its jobs; an unknown key is BackendRejected naming it."""
        w = wms()
        wid = run_two(w)
        whole = w.call("logs", wid)
        assert whole["parts"] == [] and f"{wid}/talk" in whole["reason"], whole
        with pytest.raises(BackendRejected, match=r"logs: unknown workflow or job '/nope/x'"):
            w.call("logs", "/nope/x")
