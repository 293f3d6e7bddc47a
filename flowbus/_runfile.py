"""The run file ``flowbus up`` writes (addresses of its broker and Ray) and the CLI reads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flowbus.bus import DEFAULT_ADDRESS


def state_dir() -> Path:
    path = Path(os.environ.get("FLOWBUS_STATE_DIR") or "~/.local/state/flowbus").expanduser()
    return path


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
    return data  # type: ignore[no-any-return]


def resolve_address(explicit: str | None = None) -> str:
    if explicit:
        return explicit
    env = os.environ.get("FLOWBUS_ADDRESS")
    if env:
        return env
    run = read_runfile()
    if run and run.get("request"):
        return str(run["request"])
    return DEFAULT_ADDRESS
