"""difxMessage XML (docs/protocols/guiserver.md §4): build command documents, parse relayed messages.

Parsing is strict where guiServer's own parser is lax: a document that is not well-formed XML, or
whose root is not ``difxMessage``, raises :class:`~flowbus.schemas.BackendProtocolError`.
Unknown ``<type>`` strings parse fine (type ``Unknown`` is kept with the raw text).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from xml.sax.saxutils import escape, quoteattr

from flowbus.schemas import BackendProtocolError, State

#: enum order of difxmessage.h (docs/protocols/guiserver.md §4.2): value = position
MESSAGE_TYPES: tuple[str, ...] = (
    "Unknown", "DifxLoadMessage", "DifxAlertMessage", "Mark6StatusMessage", "Mark6SlotStatusMessage",
    "Mark5StatusMessage", "DifxStatusMessage", "DifxInfoMessage", "DifxDatastreamMessage", "DifxCommand",
    "DifxParameter", "DifxStart", "DifxStop", "Mark5VersionMessage", "Mark5ConditionMessage",
    "DifxTransientMessage", "DifxSmartMessage", "Mark5DriveStatsMessage", "DifxDiagnosticMessage",
    "DifxFileTransfer", "DifxFileOperation", "DifxVex2DifxRun", "DifxMachinesDefinition",
    "DifxGetDirectory", "DifxMk5Control", "DifxMark5Copy", "DifxVsis", "Mark6ActivityMessage",
)

#: MESSAGE_SELECTION tokens (docs/protocols/guiserver.md §3.3) -> the message type each one lets through in
#: SELECTED mode
SELECTION_TOKENS: dict[str, tuple[str, ...]] = {
    "ALERT_MESSAGES": ("DifxAlertMessage",),
    "COMMAND_MESSAGES": ("DifxCommand",),
    "FILEOPERATION_MESSAGES": ("DifxFileOperation",),
    "FILETRANSFER_MESSAGES": ("DifxFileTransfer",),
    "GETDIRECTORY_MESSAGES": ("DifxGetDirectory",),
    "MARK5COPY_MESSAGES": ("DifxMark5Copy",),
    "INFO_MESSAGES": ("DifxInfoMessage",),
    "LOAD_MESSAGES": ("DifxLoadMessage",),
    "MARK5STATUS_MESSAGES": ("Mark5StatusMessage",),
    "MACHINESDEFINITION_MESSAGES": ("DifxMachinesDefinition",),
    "MK5CONTROL_MESSAGES": ("DifxMk5Control",),
    "SMART_MESSAGES": ("DifxSmartMessage",),
    "STATUS_MESSAGES": ("DifxStatusMessage",),
    "STOP_MESSAGES": ("DifxStop",),
    "VEX2DIFXRUN_MESSAGES": ("DifxVex2DifxRun",),
    "WEIGHT_MESSAGES": (),
    "UNKNOWN_MESSAGES": ("Unknown",),
}

#: DifxStatusMessage states (enum order) -> normalised state
STATUS_STATES: dict[str, State] = {
    "Spawning": State.ACTIVE, "Starting": State.ACTIVE, "Running": State.ACTIVE, "Ending": State.ACTIVE,
    "Done": State.COMPLETE, "MpiDone": State.COMPLETE, "Aborting": State.ABORTED,
    "Terminating": State.CANCELLED, "Terminated": State.CANCELLED, "Crashed": State.ABORTED,
}

#: DifxAlertMessage severity -> (name, LogLine level)
SEVERITIES: dict[int, tuple[str, str]] = {
    0: ("FATAL", "critical"), 1: ("SEVERE", "critical"), 2: ("ERROR", "error"), 3: ("WARNING", "warning"),
    4: ("INFO", "info"), 5: ("INFO", "info"), 6: ("DEBUG", "debug"), 7: ("DEBUG", "debug"),
}

_MAX_DEPTH = 5


@dataclass(frozen=True)
class DifxMessage:
    """A parsed difxMessage: header, leaf body fields (first occurrence wins), weights, raw text."""

    type: str
    identifier: str = ""
    source: str = ""  # <from>
    mpi_id: int = -1
    seq: int = -1
    fields: Mapping[str, str] = field(default_factory=dict)
    weights: tuple[tuple[int, float], ...] = ()
    raw: str = ""

    @property
    def type_id(self) -> int:
        return MESSAGE_TYPES.index(self.type) if self.type in MESSAGE_TYPES else 0

    def progress(self) -> float | None:
        """DifxStatusMessage percentage from visibilityMJD within jobstartMJD..jobstopMJD."""
        try:
            vis = float(self.fields["visibilityMJD"])
            t0 = float(self.fields["jobstartMJD"])
            t1 = float(self.fields["jobstopMJD"])
        except (KeyError, ValueError):
            return None
        if not t1 > t0:
            return None
        return max(0.0, min(100.0, 100.0 * (vis - t0) / (t1 - t0)))

    def severity(self) -> int:
        try:
            return int(self.fields.get("severity", "4"))
        except ValueError:
            return 4


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def parse(data: bytes | str) -> DifxMessage:
    """Parse one difxMessage document; raises ``BackendProtocolError`` if it is not one."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    text = text.split("\x00", 1)[0]
    try:
        root = ET.fromstring(text)  # noqa: S314 - expat >= 2.4.1 bounds entity expansion; no external entities
    except ET.ParseError as exc:
        raise BackendProtocolError(f"invalid difxMessage XML: {exc}") from None
    if root.tag != "difxMessage":
        raise BackendProtocolError(f"root element is <{root.tag}>, not <difxMessage>")
    header = root.find("header")
    body = root.find("body")
    h: dict[str, str] = {}
    if header is not None:
        for child in header:
            if child.text and child.text.strip():
                h.setdefault(child.tag, child.text.strip())
    fields: dict[str, str] = {}
    weights: list[tuple[int, float]] = []
    if body is not None:
        _leaves(body, fields, weights, depth=2)
    mtype = h.get("type", "Unknown")
    if mtype == "Mark5ConditionMessage":
        mtype = "Mark5DriveStatsMessage"
    if mtype not in MESSAGE_TYPES:
        mtype = "Unknown"
    return DifxMessage(type=mtype, identifier=h.get("identifier", ""), source=h.get("from", ""),
                       mpi_id=_int(h.get("mpiProcessId"), -1), seq=_int(fields.get("seqNumber"), -1),
                       fields=fields, weights=tuple(weights), raw=text)


def _leaves(elem: ET.Element, fields: dict[str, str], weights: list[tuple[int, float]], depth: int) -> None:
    if len(elem) and depth + 1 > _MAX_DEPTH:
        raise BackendProtocolError("difxMessage nested deeper than 5 levels")
    for child in elem:
        if child.tag == "weight":
            try:
                weights.append((int(child.get("ant", "0")), float(child.get("wt", "0"))))
            except ValueError:
                raise BackendProtocolError(f"bad weight attributes {child.attrib}") from None
            continue
        if len(child):
            _leaves(child, fields, weights, depth + 1)
        elif child.text and child.text.strip():
            fields.setdefault(child.tag, child.text.strip())


def build(mtype: str, body: Iterable[tuple[str, str | int]] = (),
          attrs: Iterable[tuple[str, Mapping[str, str]]] = ()) -> bytes:
    """A command document in the Python client's minimal form (header holds only ``<type>``).

    ``body`` is (leaf, text) pairs (order kept, repeats allowed); ``attrs`` is (element,
    attributes) pairs for the attribute-carried fields of DifxStart/DifxMachinesDefinition.
    Every text is XML-escaped; validation of what the text *means* is the caller's job.
    """
    if mtype not in MESSAGE_TYPES or mtype == "Unknown":
        raise ValueError(f"unknown difxMessage type {mtype!r}")
    parts = ['<?xml version="1.0" encoding="UTF-8"?>', "<difxMessage><header>",
             f"<type>{mtype}</type></header><body>"]
    for name, value in body:
        parts.append(f"<{name}>{escape(str(value))}</{name}>")
    for name, attributes in attrs:
        rendered = "".join(f" {k}={quoteattr(v)}" for k, v in attributes.items())
        parts.append(f"<{name}{rendered}/>")
    parts.append("</body></difxMessage>")
    return "".join(parts).encode()


def status_message(job: str, state: str, message: str = "", *, host: str = "node1", mpi_id: int = 0,
                   vis_mjd: float | None = None, start_mjd: float | None = None,
                   stop_mjd: float | None = None, weights: Iterable[float] = ()) -> bytes:
    """A DifxStatusMessage as mpifxcorr sends it (used by the emulator and in tests)."""
    body = [f"<state>{escape(state)}</state>", f"<message>{escape(message)}</message>"]
    for tag, val in (("visibilityMJD", vis_mjd), ("jobstartMJD", start_mjd), ("jobstopMJD", stop_mjd)):
        if val is not None:
            body.append(f"<{tag}>{val:.7f}</{tag}>")
    body += [f'<weight ant="{i}" wt="{w:.4f}"/>' for i, w in enumerate(weights)]
    return _datagram("DifxStatusMessage", job, host, mpi_id, "<difxStatus>" + "".join(body) + "</difxStatus>")


def alert_message(job: str, text: str, severity: int = 2, *, host: str = "node1", mpi_id: int = 0) -> bytes:
    """A DifxAlertMessage as libdifxmessage sends it."""
    inner = f"<difxAlert><alertMessage>{escape(text)}</alertMessage><severity>{severity}</severity></difxAlert>"
    return _datagram("DifxAlertMessage", job, host, mpi_id, inner)


def _datagram(mtype: str, job: str, host: str, mpi_id: int, inner: str) -> bytes:
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<difxMessage><header>'
            f"<from>{escape(host)}</from><mpiProcessId>{mpi_id}</mpiProcessId>"
            f"<identifier>{escape(job)}</identifier><type>{mtype}</type></header>"
            f"<body><seqNumber>0</seqNumber>{inner}</body></difxMessage>").encode()
