"""Argument checks before anything reaches guiServer, which pastes strings into shell commands
(docs/protocols/guiserver.md §8). Every refusal is a :class:`~flowbus.schemas.BackendRejected` and nothing is sent."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Sequence

from flowbus.schemas import BackendRejected

from . import messages as gx

#: characters a path may contain (no whitespace, quotes, $, `, ;, |, &, <, >, (, ), \, !, ~, #, *)
_PATH = re.compile(r"/[A-Za-z0-9_./+@:=,%-]*")
_GLOB = re.compile(r"/[A-Za-z0-9_./+@:=,%*?-]*")
_ARGS = re.compile(r"(-[A-Za-z]{1,8})( -[A-Za-z]{1,8}){0,4}")
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,62}")
_FUNCTIONS = ("default", "NRAO", "USNO", "RUN_MONITOR", "CONFIG_ONLY", "BAIL_ON_CONFIG_FAIL")
_MAX_PATH = 900  # guiServer builds commands in 1024-byte buffers and truncates silently


def path(value: object, allowed: Sequence[str] = (), *, glob: bool = False, what: str = "path") -> str:
    """An absolute, normalised path of safe characters, inside ``allowed`` when that is set."""
    if not isinstance(value, str):
        raise BackendRejected(f"{what}: expected a string, got {type(value).__name__}")
    if len(value) > _MAX_PATH:
        raise BackendRejected(f"{what}: longer than {_MAX_PATH} characters")
    if not (_GLOB if glob else _PATH).fullmatch(value):
        raise BackendRejected(f"{what} {value!r}: must be absolute and use only letters, digits and _./+@:=,%-"
                              + ("*?" if glob else ""))
    parts = value.split("/")
    if ".." in parts or "." in parts or (posixpath.normpath(value) != value.rstrip("/") and value != "/"):
        raise BackendRejected(f"{what} {value!r}: must be normalised (no '.', '..' or '//')")
    if allowed and not any(value == d or value.startswith(d.rstrip("/") + "/") for d in allowed):
        raise BackendRejected(f"{what} {value!r}: outside the allowed directories {list(allowed)}")
    return value


def destructive(value: object, allowed: Sequence[str], *, glob: bool = False, what: str = "path") -> str:
    """A path an operation may delete or overwrite (rm, rmdir, mv, cp/send_file destinations, the
    output a forced job removes): checked as :func:`path`, and then strictly inside one of the
    ``allowed`` directories other than ``/``. With no such directory configured nothing may be
    deleted or overwritten."""
    checked = path(value, allowed, glob=glob, what=what)
    roots = [d.rstrip("/") for d in allowed if d.rstrip("/")]
    if not roots:
        raise BackendRejected(f"{what} {checked!r}: deleting or overwriting needs allowed-dirs configured "
                              "(a directory other than '/')")
    if not any(checked.startswith(d + "/") and checked != d + "/" for d in roots):
        raise BackendRejected(f"{what} {checked!r}: not strictly inside the allowed directories {roots}")
    return checked


def args(value: object, *, allowed_flags: str) -> str:
    """Option flags such as ``-r`` or ``-l -t``: only letters from ``allowed_flags``."""
    if value in ("", None):
        return ""
    if not isinstance(value, str) or not _ARGS.fullmatch(value):
        raise BackendRejected(f"arguments {value!r}: only flags like '-r' or '-l -t' are accepted")
    bad = {ch for ch in value if ch.isalpha()} - set(allowed_flags)
    if bad:
        raise BackendRejected(f"arguments {value!r}: flags {''.join(sorted(bad))} not allowed here")
    return value


def nodes(value: object, what: str) -> list[str]:
    names = value.split() if isinstance(value, str) else list(value) if isinstance(value, Iterable) else None
    if names is None or not all(isinstance(n, str) and _NODE.fullmatch(n) for n in names):
        raise BackendRejected(f"{what} {value!r}: host names of letters, digits, '_', '.', '-' only")
    return names


def label(value: object, what: str) -> str:
    if not isinstance(value, str) or not _LABEL.fullmatch(value):
        raise BackendRejected(f"{what} {value!r}: letters, digits and _.+- only")
    return value


def function(value: object) -> str:
    if value not in _FUNCTIONS:
        raise BackendRejected(f"function {value!r}: one of {', '.join(_FUNCTIONS)}")
    return str(value)


def selection(tokens: object) -> list[str]:
    known = {"ALL_MESSAGES", "SELECTED_MESSAGES", *gx.SELECTION_TOKENS}
    if isinstance(tokens, str):
        tokens = [tokens]
    if not isinstance(tokens, list | tuple) or not all(isinstance(t, str) and t in known for t in tokens):
        raise BackendRejected(f"message selection {tokens!r}: tokens from {sorted(known)}")
    return list(tokens)


def file_name(value: object, *, glob: bool = False) -> str:
    """A bare file name (no directory) such as ``exp.v2d``, or a job-name glob like ``exp_*``."""
    pattern = r"[A-Za-z0-9_.+*?-]{1,200}" if glob else r"[A-Za-z0-9_.+-]{1,200}"
    if not isinstance(value, str) or not re.fullmatch(pattern, value) or value in (".", ".."):
        raise BackendRejected(f"file {value!r}: a bare name of letters, digits and _.+-" + ("*?" if glob else ""))
    if value.startswith("-"):
        raise BackendRejected(f"file {value!r}: starts with '-', which the server's command would take as an option")
    return value


def job_name(input_path: str) -> str:
    """The job name guiServer derives from an ``.input`` path: basename without extension."""
    base = input_path.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base
