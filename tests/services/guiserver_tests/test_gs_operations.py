"""The file list (GENERATE_FILELIST) and the Mark5 pass-through operations against the emulator.

Every wait is bounded; no sleeps.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from flowbus.schemas import BackendRejected
from flowbus.services.guiserver.protocol import PacketId
from flowbus.services.guiserver_emulator import GuiserverEmulator
from support.guiserver import (
    Host,
    emulator_fixture,  # noqa: F401 - provides the `emulator` fixture
    host_fixture,  # noqa: F401 - provides the `host` fixture
)


@pytest.mark.timeout(60)
class TestFileList:
    """docs/protocols/guiserver.md §5.8."""

    def test_results(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """Each existing file gives a FILE_RESULT row; a missing one sets errors; the file is written."""
        emu = emulator()
        for name in ("a.vdif", "b.vdif"):
            emu.real(f"/data/exp/{name}").write_text("")
        h = host(emu.port)
        out = h.session.call("file_list", ["/data/exp/a.vdif", "/data/exp/b.vdif", "/data/exp/gone.vdif"],
                             "/data/exp/list.txt", "VDIF_5000-512-1-2", 60000)
        assert out["ok"] and out["processed"] == 2 and out["errors"]
        assert [r["file"] for r in out["results"]] == ["/data/exp/a.vdif", "/data/exp/b.vdif"]
        assert out["results"][0]["start"] < out["results"][0]["stop"]
        assert emu.real("/data/exp/list.txt").read_text().count("\n") == 2

    def test_destination_exists(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """An existing destination is cancelled (BackendRejected) unless overwrite, which replaces it."""
        emu = emulator()
        emu.real("/data/exp/a.vdif").write_text("")
        emu.real("/data/exp/list.txt").write_text("old\n")
        h = host(emu.port)
        args = (["/data/exp/a.vdif"], "/data/exp/list.txt", "VDIF", 60000)
        with pytest.raises(BackendRejected, match="exists"):
            h.session.call("file_list", *args)
        assert emu.real("/data/exp/list.txt").read_text() == "old\n"
        assert h.session.call("file_list", *args, overwrite=True)["ok"]
        assert "a.vdif" in emu.real("/data/exp/list.txt").read_text()

    @pytest.mark.parametrize(("args", "match"), [
        ((["/data/exp/a;id"], "/data/exp/l", "VDIF", 1), "file"),
        ((["/data/exp/a"], "/data/exp/l", "VDIF; id", 1), "format"),
        ((["/data/exp/a"], "/etc/l", "VDIF", 1), "allowed"),
        (([], "/data/exp/l", "VDIF", 1), "non-empty"),
    ])
    def test_refused(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host],
                     args: tuple[object, ...], match: str) -> None:
        """Unsafe names, formats and destinations are refused before anything is sent."""
        emu = emulator()
        h = host(emu.port)
        sent = len(emu.received)
        with pytest.raises(BackendRejected, match=match):
            h.session.call("file_list", *args)
        assert len(emu.received) == sent


@pytest.mark.timeout(60)
class TestMark5:
    """Mark5 operations pass through; the emulator has no units."""

    def test_mk5control(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host]) -> None:
        """mk5control returns the server's ERROR line and ok=False."""
        emu = emulator()
        h = host(emu.port)
        out = h.session.call("mk5control", "getvsn A", "mark5fx01")
        assert not out["ok"] and [p["id"] for p in out["packets"]] == ["STARTED", "ERROR", "ENDED_GRACEFULLY"]
        assert any(pid == PacketId.COMMAND and b"DifxMk5Control" in p for pid, p in emu.received)

    def test_get_directory_and_copy(self, emulator: Callable[..., GuiserverEmulator],
                                    host: Callable[..., Host]) -> None:
        """get_directory and mark5_copy end FAILED with the MPIRUN_ERROR text when the unit is unreachable."""
        h = host(emulator().port)
        out = h.session.call("get_directory", "mark5fx01", "NRAO+123")
        assert not out["ok"] and [p["id"] for p in out["packets"]] == ["STARTED", "MPIRUN_ERROR", "FAILED"]
        out = h.session.call("mark5_copy", "mark5fx01", "NRAO+123", "1-4,7", "/data/exp/copy")
        assert not out["ok"] and out["packets"][-1]["id"] == "FAILED"

    @pytest.mark.parametrize(("op", "args"), [
        ("mk5control", ("getvsn; id", "m")),
        ("mk5control", ("-x", "m")),
        ("mk5control", ("getvsn", "m n")),
        ("get_directory", ("m", "-rf")),
        ("mark5_copy", ("m", "V1", "1;id", "/data/exp/c")),
        ("mark5_copy", ("m", "V1", "1", "/etc/c")),
    ])
    def test_refused(self, emulator: Callable[..., GuiserverEmulator], host: Callable[..., Host],
                     op: str, args: tuple[object, ...]) -> None:
        """Shell characters, option-like words and destinations outside allowed-dirs are refused."""
        emu = emulator()
        h = host(emu.port)
        sent = len(emu.received)
        with pytest.raises(BackendRejected):
            h.session.call(op, *args)
        assert len(emu.received) == sent
