"""Sans-I/O core of the DiFX guiServer protocol (spec: docs/protocols/guiserver.md §2-§3, §5).

Bytes in, typed packets out; packets out to bytes. No sockets, no threads, no clocks. The one
place the framing is written: the session (:mod:`._session`) and the emulator
(:mod:`flowbus.services.guiserver_emulator`) both build on it.

* :func:`encode` / :func:`encode_int` build frames (``int32 id``, ``int32 length``, payload, all
  big-endian).
* :class:`FrameDecoder` turns a byte stream cut at arbitrary points into :class:`Packet` objects;
  negative or over-limit lengths raise :class:`~flowbus.schemas.BackendProtocolError`.
* :class:`RawDecoder` parses the unframed ``[int32 len][bytes]`` streams (ls, vex2difx);
  :class:`SizedDecoder` the file-transfer replies (``[int32 size][bytes]`` or one int32).
* :class:`Connection` is the main-connection state machine: version handshake, channel
  demultiplexing per port (each port parsed as a byte stream, never by chunk boundaries).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from flowbus.schemas import BackendProtocolError

_HEAD = struct.Struct(">ii")
_INT = struct.Struct(">i")

#: default upper bound on one payload (the server's COMMAND limit is 93712; relays <= 10240)
DEFAULT_MAX_LENGTH = 4 * 1024 * 1024


class PacketId(enum.IntEnum):
    """Top-level packet ids on the main connection (docs/protocols/guiserver.md §3)."""

    RELAY = 1
    RELAY_COMMAND = 2
    COMMAND = 3
    INFORMATION = 4
    WARNING = 5
    ERROR = 6
    MULTICAST_SETTINGS = 7
    GUISERVER_VERSION = 8
    GUISERVER_DIFX_VERSION = 9
    AVAILABLE_DIFX_VERSION = 10
    DIFX_BASE = 11
    GUISERVER_ENVIRONMENT = 12
    DIFX_SETUP_PATH = 13
    START_DIFX_MONITOR = 14
    DIFX_RUN_LABEL = 15
    GUISERVER_USER = 16
    MESSAGE_SELECTION = 17
    CHANNEL_ALL_DATA = 18
    CHANNEL_ALL_DATA_ON = 19
    CHANNEL_ALL_DATA_OFF = 20
    CHANNEL_CONNECTION = 21
    CHANNEL_DATA = 22
    GENERATE_FILELIST = 23
    GET_JOB_STATUS = 24


class JobId(enum.IntEnum):
    """Job-run sub-packet ids (docs/protocols/guiserver.md §5.1)."""

    TERMINATED = 100
    ENDED_GRACEFULLY = 101
    STARTED = 102
    PARAMETER_CHECK_IN_PROGRESS = 103
    PARAMETER_CHECK_SUCCESS = 104
    FAILURE_NO_HEADNODE = 105
    FAILURE_NO_DATASOURCES = 106
    FAILURE_NO_PROCESSORS = 107
    FAILURE_NO_INPUTFILE_SPECIFIED = 108
    FAILURE_INPUTFILE_NOT_FOUND = 109
    FAILURE_INPUTFILE_NAME_TOO_LONG = 110
    FAILURE_OUTPUT_EXISTS = 111
    DELETING_PREVIOUS_OUTPUT = 112
    STARTING_DIFX = 113
    DIFX_MESSAGE = 114
    DIFX_WARNING = 115
    DIFX_ERROR = 116
    DIFX_COMPLETE = 117
    DATA_FILE_SIZE = 118
    JOB_FAILED = 119
    JOB_ENDED_WITH_ERRORS = 120
    FAILURE_INPUTFILE_BAD_CONFIG = 124
    CONFIG_PASSED = 125
    CONFIG_COMMAND_NOT_FOUND = 126
    RUN_CONFIG_CHECK = 127
    STOPPED_AFTER_CONFIG = 128


#: job-run ids after which the stream carries nothing more
JOB_TERMINAL = frozenset({100, 101, 119, 120, 128})


class StatusId(enum.IntEnum):
    """GET_JOB_STATUS sub-packet ids (docs/protocols/guiserver.md §5.3)."""

    TASK_ENDED_GRACEFULLY = 101
    TASK_STARTED = 102
    INPUT_FILE_NAME = 104
    NO_DIFXLOG = 105
    STATUS = 106
    OPEN_ERROR = 107
    NO_STATUS = 108
    TASK_TERMINATED = 109
    TIME_STRING = 110
    FORK_FAILED = 111


#: job-status ids that end the stream
STATUS_TERMINAL = frozenset({101, 109, 111})


class StreamKind(enum.Enum):
    """How the bytes of one sub-stream are laid out."""

    FRAMED = "framed"  # [int32 id][int32 len][data] ... ends with a terminal id
    RAW = "raw"  # [int32 len][bytes] ... ends with a zero length
    SIZED = "sized"  # [int32 size][size bytes] (getFile); a negative size is an error code, no body
    INT = "int"  # one int32 (the sendFile reply)
    BYTES = "bytes"  # passed through unparsed as StreamItem chunks, never ends by content (the monitor)


class ConnState(enum.Enum):
    """Main-connection state; commands are only allowed in READY."""

    IDLE = "idle"  # connected, nothing sent
    HANDSHAKE = "handshake"  # version request sent, waiting for CHANNEL_ALL_DATA (18)
    READY = "ready"
    CLOSED = "closed"


# -- typed packets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Packet:
    """One frame: ``id`` and raw payload."""

    id: int
    payload: bytes = b""

    def text(self) -> str:
        return self.payload.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class VersionInfo:
    """The version reply (docs/protocols/guiserver.md §3.2), complete once CHANNEL_ALL_DATA arrived."""

    version: str = ""
    difx_base: str = ""
    user: str = ""
    versions: tuple[str, ...] = ()
    environment: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServerMessage:
    """INFORMATION / WARNING / ERROR text on the main connection."""

    level: str  # "info" | "warning" | "error"
    text: str


@dataclass(frozen=True)
class Relay:
    """One relayed datagram, unchanged."""

    data: bytes


@dataclass(frozen=True)
class ChannelOpened:
    """CHANNEL_CONNECTION: sub-stream ``port`` started."""

    port: int


@dataclass(frozen=True)
class StreamPacket:
    """One framed sub-packet on sub-stream ``port``."""

    port: int
    id: int
    payload: bytes = b""


@dataclass(frozen=True)
class StreamItem:
    """One ``[len][bytes]`` item of a raw sub-stream (``data`` is None for the 0 end marker)."""

    port: int
    data: bytes | None


@dataclass(frozen=True)
class Unknown:
    """A packet id the client does not handle (kept, so nothing is lost silently)."""

    packet: Packet


@dataclass(frozen=True)
class Pong:
    """The end of a version reply after the first (an answer to :meth:`Connection.again`)."""


ServerEvent = VersionInfo | Pong | ServerMessage | Relay | ChannelOpened | StreamPacket | StreamItem | Unknown


# -- framing -------------------------------------------------------------------------------------


def encode(packet_id: int, payload: bytes = b"") -> bytes:
    """One frame."""
    return _HEAD.pack(int(packet_id), len(payload)) + payload


def encode_int(value: int) -> bytes:
    """A big-endian int32 (payload helper)."""
    return _INT.pack(value)


def decode_int(data: bytes, offset: int = 0) -> int:
    if len(data) < offset + 4:
        raise BackendProtocolError(f"truncated int32 at offset {offset} of {len(data)} bytes")
    return int(_INT.unpack_from(data, offset)[0])


def encode_string(text: str | bytes) -> bytes:
    """``int32 len`` + bytes (the binary string layout of ids 23/24)."""
    raw = text.encode() if isinstance(text, str) else text
    return encode_int(len(raw)) + raw


def channel_data(port: int, data: bytes) -> bytes:
    """A CHANNEL_DATA frame for ``port``."""
    return encode(PacketId.CHANNEL_DATA, encode_int(port) + data)


class FrameDecoder:
    """``[id][len][data]`` frames from a byte stream cut anywhere."""

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self.max_length = max_length
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete frame (truncation shows here at EOF)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Packet]:
        self._buf += data
        out: list[Packet] = []
        while len(self._buf) >= 8:
            pid, length = _HEAD.unpack_from(self._buf, 0)
            if length < 0 or length > self.max_length:
                raise BackendProtocolError(
                    f"packet id {pid}: length {length} outside 0..{self.max_length}")
            if len(self._buf) < 8 + length:
                break
            out.append(Packet(pid, bytes(self._buf[8:8 + length])))
            del self._buf[:8 + length]
        return out

    def eof(self) -> None:
        """The stream ended: raise if a frame was cut short."""
        if self._buf:
            raise BackendProtocolError(f"stream ended inside a packet ({len(self._buf)} bytes pending)")


class RawDecoder:
    """``[int32 len][bytes]`` items; a zero length is the end marker (yields None)."""

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self.max_length = max_length
        self._buf = bytearray()
        self.ended = False

    def feed(self, data: bytes) -> list[bytes | None]:
        self._buf += data
        out: list[bytes | None] = []
        while not self.ended and len(self._buf) >= 4:
            (length,) = _INT.unpack_from(self._buf, 0)
            if length < 0 or length > self.max_length:
                raise BackendProtocolError(f"raw stream item length {length} outside 0..{self.max_length}")
            if length == 0:
                del self._buf[:4]
                self.ended = True
                out.append(None)
                break
            if len(self._buf) < 4 + length:
                break
            out.append(bytes(self._buf[4:4 + length]))
            del self._buf[:4 + length]
        return out


class SizedDecoder:
    """getFile / sendFile replies: one int32, then (``body``) that many bytes. Yields one
    ``(size, content)`` pair when complete; a negative size comes without content."""

    def __init__(self, body: bool, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self.body, self.max_length = body, max_length
        self._buf = bytearray()
        self.ended = False

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        if self.ended or len(self._buf) < 4:
            return []
        (size,) = _INT.unpack_from(self._buf, 0)
        if not self.body or size <= 0:
            self.ended = True
            return [(size, b"")]
        if size > self.max_length:
            raise BackendProtocolError(f"file size {size} above the limit {self.max_length}")
        if len(self._buf) < 4 + size:
            return []
        self.ended = True
        return [(size, bytes(self._buf[4:4 + size]))]


# -- the main connection -------------------------------------------------------------------------


@dataclass
class _Stream:
    kind: StreamKind
    decoder: FrameDecoder | RawDecoder | SizedDecoder
    terminal: frozenset[int] = frozenset()
    done: bool = False


@dataclass
class _Version:
    version: str = ""
    difx_base: str = ""
    user: str = ""
    versions: list[str] = field(default_factory=list)
    environment: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class Connection:
    """The client side of one guiServer connection, without I/O.

    ``start()`` returns the version request; feed every received byte to :meth:`receive`, which
    returns :data:`ServerEvent` objects. Register each operation's port with :meth:`expect`
    before sending the request, so its channel bytes are parsed with the right layout.
    """

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self.state = ConnState.IDLE
        self.max_length = max_length
        self._frames = FrameDecoder(max_length)
        self._streams: dict[int, _Stream] = {}
        self._version = _Version()
        self.version: VersionInfo | None = None
        #: READY: inside a further version reply (between its 8 and its 18), which is absorbed
        self._extra_reply = False

    def start(self) -> bytes:
        if self.state is not ConnState.IDLE:
            raise BackendProtocolError(f"handshake already started (state {self.state.value})")
        self.state = ConnState.HANDSHAKE
        return encode(PacketId.GUISERVER_VERSION)

    def again(self) -> bytes:
        """Another version request: during the handshake, because a real guiServer can lose the
        first packet of a connection; when READY, as a liveness probe (a silent server). Each reply
        after the first is absorbed and reported as one :class:`Pong`."""
        if self.state not in (ConnState.HANDSHAKE, ConnState.READY):
            raise BackendProtocolError(f"no version request in state {self.state.value}")
        return encode(PacketId.GUISERVER_VERSION)

    def expect(self, port: int, kind: StreamKind, terminal: frozenset[int] = frozenset()) -> None:
        """Announce that ``port`` will carry a ``kind`` stream ending at one of ``terminal``."""
        dec: FrameDecoder | RawDecoder | SizedDecoder
        if kind is StreamKind.FRAMED:
            dec = FrameDecoder(self.max_length)
        elif kind is StreamKind.RAW:
            dec = RawDecoder(self.max_length)
        else:
            dec = SizedDecoder(kind is StreamKind.SIZED, self.max_length)
        self._streams[port] = _Stream(kind, dec, terminal)

    def forget(self, port: int) -> None:
        self._streams.pop(port, None)

    def close(self) -> None:
        self.state = ConnState.CLOSED

    def receive(self, data: bytes) -> list[ServerEvent]:
        if self.state is ConnState.CLOSED:
            raise BackendProtocolError("data after close")
        out: list[ServerEvent] = []
        for packet in self._frames.feed(data):
            out.extend(self._handle(packet))
        return out

    def eof(self) -> None:
        self.state = ConnState.CLOSED
        self._frames.eof()

    def _handle(self, p: Packet) -> list[ServerEvent]:
        pid = p.id
        if self.state is ConnState.HANDSHAKE and pid in _VERSION_IDS:
            return self._handshake(p)
        if pid == PacketId.GUISERVER_VERSION:  # a further version reply starts (8 is only sent as that)
            self._extra_reply = True
            return []
        if self._extra_reply and pid in _VERSION_IDS and (
                pid != PacketId.WARNING or p.text().startswith("On DiFX Host ")):
            if pid == PacketId.CHANNEL_ALL_DATA:
                self._extra_reply = False
                return [Pong()]
            return []
        if pid == PacketId.RELAY:
            return [Relay(p.payload)]
        if pid in _LEVELS:
            return [ServerMessage(_LEVELS[pid], p.text())]
        if pid == PacketId.CHANNEL_CONNECTION:
            if len(p.payload) != 4:
                raise BackendProtocolError(f"CHANNEL_CONNECTION payload of {len(p.payload)} bytes")
            return [ChannelOpened(decode_int(p.payload))]
        if pid == PacketId.CHANNEL_DATA:
            return self._channel(p.payload)
        return [Unknown(p)]

    def _handshake(self, p: Packet) -> list[ServerEvent]:
        v, text = self._version, p.text()
        if p.id == PacketId.GUISERVER_VERSION:
            v.version = text
        elif p.id == PacketId.DIFX_BASE:
            v.difx_base = text
        elif p.id == PacketId.GUISERVER_USER:
            v.user = text
        elif p.id == PacketId.AVAILABLE_DIFX_VERSION:
            v.versions.append(text)
        elif p.id == PacketId.GUISERVER_ENVIRONMENT:
            v.environment.append(text)
        elif p.id == PacketId.WARNING:
            v.warnings.append(text)
        elif p.id == PacketId.CHANNEL_ALL_DATA:
            self.version = VersionInfo(v.version, v.difx_base, v.user, tuple(v.versions),
                                       tuple(v.environment), tuple(v.warnings))
            self.state = ConnState.READY
            return [self.version]
        return []

    def _channel(self, payload: bytes) -> list[ServerEvent]:
        return self.stream_data(decode_int(payload), payload[4:])

    def stream_done(self, port: int) -> bool:
        """Whether ``port``'s stream has ended by its content (terminal id, 0 marker, reply)."""
        stream = self._streams.get(port)
        return stream is not None and stream.done

    def stream_data(self, port: int, data: bytes) -> list[ServerEvent]:
        """Bytes of sub-stream ``port`` (a CHANNEL_DATA payload, or read from a direct socket)."""
        stream = self._streams.get(port)
        if stream is None:
            raise BackendProtocolError(f"CHANNEL_DATA for port {port} that no operation expects")
        if stream.kind is StreamKind.BYTES:
            return [StreamItem(port, bytes(data))] if data else []
        if stream.done:
            if data:
                raise BackendProtocolError(f"CHANNEL_DATA for port {port} after its end")
            return []
        out: list[ServerEvent] = []
        if isinstance(stream.decoder, FrameDecoder):
            for sp in stream.decoder.feed(data):
                out.append(StreamPacket(port, sp.id, sp.payload))
                if sp.id in stream.terminal:
                    stream.done = True
                    break
        elif isinstance(stream.decoder, RawDecoder):
            for item in stream.decoder.feed(data):
                out.append(StreamItem(port, item))
                if item is None:
                    stream.done = True
        else:
            for size, content in stream.decoder.feed(data):
                out.append(StreamPacket(port, size, content))
                stream.done = True
        return out


_VERSION_IDS = frozenset({8, 10, 11, 12, 16, 5, 18})
_LEVELS = {int(PacketId.INFORMATION): "info", int(PacketId.WARNING): "warning", int(PacketId.ERROR): "error"}
