"""Retention in a soma-workflow session (a real soma controller): with ``forget-in-backend``
opted in, a finished workflow past retention is deleted in soma and forgotten by the session;
by default soma keeps it and only the bus forgets it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from flowbus.schemas import BackendRejected, Forgotten, State, StateChanged
from support import soma as _fx
from support.soma import Running

soma_session = _fx.soma_session
pytestmark = pytest.mark.timeout(90)


def _workflow(run: Running) -> int:
    wf = run.call("submit_workflow", {"name": "r", "jobs": [{"name": "j0", "command": ["true"]}]})
    assert isinstance(wf, int)
    return wf


def _forgotten(run: Running, key: str) -> Forgotten:
    found: Forgotten = run.rec.wait_for(
        lambda evs: next((e for e in evs if isinstance(e, Forgotten) and e.key == key), None), 30, f"{key} forgotten")
    return found


def test_opted_in_deletes_the_workflow(soma_session: Callable[..., Running]) -> None:
    run = soma_session(retain_hours=0.0, retain_count=0, forget_in_backend=True)
    wf = _workflow(run)
    gone = _forgotten(run, str(wf))
    assert (gone.last_state, gone.in_backend) == (State.COMPLETE, True)
    assert _forgotten(run, f"{wf}/j0").last_state is State.COMPLETE
    with pytest.raises(BackendRejected, match=f"workflow id {wf} is not valid"):
        run.call("workflow_status", wf)
    assert wf not in run.session._seen and not run.session._tracker.keys_of(wf)
    deleted = [e for e in run.rec.of(StateChanged, str(wf)) if e.native == ""]
    assert not deleted, "forgetting is not reported as a deletion"


def test_by_default_soma_keeps_it(soma_session: Callable[..., Running]) -> None:
    run = soma_session(retain_hours=0.0, retain_count=0)
    wf = _workflow(run)
    assert _forgotten(run, str(wf)).in_backend is False
    assert run.call("workflow_status", wf) == "workflow_done"
