"""The QCG session's own files: the manager's working directory (:class:`WorkDir`) and the
submitted job specs kept there, so a restarted session can resubmit them.

The specs are one JSON file beside the manager's working directory (``<wd>/.flowbus/specs.json``), replaced
atomically (a temporary file in the same directory, then ``os.replace``) after every change. A
file that cannot be read or does not hold specs is reported by name and ignored: the session
goes on with no specs rather than failing to start or resubmitting something bogus.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

#: the directory inside the manager's working directory that holds flowbus' own files
STATE_DIR = ".flowbus"
SPECS_FILE = "specs.json"
_VERSION = 1
#: in ``<wd>/.flowbus/``: the wd is a temporary directory a session made (not a configured
#: ``wd``); whichever session ends the manager working there removes it
_TEMP_MARKER = "temporary"

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


class WorkDir:
    """The session's manager's working directory, and which directories are the session's to remove.

    The configured ``wd`` is kept. Without one, a temporary directory (0700) is made; it is removed
    when the session ends its manager (stop, kill), and marked so that a session adopting that
    manager after a move or a crash removes it in turn (:meth:`inheritable`). In mode ``local``
    the submitted specs live in the manager's wd (:meth:`load`, :meth:`save`).
    """

    def __init__(self, session: str, configured: str) -> None:
        self.session = session
        self.configured = configured
        self.path: Path | None = None
        self._own = False
        #: an adopted manager's temporary wd (made by an earlier incarnation): ours to remove
        #: once we end that manager, handed on again by :meth:`keep`
        self._inherited: Path | None = None
        #: where the submitted specs are kept (mode ``local`` only): beside the manager's wd
        self.specs_file: Path | None = None

    def prepare(self) -> Path:
        """The directory a manager started by this session works in (made on first use)."""
        if self.path is not None:
            return self.path
        if self.configured:
            path = Path(self.configured).expanduser()
            path.mkdir(parents=True, exist_ok=True)
        else:
            path = Path(tempfile.mkdtemp(prefix=f"flowbus-qcg-{self.session}-"))
            try:
                (path / STATE_DIR).mkdir(mode=0o700)
                (path / STATE_DIR / _TEMP_MARKER).write_text(f"made by flowbus session {self.session!r}; "
                                                             f"removed when its QCG manager is ended\n")
            except OSError:
                shutil.rmtree(path, ignore_errors=True)
                raise
            self._own = True
        self.path = path
        return path

    def inheritable(self, wd: Path) -> bool:
        """``wd`` is a temporary wd an earlier session of this user made for this session name:
        a real directory of ours holding our marker (no one else can make that file)."""
        try:
            d, marker = os.lstat(wd), os.lstat(wd / STATE_DIR / _TEMP_MARKER)
        except OSError:
            return False
        return (stat.S_ISDIR(d.st_mode) and stat.S_ISREG(marker.st_mode) and d.st_uid == marker.st_uid == os.getuid()
                and wd.name.startswith(f"flowbus-qcg-{self.session}-"))

    def load(self, manager_wd: Path | None) -> dict[str, dict[str, Any]]:
        """Use the spec file of ``manager_wd`` (an adopted manager's wd carrying our state
        directory) or else of this session's wd, and return what it holds."""
        own = self.prepare()
        wd = manager_wd or own
        if wd != own and self.inheritable(wd):
            self._inherited = wd
        (wd / STATE_DIR).mkdir(parents=True, exist_ok=True)
        self.specs_file = specs_path(wd)
        return load_specs(self.specs_file, self.session)

    def save(self, specs: Mapping[str, Mapping[str, Any]]) -> None:
        if self.specs_file is not None:
            save_specs(self.specs_file, self.session, specs)

    def drop_specs(self) -> None:
        """The manager's jobs ended with it: nothing is left to resubmit."""
        if self.specs_file is not None:
            remove_specs(self.specs_file)

    def keep(self) -> None:
        """Removed by no one here any more: a newer incarnation's now (``release``)."""
        self._own = False
        self._inherited = None

    def remove(self, *, inherited: bool = True) -> None:
        """Remove this session's temporary wd and (``inherited``: its manager was ended) the
        adopted one. Idempotent."""
        if self._own and self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self._own = False
        taken, self._inherited = self._inherited, None
        if taken is not None and inherited:
            shutil.rmtree(taken, ignore_errors=True)
            log.info("qcg.wd.removed", session_id=self.session, wd=str(taken), made_by="an earlier incarnation")


__all__ = ["STATE_DIR", "WorkDir", "load_specs", "remove_specs", "save_specs", "specs_path"]
