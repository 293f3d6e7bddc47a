"""``flowbus logs SESSION KEY``: a job's output, through the session's ``logs`` operation.

Several parts (stdout and stderr, DiFX messages and the .difxlog) are printed one after the
other under a ``==> name (path) <==`` header, as ``tail`` prints several files; a part whose
start was cut says so first. No log: the backend's reason on one line, exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flowbus.schemas import FlowbusError

#: shown by ``flowbus logs --help``
EXAMPLES = ["flowbus logs ops /demo/f1/t1                 # an ecFlow task's job output (current try)",
            "flowbus logs local ens:2 --part stderr       # a QCG iteration's stderr",
            "flowbus logs difx job1 --bytes 4096 --json"]
ABOUT = "a job's output: ecFlow job output, QCG/soma/Parsl stdout and stderr, DiFX job messages"
#: the bounds of ``--bytes`` (the backends' own)
MAX_BYTES = 1048576


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("session", help="the session's name (as in the config and on the bus)")
    sp.add_argument("key", help="the resource key as on the bus: an ecFlow task path, a QCG job (name:N for an "
                    "iteration), a soma '<workflow>/<job>', a WMS '<submit path>/<job>', a DiFX job name")
    sp.add_argument("--bytes", type=int, default=65536, metavar="N",
                    help=f"the last N bytes of each part (1..{MAX_BYTES}; default 65536)")
    sp.add_argument("--part", metavar="NAME", help="only this part (e.g. stdout, stderr, messages, difxlog)")
    sp.add_argument("--json", action="store_true", help="the answer as JSON: {key, parts: [{name, path, text, "
                    "truncated}], reason}")
    sp.add_argument("--timeout", type=float, default=60.0, metavar="S", help="give up after S seconds (default 60)")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def render(answer: dict[str, Any], part: str | None = None) -> tuple[str, str]:
    """The text to print and, when there is nothing to print, the reason (one line)."""
    parts = [p for p in answer.get("parts") or [] if isinstance(p, dict)]
    if part is not None:
        names = [str(p.get("name")) for p in parts]
        parts = [p for p in parts if p.get("name") == part]
        if not parts:
            have = ", ".join(names) if names else "none"
            return "", f"no part {part!r} in the log of {answer.get('key')!r} (parts: {have})"
    if not parts:
        return "", _one_line(answer.get("reason") or "no log")
    out: list[str] = []
    for p in parts:
        if len(parts) > 1:
            where = f" ({p['path']})" if p.get("path") else ""
            out.append(f"==> {p.get('name')}{where} <==\n")
        if p.get("truncated"):
            out.append("[... earlier output cut]\n")
        text = str(p.get("text", ""))
        out.append(text if not text or text.endswith("\n") else text + "\n")
    return "".join(out), ""


def cmd_logs(args: argparse.Namespace) -> int:
    from flowbus._cli import _session_call

    if not 1 <= args.bytes <= MAX_BYTES:
        raise FlowbusError(f"--bytes must be in 1..{MAX_BYTES}, got {args.bytes}")
    answer = _session_call(args, args.session, "logs", [args.key], {"max_bytes": args.bytes})
    if not isinstance(answer, dict):
        raise FlowbusError(f"logs on {args.session!r}: unexpected answer {type(answer).__name__}")
    text, reason = render(answer, args.part)
    if args.json:
        shown = answer if args.part is None else {**answer, "parts": [p for p in answer.get("parts") or []
                                                                     if p.get("name") == args.part]}
        print(json.dumps(shown, indent=2))
    else:
        sys.stdout.write(text)
    if reason:
        print(f"flowbus: {args.session} {args.key}: {reason}", file=sys.stderr)
        return 1
    return 0


__all__ = ["ABOUT", "EXAMPLES", "add_arguments", "cmd_logs", "render"]
