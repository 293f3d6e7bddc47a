"""What ``ls <flags> <operands>`` prints on the real server (GNU ls, after the shell expanded the
glob), computed inside the emulator's sandbox; nothing is run."""

from __future__ import annotations

import glob
import grp
import os
import pwd
import stat
import time
from pathlib import Path
from typing import Any


def ls_lines(emu: Any, target: Path, arg: str) -> list[str]:
    """The stdout lines (no newline). A pattern that matches nothing prints only to stderr."""
    flags = {ch for word in arg.split() if word.startswith("-") for ch in word[1:]}
    hits = sorted(glob.glob(str(target))) if glob.has_magic(str(target)) else (
        [str(target)] if os.path.lexists(target) else [])
    files = [h for h in hits if "d" in flags or not os.path.isdir(h)]
    dirs = [h for h in hits if h not in files]
    out = _block(emu, [(emu.client_path(h), h) for h in files], flags, total=False)
    many = len(hits) > 1
    for i, d in enumerate(dirs):
        names = sorted(os.listdir(d)) + ([".", ".."] if "a" in flags else [])
        if "a" not in flags:
            names = [n for n in names if not n.startswith(".")]
        if many:
            out += ([""] if out or i else []) + [f"{emu.client_path(d)}:"]
        out += _block(emu, [(n, os.path.join(d, n)) for n in names], flags, total=True)
    return out


def _block(emu: Any, entries: list[tuple[str, str]], flags: set[str], *, total: bool) -> list[str]:
    """One group of entries (shown name, real path), sorted and formatted as ls does."""
    info = [(shown, os.lstat(real)) for shown, real in entries]
    info.sort(key=lambda e: e[0])
    if "t" in flags:
        info.sort(key=lambda e: -e[1].st_mtime)
    elif "S" in flags:
        info.sort(key=lambda e: -e[1].st_size)
    if "r" in flags:
        info.reverse()
    if "l" not in flags:
        return [shown for shown, _ in info]
    lines = [f"total {sum(st.st_blocks for _, st in info) // 2}"] if total else []
    width = max((len(str(st.st_size)) for _, st in info), default=1)
    for shown, st in info:
        when = time.strftime("%b %e %H:%M", time.localtime(st.st_mtime))
        lines.append(f"{stat.filemode(st.st_mode)} {st.st_nlink} {_user(st.st_uid)} {_group(st.st_gid)} "
                     f"{st.st_size:>{width}} {when} {shown}")
    return lines


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
