"""The QCG session's submitted job specs on disk, so a restarted session can resubmit them.

One JSON file beside the manager's working directory (``<wd>/.flowbus/specs.json``), replaced
atomically (a temporary file in the same directory, then ``os.replace``) after every change. A
file that cannot be read or does not hold specs is reported by name and ignored: the session
goes on with no specs rather than failing to start or resubmitting something bogus.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

#: the directory inside the manager's working directory that holds flowbus' own files
STATE_DIR = ".flowbus"
SPECS_FILE = "specs.json"
_VERSION = 1

log = structlog.get_logger("flowbus.qcg")


def specs_path(wd: Path) -> Path:
    return wd / STATE_DIR / SPECS_FILE


def load_specs(path: Path, session: str) -> dict[str, dict[str, Any]]:
    """The specs saved at ``path`` (name -> ``Jobs.add`` keywords, in submission order); empty
    when there is no file. An unreadable or malformed file is logged as an error naming it and
    yields no specs."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.error("qcg.specs.unreadable", session_id=session, file=str(path), error=str(exc))
        return {}
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("version") != _VERSION or not isinstance(doc.get("specs"), list):
            raise ValueError(f"expected {{'version': {_VERSION}, 'specs': [...]}}")
        out: dict[str, dict[str, Any]] = {}
        for i, spec in enumerate(doc["specs"]):
            name = spec.get("name") if isinstance(spec, dict) else None
            if not isinstance(name, str) or not name or ":" in name:
                raise ValueError(f"specs[{i}] is not a job spec with a valid 'name'")
            out[name] = spec
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        log.error("qcg.specs.corrupt", session_id=session, file=str(path), error=str(exc),
                  action="continuing without saved specs")
        return {}
    log.info("qcg.specs.loaded", session_id=session, file=str(path), jobs=len(out))
    return out


def save_specs(path: Path, session: str, specs: Mapping[str, Mapping[str, Any]]) -> bool:
    """Replace the file at ``path`` with ``specs`` atomically; False (logged) when it failed."""
    tmp = ""
    try:
        data = json.dumps({"version": _VERSION, "session": session, "specs": list(specs.values())})
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{SPECS_FILE}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return True
    except (OSError, TypeError, ValueError) as exc:  # TypeError/ValueError: a spec JSON cannot hold
        log.error("qcg.specs.save_failed", session_id=session, file=str(path), error=str(exc))
        if tmp:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return False


def remove_specs(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


__all__ = ["STATE_DIR", "load_specs", "remove_specs", "save_specs", "specs_path"]
