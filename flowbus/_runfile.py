"""The run file ``flowbus up`` writes (addresses of its broker and Ray) and the CLI reads.

It lives in the state directory, which is private (0700, see ``FlowbusConfig.state_path``); the
file itself is written 0600 and replaced atomically (:func:`write_private`)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from flowbus.schemas import private_state_dir


def state_dir() -> Path:
    """The state directory (``FLOWBUS_STATE_DIR``, else ``~/.local/state/flowbus``), created 0700;
    raises ``ConfigError`` when it is not a directory of ours."""
    return private_state_dir()


def write_private(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text``, readable by the owner only (0600), atomically: a reader
    sees the old content or the new one, never a part, and never a moment of wider mode (a
    temporary file in the same directory, then ``os.replace``)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)  # mkstemp's mode already; stated, not assumed
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def runfile_path(base: Path | None = None) -> Path:
    return (base or state_dir()) / "run.json"


def read_runfile(base: Path | None = None) -> dict[str, Any] | None:
    path = runfile_path(base)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = data.get("pid")
    if isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None  # left behind by a `flowbus up` that is gone
        except PermissionError:
            pass
    return data  # type: ignore[no-any-return]  # parsed JSON


def resolve_address(explicit: str | None = None) -> str:
    if explicit:
        return explicit
    env = os.environ.get("FLOWBUS_ADDRESS")
    if env:
        return env
    run = read_runfile()
    if run and run.get("request"):
        return str(run["request"])
    from flowbus.bus import default_address  # only here: the CLI's fast paths need no more of the bus

    return default_address()
