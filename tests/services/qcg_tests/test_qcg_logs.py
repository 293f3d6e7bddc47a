"""``logs`` on a QCG session: the stdout and stderr a real QCG-PilotJob manager wrote for a job
and for each iteration, in both job forms."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from flowbus.schemas import BackendRejected, State
from support.qcg import (
    Running,
    qcg_fixture,  # noqa: F401 - provides the `qcg` fixture
    reached,
)

pytestmark = [pytest.mark.qcg, pytest.mark.timeout(60)]


class TestQcgLogs:
    """What the manager wrote, read back by key."""

    def test_stdout_and_stderr_of_a_job(self, qcg: Callable[..., Running], tmp_path: Path) -> None:
        """A keyword-form job's stdout and stderr come back with their paths in the manager's wd."""
        run = qcg()
        run.call("submit", [{"name": "talk", "script": "echo out-of-talk; echo err-of-talk >&2",
                             "stdout": "talk.out", "stderr": "talk.err"}])
        run.rec.wait_for(reached("talk", State.COMPLETE), 20, "talk complete")
        got = run.call("logs", "talk")
        parts = {p["name"]: p for p in got["parts"]}
        assert got["key"] == "talk" and set(parts) == {"stdout", "stderr"}, got
        assert parts["stdout"]["text"] == "out-of-talk\n" and parts["stderr"]["text"] == "err-of-talk\n"
        assert parts["stdout"]["path"] == str(tmp_path / "wd0" / "talk.out")
        assert not parts["stdout"]["truncated"]

    def test_iterations_by_name_colon_n(self, qcg: Callable[..., Running]) -> None:
        """Each iteration ``name:N`` has its own output (``${it}`` in the names); the job itself says to ask one."""
        run = qcg()
        run.call("submit", [{"name": "ens", "exec": "/bin/echo", "args": ["member-${it}"], "iteration": 3,
                             "stdout": "ens_${it}.out"}])
        run.rec.wait_for(reached("ens", State.COMPLETE), 20, "ens complete")
        for i in range(3):
            [part] = run.call("logs", f"ens:{i}")["parts"]
            assert part["text"] == f"member-{i}\n", part
        whole = run.call("logs", "ens")
        assert whole["parts"] == [] and "'ens:N'" in whole["reason"], whole

    def test_job_json_and_max_bytes(self, qcg: Callable[..., Running]) -> None:
        """QCG's own job JSON form is read too; max_bytes keeps the end, marked truncated."""
        run = qcg()
        run.call("submit", [{"name": "std", "execution": {"exec": "/usr/bin/seq", "args": ["1", "2000"],
                                                          "stdout": "std.out"},
                             "resources": {"numCores": {"exact": 1}}}])
        run.rec.wait_for(reached("std", State.COMPLETE), 20, "std complete")
        [part] = run.call("logs", "std", max_bytes=10)["parts"]
        assert part["truncated"] and part["text"] == "1999\n2000\n", part

    def test_no_output_and_unknown_job(self, qcg: Callable[..., Running]) -> None:
        """A job without stdout/stderr gives a reason; an unknown job is BackendRejected naming it."""
        run = qcg()
        run.call("submit", [{"name": "mute", "exec": "/bin/true"}])
        run.rec.wait_for(reached("mute", State.COMPLETE), 20, "mute complete")
        got = run.call("logs", "mute")
        assert got["parts"] == [] and "without stdout/stderr" in got["reason"], got
        with pytest.raises(BackendRejected, match=r"logs: unknown job 'ghost'"):
            run.call("logs", "ghost")
        with pytest.raises(BackendRejected, match=r"logs: unknown job 'mute:1'.*no iterations"):
            run.call("logs", "mute:1")
        with pytest.raises(BackendRejected, match=r"logs: max_bytes"):
            run.call("logs", "mute", max_bytes=2_000_000)
