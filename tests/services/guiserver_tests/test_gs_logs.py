"""``logs`` on a guiServer session (against the emulator, a real server process speaking the
protocol): the DiFX messages of a job the session received, and its .difxlog fetched through the
server's file transfer."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from flowbus.schemas import BackendRejected
from flowbus.services.guiserver_emulator import GuiserverEmulator
from support.guiserver import (
    Host,
    emulator_fixture,  # noqa: F401 - provides the `emulator` fixture
    host_fixture,  # noqa: F401 - provides the `host` fixture
    job_host,
)

Emulator = Callable[..., GuiserverEmulator]
Hosts = Callable[..., Host]

pytestmark = pytest.mark.timeout(60)


class TestGuiserverLogs:
    """What the job said, as the session heard it and as the server logged it."""

    def test_messages_and_difxlog(self, emulator: Emulator, host: Hosts) -> None:
        """A finished job: its messages with their levels, and its .difxlog as the server wrote it."""
        emu, h, inp = job_host(emulator, host, outcomes={"job_1": "warning"})
        h.session.call("start_job", inp, wait=True, timeout=10)
        got = h.session.call("logs", "job_1")
        parts = {p["name"]: p for p in got["parts"]}
        assert got["key"] == "job_1" and set(parts) == {"messages", "difxlog"}, got
        assert "[warning] WARNING: weak signal\n" in parts["messages"]["text"]
        assert "[info] tick 1\n" in parts["messages"]["text"] and parts["messages"]["path"] is None
        on_disk = emu.real("/data/exp/job_1.difxlog").read_text()
        assert on_disk and parts["difxlog"]["text"] == on_disk, parts["difxlog"]
        assert parts["difxlog"]["path"] == "/data/exp/job_1.difxlog"

    def test_max_bytes_keeps_the_end(self, emulator: Emulator, host: Hosts) -> None:
        """max_bytes keeps the end of each part, marked truncated."""
        _emu, h, inp = job_host(emulator, host, outcomes={"job_1": "warning"})
        h.session.call("start_job", inp, wait=True, timeout=10)
        whole = {p["name"]: p["text"] for p in h.session.call("logs", "job_1")["parts"]}
        cut = {p["name"]: p for p in h.session.call("logs", "job_1", max_bytes=12)["parts"]}
        for name, text in whole.items():
            assert cut[name]["text"] == text.encode()[-12:].decode(errors="ignore") and cut[name]["truncated"], name

    def test_job_without_difxlog(self, emulator: Emulator, host: Hosts) -> None:
        """A job that never ran (missing .input) has its error messages; the missing .difxlog is not a part."""
        h = host(emulator().port)
        h.session.call("start_job", "/data/exp/nothere.input", wait=True, timeout=10)
        parts = {p["name"]: p for p in h.session.call("logs", "nothere")["parts"]}
        assert set(parts) == {"messages"} and "[error] FAILURE_INPUTFILE_NOT_FOUND" in parts["messages"]["text"], parts

    def test_unknown_job(self, emulator: Emulator, host: Hosts) -> None:
        """A job the session does not know is BackendRejected naming it; bad max_bytes too."""
        _emu, h, inp = job_host(emulator, host)
        with pytest.raises(BackendRejected, match=r"logs: unknown job 'ghost'"):
            h.session.call("logs", "ghost")
        h.session.call("start_job", inp, wait=True, timeout=10)
        with pytest.raises(BackendRejected, match=r"logs: max_bytes"):
            h.session.call("logs", "job_1", max_bytes=-5)
