"""``logs`` on a soma-workflow session (light mode, real engine): the stdout and stderr soma kept
for a job, read back by the job's bus key ``<workflow id>/<job>``."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from flowbus.schemas import BackendRejected, State
from support import soma as _fx
from support.soma import Running

soma_session = _fx.soma_session
Session = Callable[..., Running]

pytestmark = pytest.mark.timeout(90)


def finished(run: Running) -> int:
    wf: int = run.call("submit_workflow", {"name": "lg", "jobs": [
        {"name": "talk", "command": ["bash", "-c", "echo soma-out-line; echo soma-err-line >&2; seq 1 3000"]},
        {"name": "fail", "command": ["bash", "-c", "echo failing now >&2; exit 4"]}]})
    run.state(str(wf), lambda e: e.state.final, 60, "the workflow's end")
    return wf


class TestSomaLogs:
    """The job's own output, by bus key."""

    def test_stdout_and_stderr_of_jobs(self, soma_session: Session) -> None:
        """A completed and a failed job: both parts, with the text the commands printed."""
        run = soma_session()
        wf = finished(run)
        assert run.rec.final(f"{wf}/fail").state is State.ABORTED
        got = run.call("logs", f"{wf}/talk")
        parts = {p["name"]: p for p in got["parts"]}
        assert got["key"] == f"{wf}/talk" and set(parts) == {"stdout", "stderr"}, got
        assert parts["stdout"]["text"].startswith("soma-out-line\n1\n") and parts["stdout"]["text"].endswith("3000\n")
        assert parts["stderr"]["text"] == "soma-err-line\n" and not parts["stdout"]["truncated"]
        failed = {p["name"]: p["text"] for p in run.call("logs", f"{wf}/fail")["parts"]}
        assert failed["stderr"] == "failing now\n", failed

    def test_max_bytes_keeps_the_end(self, soma_session: Session) -> None:
        """max_bytes cuts the start of the part, marked truncated."""
        run = soma_session()
        wf = finished(run)
        parts = {p["name"]: p for p in run.call("logs", f"{wf}/talk", max_bytes=10)["parts"]}
        assert parts["stdout"] == {"name": "stdout", "path": None, "text": "2999\n3000\n", "truncated": True}

    def test_workflow_key_and_unknown_keys(self, soma_session: Session) -> None:
        """A workflow key gives a reason naming its jobs; unknown job or workflow ids are BackendRejected."""
        run = soma_session()
        wf = finished(run)
        whole = run.call("logs", str(wf))
        assert whole["parts"] == [] and f"{wf}/talk" in whole["reason"], whole
        with pytest.raises(BackendRejected, match=rf"logs: unknown job '{wf}/ghost'.*talk"):
            run.call("logs", f"{wf}/ghost")
        with pytest.raises(BackendRejected, match="logs"):
            run.call("logs", "999999/talk")
        with pytest.raises(BackendRejected, match="logs: key must be"):
            run.call("logs", "talk")
