"""More operations of :data:`._ops.OPS`: the file list (GENERATE_FILELIST,
docs/protocols/guiserver.md §5.8) and the Mark5 operations (docs/protocols/guiserver.md §5.9),
which are documented pass-throughs: their arguments are checked (guiServer pastes them into shell
commands) and the server's sub-packets are returned by name.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from flowbus.schemas import BackendRejected

from . import _check as check
from . import messages as gx
from ._ops import OPS, _path, _target
from .protocol import PacketId, StreamKind, StreamPacket, channel_data, decode_int, encode, encode_int, encode_string

if TYPE_CHECKING:
    from ._session import GuiserverSession

#: GENERATE_FILELIST reply ids (docs/protocols/guiserver.md §5.8)
FILELIST_IDS = {100: "TERMINATED", 101: "ENDED_GRACEFULLY", 102: "STARTED", 103: "DESTINATION_EXISTS",
                104: "FINAL_NAME", 105: "PATH_ACCESS_FAILURE", 106: "OVERWRITE", 107: "CANCEL", 108: "OPEN_ERROR",
                109: "BAD_FORMAT", 110: "PROCESSED_COUNT", 111: "FILE_RESULT", 112: "ERRORS_ENCOUNTERED"}
#: DifxMk5Control reply ids
MK5CONTROL_IDS = {101: "ENDED_GRACEFULLY", 102: "STARTED", 108: "INFORMATION", 110: "ERROR"}
#: DifxGetDirectory / DifxMark5Copy reply ids
MARK5_IDS = {301: "STARTED", 302: "COMPLETED", 303: "FULLPATH", 304: "FAILED", 305: "MPIRUN_ERROR",
             306: "NO_ENVIRONMENT_VARIABLE", 307: "DATE", 308: "FILE_NOT_FOUND", 309: "FILESTART", 310: "FILEDATA",
             311: "GENERATE_DIRECTORY_STARTED", 312: "GENERATE_DIRECTORY_INFO",
             313: "GENERATE_DIRECTORY_COMPLETED", 314: "GENERATE_DIRECTORY_ERRORS"}
_FORMAT = re.compile(r"(MKIV|VLBA|MARK5B|VDIF)[A-Za-z0-9_/.-]{0,60}")
_VSN = re.compile(r"[A-Za-z0-9][A-Za-z0-9+_-]{0,15}")
_SCANS = re.compile(r"[0-9][0-9,_-]{0,200}")
_WORD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_=:.+,-]{0,62}")


def _named(items: list[Any], names: dict[int, str]) -> list[dict[str, Any]]:
    return [{"id": names.get(i.id, str(i.id)), "text": i.payload.decode(errors="replace")}
            for i in items if isinstance(i, StreamPacket)]


@OPS.op
def file_list(session: GuiserverSession, files: list[str], destination: str, format: str, ref_mjd: int,
              overwrite: bool = False, timeout: float | None = None) -> dict[str, Any]:
    """GENERATE_FILELIST: the start/stop MJD of each data file, written sorted to ``destination``.

    ``format`` starts with MKIV, VLBA, MARK5B or VDIF. When ``destination`` exists the server
    asks; the answer is OVERWRITE with ``overwrite`` else CANCEL (then ``BackendRejected``).
    Channelled mode only (the answer goes back on the sub-stream). Returns ``ok``, the
    ``results`` rows (``file``, ``start``, ``stop``), ``processed`` and ``errors``."""
    if not session.config.channelled:
        raise BackendRejected("file_list: needs channelled mode (the overwrite answer goes on the sub-stream)")
    if not isinstance(files, list | tuple) or not files:
        raise BackendRejected("file_list: files must be a non-empty list of paths")
    paths = [_path(session, f, "file") for f in files]
    dest = _target(session, destination, "destination")
    if not isinstance(format, str) or not _FORMAT.fullmatch(format):
        raise BackendRejected(f"file_list: format {format!r} must start with MKIV, VLBA, MARK5B or VDIF")
    if not isinstance(ref_mjd, int) or not 0 <= ref_mjd < 100000:
        raise BackendRejected(f"file_list: ref_mjd {ref_mjd!r} must be an integer MJD")

    def request(port: int) -> bytes:
        body = encode_int(len(paths)) + b"".join(encode_string(p) for p in paths)
        body += encode_string(dest) + encode_string(format) + encode_int(ref_mjd) + encode_string("") + encode_int(port)
        return encode(PacketId.GENERATE_FILELIST, body)

    def on_item(item: Any) -> None:  # lock held (the reader thread)
        if isinstance(item, StreamPacket) and item.id == 103:
            session._send(channel_data(item.port, encode_int(106 if overwrite else 107)))

    terminal = frozenset({100, 101} if overwrite else {100, 101, 103})
    items = session._stream("file_list", StreamKind.FRAMED, request, timeout, on_item=on_item, terminal=terminal)
    packets = _named(items, FILELIST_IDS)
    ids = [p["id"] for p in packets]
    if "DESTINATION_EXISTS" in ids and not overwrite:
        raise BackendRejected(f"file_list: {dest} exists (pass overwrite=True to replace it)")
    results = []
    for p in packets:
        if p["id"] == "FILE_RESULT":
            name, _, rest = p["text"].partition(" ")
            start, _, stop = rest.partition(" ")
            results.append({"file": name, "start": float(start or 0), "stop": float(stop or 0)})
    counts = [decode_int(i.payload) for i in items if isinstance(i, StreamPacket) and i.id == 110]
    return {"ok": bool(ids) and ids[-1] == "ENDED_GRACEFULLY", "results": results,
            "processed": counts[-1] if counts else 0, "errors": "ERRORS_ENCOUNTERED" in ids, "packets": ids}


@OPS.op
def mk5control(session: GuiserverSession, command: str, target_node: str,
               timeout: float | None = None) -> dict[str, Any]:
    """DifxMk5Control: ``<setup> mk5control <command> <target_node>`` on the server (pass-through).
    ``command`` is words of letters, digits and ``_=:.+,-``. Returns ``ok`` and the
    INFORMATION/ERROR lines."""
    words = command.split() if isinstance(command, str) else None
    if not words or len(words) > 8 or not all(_WORD.fullmatch(w) for w in words):
        raise BackendRejected(f"mk5control: command {command!r}: words of letters, digits and _=:.+,- "
                              "(not starting with '-')")
    node = check.nodes(target_node, "target-node")
    if len(node) != 1:
        raise BackendRejected(f"mk5control: target-node {target_node!r}: exactly one host")
    items = session._stream("mk5control", StreamKind.FRAMED, lambda port: encode(PacketId.COMMAND, gx.build(
        "DifxMk5Control", [("command", " ".join(words)), ("targetNode", node[0]), *session._where(port)])),
        timeout, terminal=frozenset({101}))
    packets = _named(items, MK5CONTROL_IDS)
    return {"ok": bool(packets) and packets[-1]["id"] == "ENDED_GRACEFULLY" and
            not any(p["id"] == "ERROR" for p in packets), "packets": packets}


def _vsn(value: object) -> str:
    if not isinstance(value, str) or not _VSN.fullmatch(value):
        raise BackendRejected(f"vsn {value!r}: a module VSN of letters, digits and +_- (at most 16)")
    return value


def _mark5(session: GuiserverSession, operation: str, mtype: str, body: list[tuple[str, str | int]],
           timeout: float | None) -> dict[str, Any]:
    if session.config.mpi_wrapper:
        body.append(("mpiWrapper", session.config.mpi_wrapper))
    body.append(("difxVersion", session.config.difx_version))
    items = session._stream(operation, StreamKind.FRAMED, lambda port: encode(PacketId.COMMAND, gx.build(
        mtype, body + session._where(port))), timeout, terminal=frozenset({302, 304}))
    packets = _named(items, MARK5_IDS)
    return {"ok": bool(packets) and packets[-1]["id"] == "COMPLETED", "packets": packets}


@OPS.op
def get_directory(session: GuiserverSession, mark5: str, vsn: str, generate_new: bool = False,
                  timeout: float | None = None) -> dict[str, Any]:
    """DifxGetDirectory: the directory of module ``vsn`` in Mark5 unit ``mark5`` (pass-through).
    Returns ``ok`` (COMPLETED) and the sub-packets by name (FILEDATA lines carry the listing)."""
    unit = check.nodes(mark5, "mark5")
    if len(unit) != 1:
        raise BackendRejected(f"get_directory: mark5 {mark5!r}: exactly one host")
    return _mark5(session, "get_directory", "DifxGetDirectory",
                  [("mark5", unit[0]), ("vsn", _vsn(vsn)), ("generateNew", 1 if generate_new else 0)], timeout)


@OPS.op
def mark5_copy(session: GuiserverSession, mark5: str, vsn: str, scans: str, destination: str,
               timeout: float | None = None) -> dict[str, Any]:
    """DifxMark5Copy: ``mk5cp`` of ``scans`` (e.g. ``1-4,7``) of module ``vsn`` to ``destination``
    (inside allowed-dirs) on unit ``mark5`` (pass-through). Returns ``ok`` and the sub-packets."""
    unit = check.nodes(mark5, "mark5")
    if len(unit) != 1:
        raise BackendRejected(f"mark5_copy: mark5 {mark5!r}: exactly one host")
    if not isinstance(scans, str) or not _SCANS.fullmatch(scans):
        raise BackendRejected(f"mark5_copy: scans {scans!r}: numbers, ',' and '-' only")
    dest = _target(session, destination, "destination")
    return _mark5(session, "mark5_copy", "DifxMark5Copy",
                  [("mark5", unit[0]), ("vsn", _vsn(vsn)), ("scans", scans), ("destination", dest)], timeout)
