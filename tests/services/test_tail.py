"""The shared tail helper behind every backend's ``logs`` operation (services/_tail.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from flowbus.schemas import BackendRejected
from flowbus.services._tail import (
    LIMIT_MAX_BYTES,
    TailRing,
    check_max_bytes,
    decode_tail,
    file_part,
    file_parts,
    result,
)


class TestMaxBytes:
    """max_bytes is an int in 1..1048576; anything else is refused naming the operation."""

    @pytest.mark.parametrize("value", [1, 65536, LIMIT_MAX_BYTES])
    def test_in_range_is_kept(self, value: int) -> None:
        """Values in range come back as they are."""
        assert check_max_bytes(value) == value

    @pytest.mark.parametrize("value", [0, -1, LIMIT_MAX_BYTES + 1, True, 1.5, "10", None])
    def test_out_of_range_is_rejected(self, value: object) -> None:
        """Zero, negatives, too large, bools, floats and text are BackendRejected naming logs and the value."""
        with pytest.raises(BackendRejected) as info:
            check_max_bytes(value)
        assert "logs" in str(info.value) and repr(value) in str(info.value)


class TestDecode:
    """The last bytes as text, and whether the start was cut."""

    def test_short_text_is_whole(self) -> None:
        """Text shorter than the limit is returned whole and not marked truncated."""
        assert decode_tail(b"hello\n", 100) == ("hello\n", False)

    def test_long_text_keeps_the_end(self) -> None:
        """Only the last max_bytes are kept, marked truncated."""
        assert decode_tail(b"0123456789", 4) == ("6789", True)

    def test_cut_character_is_dropped_not_replaced(self) -> None:
        """A multi-byte character cut at the start is skipped rather than shown as U+FFFD."""
        data = "aé€z".encode()  # a, 2-byte é, 3-byte €, z
        text, cut = decode_tail(data, 3)  # the last 3 bytes: the end of € and z
        assert cut and text == "z", text

    def test_bad_bytes_are_replaced(self) -> None:
        """Undecodable bytes inside the text become U+FFFD instead of failing."""
        assert decode_tail(b"a\xffb", 10) == ("a\ufffdb", False)


class TestFiles:
    """A part from a file reads only its end."""

    def test_file_part_reads_the_end(self, tmp_path: Path) -> None:
        """A file larger than the limit gives its last bytes, its path, and truncated."""
        f = tmp_path / "out"
        f.write_bytes(b"x" * 1000 + b"the end\n")
        got = file_part("stdout", f, 8)
        assert got == {"name": "stdout", "path": str(f), "text": "the end\n", "truncated": True}

    def test_missing_file_is_a_note(self, tmp_path: Path) -> None:
        """A file that does not exist is left out with a note naming it."""
        (tmp_path / "err").write_text("boom\n")
        parts, missing = file_parts([("stdout", str(tmp_path / "nope")), ("stderr", str(tmp_path / "err"))], 100)
        assert [p["name"] for p in parts] == ["stderr"] and parts[0]["text"] == "boom\n"
        assert len(missing) == 1 and "nope" in missing[0] and "does not exist" in missing[0]

    def test_result_has_a_reason_only_without_parts(self) -> None:
        """The reason is there when parts is empty, and absent otherwise."""
        assert result("k", [], "never ran") == {"key": "k", "parts": [], "reason": "never ran"}
        p = {"name": "stdout", "path": None, "text": "", "truncated": False}
        assert result("k", [p], "ignored") == {"key": "k", "parts": [p]}


class TestRing:
    """The in-memory ring is bounded in keys and in bytes per key."""

    def test_bytes_per_key_are_bounded(self) -> None:
        """Past max_bytes the oldest bytes go and the key is marked cut."""
        ring = TailRing(max_keys=4, max_bytes=10)
        ring.append("j", "first line")
        ring.append("j", "last")
        data, cut = ring.get("j") or (b"", False)
        assert (data, cut) == (b"line\nlast\n", True)

    def test_least_recent_key_goes_first(self) -> None:
        """With more keys than max_keys, the key written longest ago is dropped."""
        ring = TailRing(max_keys=2, max_bytes=100)
        ring.append("a", "1")
        ring.append("b", "2")
        ring.append("a", "3")
        ring.append("c", "4")
        assert ring.keys() == ["a", "c"] and ring.get("b") is None
        assert ring.get("a") == (b"1\n3\n", False)

    def test_concurrent_writers_lose_nothing(self) -> None:
        """Lines appended from several threads are all kept (within the bound)."""
        ring = TailRing(max_keys=8, max_bytes=1 << 20)

        def write(n: int) -> None:
            for i in range(200):
                ring.append("k", f"{n}-{i}")

        threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        data, _ = ring.get("k") or (b"", False)
        assert sorted(data.decode().split()) == sorted(f"{n}-{i}" for n in range(4) for i in range(200))
