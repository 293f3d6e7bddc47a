"""`flowbus logs SESSION KEY` as a user runs it: against a real `flowbus up` (a local QCG manager
under Ray), from another process; and how an answer is printed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowbus._cli_logs import render
from support.up import running_up

FLOWBUS = [sys.executable, "-m", "flowbus"]


def run(args: list[str], env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(FLOWBUS + args, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[dict[str, str]]:
    """`flowbus up` with one QCG session, its own state dir; stopped by SIGTERM, nothing left."""
    with running_up(tmp_path, "flowbus-cli-logs-test") as running:
        yield running.env
    assert running.code == 0, f"flowbus up exited {running.code}: {running.err_tail()}"
    assert not running.left, f"left behind: {running.left}"


class TestLogsAgainstUp:
    @pytest.mark.timeout(300)
    def test_logs_of_a_qcg_job(self, up: dict[str, str]) -> None:
        """The job's real output is printed; parts, bytes and JSON work; every error is one line, exit 1."""
        r = run(["submit", "qcg", "--script", "echo cli-out-line; echo cli-err-line >&2; seq 1 500",
                 "--name", "talker", "--stdout", "talker.out", "--stderr", "talker.err"], up)
        assert r.returncode == 0, r.stderr
        r = run(["submit", "qcg", "--exec", "/bin/true", "--name", "mute"], up)
        assert r.returncode == 0, r.stderr
        for job in ("talker", "mute"):
            r = run(["wait", f"qcg/local/state/{job} state=complete", "--timeout", "60"], up)
            assert r.returncode == 0, r.stderr
        r = run(["logs", "local", "talker"], up)
        assert r.returncode == 0, r.stderr
        assert "==> stdout (" in r.stdout and "cli-out-line\n1\n" in r.stdout and "cli-err-line" in r.stdout
        r = run(["logs", "local", "talker", "--part", "stderr"], up)
        assert (r.returncode, r.stdout) == (0, "cli-err-line\n"), (r.stdout, r.stderr)
        r = run(["logs", "local", "talker", "--part", "stdout", "--bytes", "8"], up)
        assert (r.returncode, r.stdout) == (0, "[... earlier output cut]\n499\n500\n"), (r.stdout, r.stderr)
        r = run(["logs", "local", "talker", "--json"], up)
        got = json.loads(r.stdout)
        assert r.returncode == 0 and got["key"] == "talker" and {p["name"] for p in got["parts"]} == {"stdout", "stderr"}
        problems = {
            "no log": (["logs", "local", "mute"], "without stdout/stderr"),
            "unknown part": (["logs", "local", "talker", "--part", "nope"], "no part 'nope'"),
            "unknown key": (["logs", "local", "ghost"], "unknown job 'ghost'"),
            "unknown session": (["logs", "nosuch", "talker"], "nosuch"),
            "bad bytes": (["logs", "local", "talker", "--bytes", "0"], "--bytes must be in 1..1048576"),
        }
        for what, (argv, text) in problems.items():
            r = run(argv, up)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 1 and len(lines) == 1 and text in lines[0], (what, r.stdout, r.stderr)


class TestRender:
    """How an answer is printed (the function the command uses)."""

    def test_one_part_is_printed_as_it_is(self) -> None:
        """A single part: its text alone, a final newline added when missing."""
        answer = {"key": "k", "parts": [{"name": "stdout", "path": "/x", "text": "a\nb", "truncated": False}]}
        assert render(answer) == ("a\nb\n", "")

    def test_several_parts_get_headers_and_cut_marks(self) -> None:
        """Several parts: a tail-style header each; a cut part says so first."""
        answer = {"key": "k", "parts": [{"name": "stdout", "path": "/o", "text": "x\n", "truncated": True},
                                        {"name": "messages", "path": None, "text": "", "truncated": False}]}
        text, reason = render(answer)
        assert reason == "" and text == "==> stdout (/o) <==\n[... earlier output cut]\nx\n==> messages <==\n"

    def test_no_parts_is_the_reason_on_one_line(self) -> None:
        """No parts: nothing to print, the reason with its line breaks folded."""
        assert render({"key": "k", "parts": [], "reason": "never\nran"}) == ("", "never ran")
