"""The sans-I/O guiServer core and the difxMessage XML, fed recorded byte chunks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowbus.schemas import BackendProtocolError, State
from flowbus.services.guiserver import messages as gx
from flowbus.services.guiserver.protocol import (
    JOB_TERMINAL,
    ChannelOpened,
    Connection,
    ConnState,
    FrameDecoder,
    PacketId,
    Pong,
    RawDecoder,
    Relay,
    ServerMessage,
    SizedDecoder,
    StreamItem,
    StreamKind,
    StreamPacket,
    Unknown,
    VersionInfo,
    channel_data,
    encode,
    encode_int,
)

VERSION_REPLY = b"".join([
    encode(8, b"DEVELr7531"), encode(11, b"/opt/difx"), encode(10, b"DIFX-DEVEL"), encode(10, b"TEST"),
    encode(12, b"HOME=/home/difx"), encode(18),
])

#: a channelled good job, chunked as the real server does: id, len, data separately (docs/protocols/guiserver.md §2.4)
JOB_IDS = [102, 103, 127, 114, 114, 125, 104, 113, 114, 114, 117, 101]


def job_stream(port: int) -> bytes:
    out = [encode(PacketId.CHANNEL_CONNECTION, encode_int(port))]
    for i in JOB_IDS:
        data = b"line" if i == 114 else b""
        out.append(channel_data(port, encode_int(i)))
        out.append(channel_data(port, encode_int(len(data))))
        if data:
            out.append(channel_data(port, data))
    return b"".join(out)


def feed_all(conn: Connection, data: bytes, cuts: list[int]) -> list[object]:
    events: list[object] = []
    last = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        events.extend(conn.receive(data[last:cut]))
        last = cut
    return events


def ready() -> Connection:
    conn = Connection(max_length=1 << 16)
    conn.start()
    conn.receive(VERSION_REPLY)
    assert conn.state is ConnState.READY
    return conn


@pytest.mark.timeout(60)
class TestFraming:
    """Frames survive any chunking; bad lengths are protocol errors."""

    def test_every_split_point(self) -> None:
        """The version reply cut at every byte boundary gives the same VersionInfo."""
        for cut in range(len(VERSION_REPLY) + 1):
            conn = Connection()
            assert conn.start() == encode(8)
            events = feed_all(conn, VERSION_REPLY, [cut])
            assert events == [VersionInfo("DEVELr7531", "/opt/difx", "", ("DIFX-DEVEL", "TEST"),
                                          ("HOME=/home/difx",))]

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=400), max_size=30))
    def test_job_stream_any_chunks(self, cuts: list[int]) -> None:
        """A channelled job stream gives the same sub-packets however the bytes are cut."""
        conn = ready()
        conn.expect(7, StreamKind.FRAMED, JOB_TERMINAL)
        data = job_stream(7)
        events = feed_all(conn, data, [c for c in cuts if c <= len(data)])
        assert events[0] == ChannelOpened(7)
        assert [e.id for e in events[1:] if isinstance(e, StreamPacket)] == JOB_IDS

    def test_negative_length(self) -> None:
        """A negative length field is a protocol error."""
        with pytest.raises(BackendProtocolError):
            FrameDecoder().feed(b"\x00\x00\x00\x04\xff\xff\xff\xff")

    def test_huge_length(self) -> None:
        """A length above the configured limit is refused before any allocation."""
        with pytest.raises(BackendProtocolError, match="outside"):
            FrameDecoder(max_length=100).feed(encode(4, b"x" * 101)[:8])

    def test_truncated(self) -> None:
        """A stream that ends inside a packet is reported at EOF."""
        dec = FrameDecoder()
        assert dec.feed(encode(4, b"hello")[:-1]) == []
        with pytest.raises(BackendProtocolError, match="inside a packet"):
            dec.eof()

    def test_unknown_id_kept(self) -> None:
        """Unknown ids are delivered as Unknown and the stream stays in sync."""
        conn = ready()
        events = conn.receive(encode(999, b"??") + encode(5, b"executing: x\n"))
        assert isinstance(events[0], Unknown) and events[0].packet.id == 999
        assert events[1] == ServerMessage("warning", "executing: x\n")

    def test_extra_version_reply_absorbed(self) -> None:
        """A second version reply (a resent handshake request, or a liveness probe) ends as one
        Pong; a server warning that arrives in the middle of it is still delivered."""
        conn = ready()
        assert conn.again() == encode(8)
        no_versions = encode(5, b'On DiFX Host "/x/bin/rungeneric.*" returns empty or path does not exist\n')
        reply = (encode(8, b"DEVELr7531") + encode(11, b"/opt/difx") + no_versions
                 + encode(5, b"mpifxcorr complete") + encode(12, b"A=b") + encode(18))
        assert conn.receive(reply) == [ServerMessage("warning", "mpifxcorr complete"), Pong()]
        assert conn.receive(encode(5, b"x")) == [ServerMessage("warning", "x")]

    def test_relay(self) -> None:
        """RELAY packets are delivered unchanged."""
        assert ready().receive(encode(1, b"<x/>")) == [Relay(b"<x/>")]

    def test_channel_for_unknown_port(self) -> None:
        """CHANNEL_DATA for a port no operation expects is a protocol error."""
        with pytest.raises(BackendProtocolError, match="port 5"):
            ready().receive(channel_data(5, b"abcd"))

    def test_short_channel_payload(self) -> None:
        """CHANNEL_DATA with fewer than 4 payload bytes is a protocol error."""
        with pytest.raises(BackendProtocolError, match="truncated"):
            ready().receive(encode(22, b"\x00\x01"))

    def test_raw_stream(self) -> None:
        """An ls raw stream split into 4-byte and data chunks ends at the zero length."""
        conn = ready()
        conn.expect(12, StreamKind.RAW)
        names = [b"/d/a.txt\n", b"/d/b.txt\n"]
        data = encode(21, encode_int(12)) + b"".join(
            channel_data(12, encode_int(len(n))) + channel_data(12, n) for n in names
        ) + channel_data(12, encode_int(0))
        for cut in range(len(data) + 1):
            c = ready()
            c.expect(12, StreamKind.RAW)
            events = feed_all(c, data, [cut])
            assert [e.data for e in events if isinstance(e, StreamItem)] == [*names, None]

    def test_raw_negative(self) -> None:
        """A negative raw item length is a protocol error."""
        with pytest.raises(BackendProtocolError):
            RawDecoder().feed(encode_int(-3))

    def test_handshake_twice(self) -> None:
        """Starting the handshake twice is refused."""
        conn = Connection()
        conn.start()
        with pytest.raises(BackendProtocolError):
            conn.start()


@pytest.mark.timeout(60)
class TestRobustness:
    """Arbitrary bytes from the server never crash the parser."""

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=200), max_size=8))
    def test_random_bytes(self, data: bytes, cuts: list[int]) -> None:
        """Any input gives typed events or BackendProtocolError, nothing else."""
        conn = ready()
        conn.expect(1, StreamKind.FRAMED, JOB_TERMINAL)
        conn.expect(2, StreamKind.RAW)
        conn.expect(3, StreamKind.SIZED)
        try:
            feed_all(conn, data, [c for c in cuts if c <= len(data)])
        except BackendProtocolError:
            pass

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=300))
    def test_random_xml(self, data: bytes) -> None:
        """Any relay payload parses or raises BackendProtocolError."""
        try:
            gx.parse(data)
        except BackendProtocolError:
            pass

    def test_sized(self) -> None:
        """getFile replies: size then content in any chunks; a negative size is a code without body."""
        body = bytes(range(256)) * 5
        data = encode_int(len(body)) + body
        for cut in (1, 3, 4, 5, 1000):
            dec = SizedDecoder(body=True)
            assert dec.feed(data[:cut]) + dec.feed(data[cut:]) == [(len(body), body)]
        assert SizedDecoder(body=True).feed(encode_int(-2)) == [(-2, b"")]
        assert SizedDecoder(body=False).feed(encode_int(1814)) == [(1814, b"")]
        with pytest.raises(BackendProtocolError):
            SizedDecoder(body=True, max_length=10).feed(encode_int(11))


@pytest.mark.timeout(60)
class TestXml:
    """difxMessage parsing and building."""

    def test_status_progress(self) -> None:
        """DifxStatusMessage fields, weights and the progress percentage from the MJDs."""
        msg = gx.parse(gx.status_message("job_1", "Running", "fake", vis_mjd=60000.25, start_mjd=60000.0,
                                         stop_mjd=60001.0, weights=[0.95, 0.5]))
        assert (msg.type, msg.identifier, msg.source, msg.mpi_id) == ("DifxStatusMessage", "job_1", "node1", 0)
        assert msg.fields["state"] == "Running"
        assert msg.progress() == pytest.approx(25.0)
        assert msg.weights == ((0, 0.95), (1, 0.5))
        assert gx.STATUS_STATES["Done"] is State.COMPLETE

    def test_alert(self) -> None:
        """DifxAlertMessage carries text and severity."""
        msg = gx.parse(gx.alert_message("j", "disk <full> & more", 3))
        assert msg.fields["alertMessage"] == "disk <full> & more"
        assert msg.severity() == 3

    def test_unknown_type(self) -> None:
        """An unknown <type> still parses, as type Unknown."""
        msg = gx.parse(b"<difxMessage><header><type>Whatever</type></header><body/></difxMessage>")
        assert msg.type == "Unknown" and msg.type_id == 0

    @pytest.mark.parametrize("bad", [b"this is not xml at all", b"<a><b></a>", b"<other/>", b""])
    def test_invalid(self, bad: bytes) -> None:
        """Invalid XML or a foreign root element is a protocol error, never a crash."""
        with pytest.raises(BackendProtocolError):
            gx.parse(bad)

    def test_too_deep(self) -> None:
        """Nesting deeper than guiServer's 5 levels is refused."""
        doc = b"<difxMessage><body><a><b><c><d><e>x</e></d></c></b></a></body></difxMessage>"
        with pytest.raises(BackendProtocolError, match="deeper"):
            gx.parse(doc)

    def test_build_escapes(self) -> None:
        """Built commands escape text and attributes and parse back."""
        doc = gx.build("DifxFileOperation", [("operation", "ls"), ("path", "/a/<b>&c")],
                       [("process", {"nodes": 'p1 "x"', "threads": "2"})])
        msg = gx.parse(doc)
        assert msg.type == "DifxFileOperation" and msg.fields["path"] == "/a/<b>&c"

    def test_table(self) -> None:
        """The message type table has the 28 enum values of difxmessage.h."""
        assert len(gx.MESSAGE_TYPES) == 28 and gx.MESSAGE_TYPES[6] == "DifxStatusMessage"
