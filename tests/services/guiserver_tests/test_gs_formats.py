"""Where the real guiServer differs from the old emulator (docs/protocols/guiserver.md §6.1a): the
emulator reproduces it, and the session works with the real formats.

Every wait is on the recorder's condition, never a sleep.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from flowbus.schemas import BackendRejected, LogLine, State
from flowbus.services.guiserver import messages as gx
from flowbus.services.guiserver.protocol import PacketId, StreamKind, encode
from flowbus.services.guiserver_emulator import GuiserverEmulator
from support.guiserver import (
    Host,
    emulator_fixture,  # noqa: F401 - provides the `emulator` fixture
    host_fixture,  # noqa: F401 - provides the `host` fixture
    job_host,
)


@pytest.mark.timeout(60)
class TestLs:
    """ls prints what GNU ls prints after the shell's glob expansion."""

    def test_directory_gives_bare_names(self, emulator: Callable[..., GuiserverEmulator],
                                        host: Callable[..., Host]) -> None:
        """A directory gives its entry names (dot files only with -a); -d gives the path itself."""
        emu = emulator()
        for name in ("b.input", "a.input", ".hidden"):
            emu.real(f"/data/exp/{name}").write_text("x")
        h = host(emu.port)
        assert h.session.call("ls", "/data/exp") == ["a.input", "b.input"]
        assert h.session.call("ls", "/data/exp", "-a") == [".", "..", ".hidden", "a.input", "b.input"]
        assert h.session.call("ls", "/data/exp", "-d") == ["/data/exp"]
        assert h.session.call("ls", "/data/exp/a.input") == ["/data/exp/a.input"]
        assert h.session.call("ls", "/data/exp", "-r") == ["b.input", "a.input"]

    def test_long_format(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """-l gives a `total N` line, then one long line per entry ending in its name."""
        emu = emulator()
        emu.real("/data/exp/a.input").write_text("hello")
        h = host(emu.port)
        lines = h.session.call("ls", "/data/exp", "-l")
        assert lines[0].startswith("total ") and lines[0].split()[1].isdigit()
        assert len(lines) == 2 and lines[1].startswith("-rw") and lines[1].endswith(" a.input")
        assert lines[1].split()[4] == "5"  # the size column
        assert h.session.call("ls", "/data/exp/*.input", "-l")[0].endswith(" /data/exp/a.input")  # no total

    def test_glob_over_directories(self, emulator: Callable[..., GuiserverEmulator],
                                   host: Callable[..., Host]) -> None:
        """A glob matching files and directories: the files first, then each directory under a header."""
        emu = emulator()
        emu.real("/data/exp/d1").mkdir()
        emu.real("/data/exp/d1/x").write_text("")
        emu.real("/data/exp/dfile").write_text("")
        h = host(emu.port)
        assert h.session.call("ls", "/data/exp/d*") == ["/data/exp/dfile", "", "/data/exp/d1:", "x"]
        assert h.session.call("ls", "/data/exp/nothing*") == []  # ls only complains on its stderr


@pytest.mark.timeout(60)
class TestCalcOnlyGlob:
    """A calc-only run whose glob matches nothing makes guiServer create files literally named."""

    def test_emulator_creates_literal_files(self, emulator: Callable[..., GuiserverEmulator],
                                            host: Callable[..., Host]) -> None:
        """Sent as the server gets it (bypassing the session's check): `exp_*.calc` and `exp_*.im` appear."""
        emu = emulator()
        h = host(emu.port)
        with h.session._lock:
            port = h.session._open_port(StreamKind.RAW, frozenset())
        doc = gx.build("DifxVex2DifxRun", [("passPath", "/data/exp"), ("file", "exp_*"), ("calcCommand", "calcif2"),
                                           ("calcOnly", 1), ("port", port)])
        h.session._send(encode(PacketId.COMMAND, doc))
        h.rec.wait_for(lambda e: any(isinstance(x, LogLine) and x.message == "calcif2 complete" for x in e))
        assert emu.real("/data/exp/exp_*.calc").is_file() and emu.real("/data/exp/exp_*.im").is_file()

    def test_session_refuses(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """The session asks ls first and refuses a calc-only name or glob that matches no .calc file."""
        emu = emulator()
        h = host(emu.port)
        with pytest.raises(BackendRejected, match=r"matches no \.calc file"):
            h.session.call("vex2difx", "/data/exp", "exp_*", calc_only=True)
        assert h.session.call("ls", "/data/exp") == []  # nothing was created
        emu.real("/data/exp/exp_1.calc").write_text("")
        assert h.session.call("vex2difx", "/data/exp", "exp_*", calc_only=True) == ["/data/exp/exp_1.im"]


@pytest.mark.timeout(60)
class TestErrorThenOutput:
    """An error line followed by more output ends as 120 or as 119, by the server's thread timing."""

    @pytest.mark.parametrize(("outcome", "state", "native"), [
        ("partial", State.COMPLETE, "JOB_ENDED_WITH_ERRORS"),
        ("partial_failed", State.ABORTED, "JOB_FAILED"),
    ])
    def test_both_orders(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host],
                         outcome: str, state: State, native: str) -> None:
        """Either end is a final state whose detail names the job's error line."""
        _emu, h, inp = job_host(emulator, host, outcomes={"job_1": outcome})
        result = h.session.call("start_job", inp, wait=True, timeout=10)
        assert (result["state"], result["native"]) == (state.value, native)
        assert "Error: disk read failed" in result["detail"]


@pytest.mark.timeout(60)
class TestDifxlogTiming:
    """The .difxlog is empty while the job runs and written when it ends."""

    def test_no_status_while_running(self, emulator: Callable[..., GuiserverEmulator],
                                     host: Callable[..., Host]) -> None:
        """job_status says NO_STATUS for a running job, its final state once it ended."""
        emu, h, inp = job_host(emulator, host, outcomes={"job_1": "slow"})
        h.session.call("start_job", inp)
        h.rec.wait_for(lambda e: any(isinstance(x, LogLine) and x.message == "tick 2" for x in e))
        [row] = h.session.call("job_status", "/data/exp/job_1.input")
        assert (row["native"], row["state"]) == ("NO_STATUS", None)
        emu._jobs[inp].finish.set()
        assert h.session.call("wait_job", "job_1", timeout=10)["state"] == "complete"
        [row] = h.session.call("job_status", "/data/exp/job_1.input")
        assert (row["native"], row["state"]) == ("Done", "complete")


@pytest.mark.timeout(60)
class TestOptionLikeNames:
    """Names the server's command would take as options are refused before anything is sent."""

    @pytest.mark.parametrize("name", ["-f.v2d", "--help", "-rf"])
    def test_vex2difx_name(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host],
                           name: str) -> None:
        """A vex2difx file name starting with '-' is refused."""
        emu = emulator()
        h = host(emu.port)
        sent = len(emu.received)
        with pytest.raises(BackendRejected, match="as an option"):
            h.session.call("vex2difx", "/data/exp", name)
        assert len(emu.received) == sent


@pytest.mark.timeout(60)
class TestDestructive:
    """rm, rmdir, mv, cp/send_file destinations and forced jobs stay strictly inside allowed-dirs."""

    @pytest.mark.parametrize(("allowed", "op", "args"), [
        ([], "rm", ("/*", "-rf")),  # the default config: nothing destructive at all
        ([], "rm", ("/data/exp/a",)),
        ([], "rmdir", ("/data/exp/sub",)),
        ([], "mv", ("/data/exp/a", "/data/exp/b")),
        ([], "cp", ("/data/exp/a", "/data/exp/b")),
        ([], "send_file", ("/data/exp/a", b"x")),
        ([], "start_job", ("/data/exp/job_1.input",), ),
        (["/"], "rm", ("/*", "-rf")),  # '/' as an allowed directory allows nothing destructive
        (["/data"], "rm", ("/",)),
        (["/data"], "rm", ("/data", "-rf")),  # the allowed directory itself
        (["/data"], "rm", ("/data/",)),
        (["/data"], "rm", ("/dat*", "-rf")),  # a glob reaching outside
        (["/data"], "rm", ("/etc/passwd",)),
        (["/data/exp"], "cp", ("/data/exp/a", "/data/b")),
    ])
    def test_refused(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host],
                     allowed: list[str], op: str, args: tuple[object, ...]) -> None:
        """Each call raises BackendRejected and nothing reaches the server."""
        emu = emulator()
        h = host(emu.port, allowed_dirs=allowed)
        sent = len(emu.received)
        kwargs = {"force": True} if op == "start_job" else {}
        with pytest.raises(BackendRejected, match="allowed"):
            h.session.call(op, *args, **kwargs)
        assert len(emu.received) == sent

    def test_inside_allowed(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """Inside an allowed directory rm works, globs included."""
        emu = emulator()
        emu.real("/data/exp/a.txt").write_text("")
        h = host(emu.port, allowed_dirs=["/data"])
        h.session.call("rm", "/data/exp/*.txt")
        assert h.session.call("ls", "/data/exp") == []


@pytest.mark.timeout(60)
class TestVersionEnvironment:
    """version() hides the server's environment unless asked for."""

    def test_hidden_unless_asked(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """By default only the number of variables; environment=True returns them."""
        emu = emulator(environment={"SECRET_TOKEN": "abc", "HOME": "/home/difx"})
        h = host(emu.port)
        info = h.session.call("version")
        assert info["environment"] == 2 and "abc" not in repr(info)
        assert h.session.call("version", environment=True)["environment"] == ["SECRET_TOKEN=abc", "HOME=/home/difx"]
