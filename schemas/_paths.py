"""Where flowbus keeps its state, made private. Kept apart from the config types (and msgspec)
so that a short-lived command can find the state dir cheaply."""

from __future__ import annotations

import os
from pathlib import Path

from ._errors import ConfigError

DEFAULT_STATE_DIR = "~/.local/state/flowbus"


def private_state_dir(configured: str = "") -> Path:
    """The state directory (``configured``, else ``$FLOWBUS_STATE_DIR``, else
    ``~/.local/state/flowbus``), created on demand, private: mode 0700 (an existing one of ours is
    tightened to it). Raises ``ConfigError`` when it cannot be made, is not a directory, or
    belongs to another user (whoever owns it could read or replace our run file and keys)."""
    raw = configured or os.environ.get("FLOWBUS_STATE_DIR") or DEFAULT_STATE_DIR
    path = Path(raw).expanduser()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
        if st.st_uid != os.getuid():
            raise ConfigError(f"state-dir {str(path)!r} belongs to another user (uid {st.st_uid}); "
                              f"use a directory of your own")
        if st.st_mode & 0o777 != 0o700:
            path.chmod(0o700)
    except OSError as exc:  # FileExistsError: a file there; PermissionError: not ours to make
        raise ConfigError(f"state-dir {str(path)!r}: {exc.strerror or exc}") from None
    return path
