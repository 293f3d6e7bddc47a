"""The emulator's file list (GENERATE_FILELIST, docs/protocols/guiserver.md §5.8) and Mark5
operations (docs/protocols/guiserver.md §5.9). There is no Mark5 hardware and no data decoder: a
data file's MJDs are faked from its position in the request, and every Mark5 unit is unreachable
(what the server says when mpirun cannot reach the host)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..guiserver.protocol import PacketId as P
from ..guiserver.protocol import decode_int, encode_int
from ._jobs import Client, Stream

_FORMATS = ("MKIV", "VLBA", "MARK5B", "VDIF")


def _string(payload: bytes, at: int) -> tuple[str, int]:
    n = decode_int(payload, at)
    return payload[at + 4:at + 4 + n].decode(errors="replace"), at + 4 + n


def run_file_list(emu: Any, c: Client, payload: bytes) -> None:
    """nFiles x path, destination, format, refMJD, address, port -> framed ids 100..112."""
    at, files = 4, []
    for _ in range(decode_int(payload, 0)):
        name, at = _string(payload, at)
        files.append(name)
    dest, at = _string(payload, at)
    fmt, at = _string(payload, at)
    ref_mjd = decode_int(payload, at)
    address, at = _string(payload, at + 4)
    s = Stream(c, decode_int(payload, at), address)
    s.packet(102)
    real = emu.real(dest)
    if not fmt.startswith(_FORMATS):
        s.packet(109, fmt.encode())
        s.packet(100)
        s.close()
        return
    if not real.parent.is_dir():
        s.packet(105, dest.encode())
        s.packet(100)
        s.close()
        return
    if real.exists():
        s.packet(103, dest.encode())
        answer = s.read(4)
        if answer is None or decode_int(answer) == 107:  # CANCEL: the server just stops
            s.close()
            return
    rows, errors = [], False
    for i, name in enumerate(files):
        if emu.real(name).is_file():
            start = ref_mjd + 0.001 * (i + 1)
            rows.append((start, f"{name} {start:.6f} {start + 0.0005:.6f}"))
        else:
            errors = True
    rows.sort()
    real.write_text("".join(line + "\n" for _, line in rows))
    s.packet(104)
    for _, line in rows:
        s.packet(111, line.encode())
    s.packet(110, encode_int(len(rows)))
    if errors:
        s.packet(112)
    s.packet(101)
    s.close()


def run_mark5(c: Client, mtype: str, f: Mapping[str, str]) -> None:
    """DifxMk5Control, DifxGetDirectory, DifxMark5Copy: the unit cannot be reached."""
    s = Stream(c, int(f.get("port", "0")), f.get("address", ""))
    if mtype == "DifxMk5Control":
        s.packet(102)
        s.packet(110, f"mk5control: {f.get('targetNode', '')}: no Mark5 unit in the emulator\n".encode())
        s.packet(101)
    else:
        s.packet(301)
        s.packet(305, f"ssh: Could not resolve hostname {f.get('mark5', '')}".encode())
        s.packet(304)
    s.close()
    c.send(P.WARNING, f"{mtype}: no Mark5 unit in the emulator\n".encode())
