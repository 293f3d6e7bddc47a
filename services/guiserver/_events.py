"""guiServer traffic -> typed flowbus events, and the bookkeeping of jobs this session started.

Job lifecycle (sub-stream of a DifxStart, docs/protocols/guiserver.md §5.1): 102 -> ``queued``, 113 -> ``active``,
101 -> ``complete``, 120 -> ``complete`` (detail "ended with errors"), 119 -> ``aborted``,
128 -> ``complete`` after a passed config check else ``aborted``, 100 -> ``cancelled`` when we
asked for the stop else ``aborted``. Relayed DifxStatusMessage states move the same job
(``Done`` -> complete, ``Terminated`` -> cancelled, ``Crashed`` -> aborted, ...). A final state
is never left; while a job's stream is alive its final state comes from the stream only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flowbus.schemas import (
    AttributeChanged,
    BackendProtocolError,
    ErrorEvent,
    Event,
    LogLine,
    Observed,
    State,
    StateChanged,
)

from .._tail import TailRing
from . import messages as gx
from .protocol import (
    ChannelOpened,
    JobId,
    Pong,
    Relay,
    ServerEvent,
    ServerMessage,
    StatusId,
    StreamItem,
    StreamPacket,
    Unknown,
    VersionInfo,
)

_TEXT_LEVEL = {JobId.DIFX_MESSAGE: "info", JobId.DIFX_WARNING: "warning", JobId.DIFX_ERROR: "error"}
_FAILURES = {JobId.FAILURE_NO_HEADNODE, JobId.FAILURE_NO_DATASOURCES, JobId.FAILURE_NO_PROCESSORS,
             JobId.FAILURE_NO_INPUTFILE_SPECIFIED, JobId.FAILURE_INPUTFILE_NOT_FOUND,
             JobId.FAILURE_INPUTFILE_NAME_TOO_LONG, JobId.FAILURE_OUTPUT_EXISTS,
             JobId.FAILURE_INPUTFILE_BAD_CONFIG, JobId.CONFIG_COMMAND_NOT_FOUND}
_DIAGNOSTIC_FIELDS = ("bytes", "bytespersec", "microsec", "numSubintsLost", "activeBufElements", "threadId")
_LOAD_FIELDS = ("cpuLoad", "totalMemory", "usedMemory", "netRXRate", "netTXRate", "nCore")


@dataclass
class JobTrack:
    """One job this session started (or learned of from ``known``)."""

    name: str
    input: str
    port: int = -1
    state: State = State.UNKNOWN
    native: str = ""
    detail: str = ""
    stop_requested: bool = False
    config_passed: bool = False
    orphan: bool = False  # its stream was lost: only GET_JOB_STATUS can tell how it ended
    #: why its stream went away with the connection (a crash or a loss); "" while the stream is alive
    lost: str = ""
    #: its state cannot be recovered: ``unknown`` for good, no more status requests
    unrecoverable: bool = False
    failure: str = ""
    #: status requests while orphaned: not before ``next_poll``; the gap doubles while nothing changes
    next_poll: float = 0.0
    poll_every: float = 0.0
    #: timestamp + state of the last STATUS line its .difxlog held before this run ("" = none)
    before: str = ""
    #: the last error line of its run (116), for the detail of a JOB_FAILED / ended with errors
    last_error: str = ""
    last_seen: float = field(default_factory=time.monotonic)


class Translator:
    """Turns :data:`ServerEvent` objects into flowbus events; ``ev(cls, **fields)`` builds one."""

    def __init__(self, ev: Callable[..., Any]) -> None:
        self._ev = ev
        self._jobs: dict[str, JobTrack] = {}
        self._by_port: dict[int, JobTrack] = {}
        self._relay_states: dict[str, State] = {}
        #: the DiFX messages of each job this session saw (the ``logs`` operation reads them)
        self.messages = TailRing(max_keys=64, max_bytes=256 * 1024)

    # -- job bookkeeping -----------------------------------------------------------------------------

    def seed(self, known: Mapping[str, Event]) -> None:
        """Jobs the journal knows as unfinished become orphans to resync."""
        for event in known.values():
            if isinstance(event, StateChanged) and not event.state.final and event.attrs.get("input"):
                self._jobs[event.key] = JobTrack(event.key, str(event.attrs["input"]), state=event.state,
                                                 native=event.native, orphan=True)

    def job_started(self, name: str, inp: str, port: int, before: str = "") -> None:
        """``before``: the last STATUS line of the job's ``.difxlog`` before this run (see :meth:`resynced`)."""
        track = self._jobs[name] = JobTrack(name, inp, port, before=before)
        self._by_port[port] = track

    def job(self, name: str) -> JobTrack | None:
        return self._jobs.get(name) or next((t for t in self._jobs.values() if t.input == name), None)

    def running(self, name: str) -> bool:
        track = self._jobs.get(name)
        return track is not None and not track.state.final and not track.orphan and not track.unrecoverable

    def settled(self, track: JobTrack) -> bool:
        """Nothing more will be learned of ``track``: final, or unknown for good."""
        return track.state.final or track.unrecoverable

    def states(self) -> dict[str, str]:
        return {n: t.state.value for n, t in self._jobs.items()}

    def run_state(self, key: str, state: State, native: str, **attrs: Any) -> Event:
        """The state of a non-job run (vex2difx)."""
        event: Event = self._ev(StateChanged, key=key, state=state, native=native, attrs=attrs)
        return event

    def orphan_running(self, reason: str) -> None:
        """The connection went away: every unfinished job's stream went with it."""
        for track in self._jobs.values():
            if not track.state.final and not track.unrecoverable:
                track.orphan, track.lost = True, reason
        self._by_port.clear()

    def stream_closed(self, port: int) -> None:
        """A direct-mode job stream closed without a terminal id: only the .difxlog can tell."""
        track = self._by_port.pop(port, None)
        if track is not None and not track.state.final:
            track.orphan = True

    def orphans(self) -> list[JobTrack]:
        return [t for t in self._jobs.values() if t.orphan and not t.state.final]

    def _move(self, track: JobTrack, state: State, native: str, detail: str = "",
              observed: Observed = Observed.PUSH) -> list[Event]:
        if state is track.state or track.state.final:
            return []
        previous, track.state, track.native, track.detail = track.state, state, native, detail
        return [self._ev(StateChanged, key=track.name, state=state, native=native, previous=previous,
                         detail=detail, observed=observed, attrs={"input": track.input})]

    # -- translation ---------------------------------------------------------------------------------

    def log(self, level: str, message: str, stream: str, key: str = "") -> Event:
        line: Event = self._ev(LogLine, key=key, level=level, message=message, stream=stream)
        if stream == "job" and key:
            self.messages.append(key, f"[{level}] {message}")
        return line

    def translate(self, ev: ServerEvent) -> list[Event]:
        if isinstance(ev, ServerMessage):
            return [self.log(ev.level, ev.text.rstrip("\n"), "server")]
        if isinstance(ev, Relay):
            return self._relay(ev.data)
        if isinstance(ev, StreamPacket):
            track = self._by_port.get(ev.port)
            return self._job_packet(track, ev) if track is not None else []
        if isinstance(ev, Unknown):
            return [self.log("debug", f"unknown packet id {ev.packet.id} ({len(ev.packet.payload)} bytes)", "server")]
        if isinstance(ev, ChannelOpened | StreamItem | VersionInfo | Pong):
            return []
        return []  # pragma: no cover - ServerEvent is closed

    def _job_packet(self, track: JobTrack, p: StreamPacket) -> list[Event]:
        pid = p.id
        track.last_seen = time.monotonic()
        text = p.payload.decode(errors="replace")
        if pid in _TEXT_LEVEL:
            if pid == JobId.DIFX_ERROR and not text.endswith(" FAILED"):  # not the server's own "<prog> FAILED"
                track.last_error = text
            return [self.log(_TEXT_LEVEL[JobId(pid)], text, "job", track.name)]
        if pid == JobId.STARTED:
            return self._move(track, State.QUEUED, "STARTED")
        if pid == JobId.STARTING_DIFX:
            return self._move(track, State.ACTIVE, "STARTING_DIFX")
        if pid == JobId.CONFIG_PASSED:
            track.config_passed = True
            return []
        if pid in _FAILURES:
            track.failure = JobId(pid).name
            bad_config = (JobId.CONFIG_COMMAND_NOT_FOUND, JobId.FAILURE_INPUTFILE_BAD_CONFIG)
            level = "warning" if pid in bad_config else "error"
            return [self.log(level, track.failure, "job", track.name)]
        if pid not in (100, 101, 119, 120, 128):
            return []
        self._by_port.pop(p.port, None)
        if pid == JobId.ENDED_GRACEFULLY:
            return self._move(track, State.COMPLETE, "ENDED_GRACEFULLY")
        # guiServer reads stdout and stderr in two threads: an error line followed by more output
        # ends as 120 or as 119 (docs/protocols/guiserver.md §6.1a); both name the error line
        if pid == JobId.JOB_ENDED_WITH_ERRORS:
            detail = f"ended with errors: {track.last_error}" if track.last_error else "ended with errors"
            return self._move(track, State.COMPLETE, "JOB_ENDED_WITH_ERRORS", detail)
        if pid == JobId.JOB_FAILED:
            return self._move(track, State.ABORTED, "JOB_FAILED", track.failure or track.last_error)
        if pid == JobId.STOPPED_AFTER_CONFIG:
            ok = track.config_passed
            return self._move(track, State.COMPLETE if ok else State.ABORTED, "STOPPED_AFTER_CONFIG",
                              "config check only" if ok else "failed the configuration check")
        if track.stop_requested:
            return self._move(track, State.CANCELLED, "TERMINATED", "stopped by user")
        return self._move(track, State.ABORTED, "TERMINATED", track.failure)

    def _relay(self, data: bytes) -> list[Event]:
        try:
            msg = gx.parse(data)
        except BackendProtocolError as exc:
            return [self._ev(ErrorEvent, error_type="flowbus.schemas.BackendProtocolError", message=str(exc),
                             args=[data[:200].decode(errors="replace")], operation="relay")]
        key, f = msg.identifier, msg.fields
        if msg.type == "DifxStatusMessage":
            return self._status(msg)
        if msg.type == "DifxAlertMessage":
            return [self.log(gx.SEVERITIES.get(msg.severity(), ("", "info"))[1], f.get("alertMessage", ""),
                             "alert", key)]
        if msg.type == "DifxInfoMessage":
            return [self.log("info", f.get("message", ""), "info", key)]
        if msg.type == "DifxDiagnosticMessage":
            kind = f.get("diagnosticType", "")
            value = next((f[n] for n in _DIAGNOSTIC_FIELDS if n in f), None)
            return [self._ev(AttributeChanged, key=key or msg.source, kind="diagnostic", name=kind,
                             value=_num(value) if value is not None else None)]
        if msg.type == "DifxLoadMessage":
            return [self._ev(AttributeChanged, key=msg.source, kind="load", name=n, value=_num(f[n]))
                    for n in _LOAD_FIELDS if n in f]
        return [self.log("debug", msg.raw, f"relay.{msg.type}", key)]

    def _status(self, msg: gx.DifxMessage) -> list[Event]:
        key, word = msg.identifier, msg.fields.get("state", "")
        out: list[Event] = []
        state = gx.STATUS_STATES.get(word)
        track = self._jobs.get(key)
        if state is not None and track is not None:
            if not state.final or track.orphan or track.unrecoverable:  # a live stream reports the end better
                out += self._move(track, state, word, msg.fields.get("message", ""))
        elif state is not None and self._relay_states.get(key) is not state:
            self._relay_states[key] = state
            out.append(self._ev(StateChanged, key=key, state=state, native=word,
                                detail=msg.fields.get("message", "")))
        out += [self._ev(AttributeChanged, key=key, kind="weight", name=f"ant{ant}", value=wt)
                for ant, wt in msg.weights]
        pct = msg.progress()
        if pct is not None:
            out.append(self._ev(AttributeChanged, key=key, kind="progress", name="percent", value=round(pct, 3)))
        return out

    # -- job status ----------------------------------------------------------------------------------

    @staticmethod
    def status_rows(items: list[Any]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for p in items:
            if not isinstance(p, StreamPacket):
                continue
            text = p.payload.decode(errors="replace")
            if p.id == StatusId.INPUT_FILE_NAME:
                base = text.rsplit("/", 1)[-1]
                rows.append({"input": text, "job": base.rsplit(".", 1)[0], "state": None, "native": "",
                             "timestamp": "", "message": ""})
            elif rows and p.id in (StatusId.NO_DIFXLOG, StatusId.NO_STATUS):
                rows[-1]["native"] = StatusId(p.id).name
            elif rows and p.id == StatusId.STATUS:
                word, _, message = text[24:].partition("  ")
                state = gx.STATUS_STATES.get(word)
                rows[-1].update(timestamp=text[:24], native=word, message=message,
                                state=state.value if state else None)
        return rows

    def silent(self, seconds: float) -> None:
        """Jobs whose live stream said nothing for ``seconds`` (e.g. the server's statvfs failure
        ends a stream without a terminal id) are handed to the job-status resync."""
        now = time.monotonic()
        for port, track in list(self._by_port.items()):
            if not track.state.final and now - track.last_seen > seconds:
                track.orphan = True
                del self._by_port[port]

    def resynced(self, track: JobTrack, row: Mapping[str, Any]) -> list[Event]:
        if track.before and row.get("state") is not None and f"{row['timestamp']}{row['native']}" == track.before:
            # the .difxlog is appended to: this is the previous run's last line, nothing of this run
            row = {**row, "state": None, "native": "NO_STATUS"}
        if row.get("native") == "NO_DIFXLOG" and track.state in (State.UNKNOWN, State.QUEUED):
            # no .difxlog: the job never reached the run stage (docs/protocols/guiserver.md §5.1 step 12),
            # and never will
            events = self._move(track, State.ABORTED, "NO_DIFXLOG", track.failure or "ended before the run stage",
                                Observed.RESYNC)
            track.orphan = False
            return events
        if row.get("state") is None:
            if track.lost and row.get("native") in ("NO_STATUS", "NO_DIFXLOG"):
                return self._unrecoverable(track, str(row["native"]))
            return []
        events = self._move(track, State(row["state"]), row["native"], f"from .difxlog: {row['message']}",
                            Observed.RESYNC)
        if track.state.final:
            track.orphan = False
        return events

    def _unrecoverable(self, track: JobTrack, native: str) -> list[Event]:
        """A job whose stream went with the connection and whose ``.difxlog`` holds no status:
        guiServer writes that file only when the job ends, and a crash loses it
        (docs/protocols/guiserver.md §6.1a), so nothing will ever tell how it ended."""
        what = "no .difxlog" if native == "NO_DIFXLOG" else "an empty .difxlog"
        detail = (f"state cannot be recovered: {track.lost} while the job was {track.state.value}, and the server "
                  f"holds {what} (guiServer writes it only when a job ends; a crash loses it)")
        previous = track.state
        track.state, track.native, track.detail = State.UNKNOWN, native, detail
        track.orphan, track.unrecoverable = False, True
        return [self._ev(StateChanged, key=track.name, state=State.UNKNOWN, native=native, previous=previous,
                         detail=detail, observed=Observed.RESYNC,
                         attrs={"input": track.input, "unrecoverable": True})]


def _num(text: str) -> float | int | str:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            continue
    return text
