"""The examples of docs/sessions.md run as written, and the layout it draws is the tree's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowbus.schemas import BackendRejected, UnknownOperation

DOC = Path(__file__).resolve().parents[2] / "docs" / "sessions.md"


def test_the_operations_example_declares_an_operation() -> None:
    """The Operations example declares `suspend`; call() checks names and arguments."""
    (block,) = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    scope: dict[str, object] = {}
    exec(compile(block, str(DOC), "exec"), scope)  # noqa: S102  (our own documentation's example)
    ops = scope["OPS"]
    assert ops.names() == ["suspend"]  # type: ignore[attr-defined]
    assert ops.run(object(), "suspend", ["/s"], {}) is None  # type: ignore[attr-defined]
    with pytest.raises(UnknownOperation, match="known: suspend"):
        ops.run(object(), "resume", ["/s"], {})  # type: ignore[attr-defined]
    with pytest.raises(BackendRejected, match="suspend"):
        ops.run(object(), "suspend", [], {})  # type: ignore[attr-defined]


def test_the_drawn_layout_exists() -> None:
    """Every services/ path the page draws is in the tree."""
    text = DOC.read_text(encoding="utf-8")
    drawn = re.search(r"```\nservices/\n(.*?)```", text, re.DOTALL)
    assert drawn is not None
    root = DOC.parents[1] / "services"
    for line in drawn.group(1).splitlines():
        name = line.split()[0]
        assert (root / name).exists(), f"docs/sessions.md draws services/{name}, which is not in the tree"


def test_an_operations_error_names_the_operation() -> None:
    """An error raised inside an operation says which operation, once."""
    from flowbus.services import Operations

    ops: Operations[object] = Operations("doc")

    @ops.op
    def resume(session: object, path: str) -> None:
        raise BackendRejected(f"path {path!r} is not a node")

    @ops.op
    def requeue(session: object) -> None:
        raise BackendRejected("requeue: refused")

    with pytest.raises(BackendRejected) as info:
        ops.run(object(), "resume", ["/x"], {})
    assert str(info.value) == "resume: path '/x' is not a node"
    with pytest.raises(BackendRejected) as info:
        ops.run(object(), "requeue", [], {})
    assert str(info.value) == "requeue: refused"


def test_an_operations_own_time_bound() -> None:
    """Operations.bound: the ``timeout`` an operation will wait (given or by default), which a
    command running it waits at least; None without one or for arguments that do not fit."""
    from flowbus.services import Operations

    ops: Operations[object] = Operations("doc")

    @ops.op
    def wait_job(session: object, job: str, timeout: float = 60.0) -> None: ...

    @ops.op
    def wait_forever(session: object, job: str, timeout: float | None = None) -> None: ...

    @ops.op
    def stop(session: object) -> None: ...

    assert ops.bound("wait_job", ["j"], {}) == 60.0
    assert ops.bound("wait_job", ["j", 600], {}) == 600.0 == ops.bound("wait_job", [], {"job": "j", "timeout": 600})
    assert ops.bound("wait_forever", ["j"], {}) is None and ops.bound("stop", [], {}) is None
    assert ops.bound("wait_job", [], {}) is None and ops.bound("nope", [], {}) is None
