"""The frame codec (``revdial._frames``) against Go's recorded behaviour.

* every encode vector round-trips byte-exact and decodes as Go decoded it;
* every decode vector fails exactly where Go fails (same ``go_error``), plus
  the structural payload errors Go's *session* treats as fatal, which our
  ``decode()`` already rejects (see ``DECODE_STRICTER_THAN_GO_CLIENT``);
* every input decoded whole, as each of its prefixes, and with trailing bytes
  (a WebSocket message is always complete, so "byte by byte" means: every
  truncation of a message is either a frame or a FrameError, nothing else);
* the varint table of PROTOCOL.md 2.1 and the examples of 2.6;
* hypothesis: ``decode(encode(f)) == f`` for every valid frame, and
  ``decode`` of arbitrary bytes returns a Frame or raises FrameError only.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from revdial._errors import FrameError, ProtocolError
from revdial._frames import (
    CLIENT_READ_LIMIT,
    CONNECT_READ_LIMIT,
    ERROR_READ_LIMIT,
    LEGACY_DEADLINE,
    Frame,
    MessageType,
    data_header,
    decode,
    decode_varint,
    encode,
    encode_sync,
    encode_varint,
    parse_client,
    parse_connect,
    parse_error_text,
    parse_sync,
)
from vectors import Vector, decode_vectors, encode_vectors, params, require

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

#: Deterministic, fast hypothesis runs (the fuzzers in ``fuzz/`` explore randomly).
FAST = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

#: Types whose payload Go's *session* validates after ``newServerMessage``
#: succeeded, and which our ``decode()`` validates itself on every session.
STRUCTURAL_SESSION_TYPES = frozenset(
    {MessageType.ADD_CLIENT, MessageType.REMOVE_CLIENT, MessageType.SYNC_CONNECTIONS}
)

#: DELIBERATE DEVIATION. Go's *client* session ignores AddClient without
#: parsing it (``remoteClientKeys`` is nil there), so a malformed AddClient
#: kills only a Go *server* session. Our ``decode()`` does not know the role
#: and rejects it on both (a Go server never sends a malformed AddClient, and
#: peering is not implemented). These are exactly the vectors where Go's client
#: accepts what our decode rejects; the test below recomputes the set.
DECODE_STRICTER_THAN_GO_CLIENT: dict[str, str] = {
    "addclient-no-slash": "AddClient 'c2': Go client ignores it, Go server dies; we reject",
    "addclient-nonnumeric-session": "AddClient 'c2/abc': same",
    "addclient-over-100": "AddClient whose first 100 bytes hold no '/': same",
}

# --- PROTOCOL.md 2.1: signed varints ---------------------------------------

VARINT_TABLE = [
    (0, "00"),
    (1, "02"),
    (-1, "01"),
    (64, "8001"),
    (-65, "8101"),
    (15000, "b0ea01"),
    (INT64_MAX, "fe" + "ff" * 8 + "01"),
    (INT64_MIN, "ff" * 9 + "01"),
]


@pytest.mark.parametrize(("value", "hex_"), VARINT_TABLE)
def test_varint_table(value: int, hex_: str) -> None:
    raw = bytes.fromhex(hex_)
    assert encode_varint(value) == raw
    assert decode_varint(raw, 0) == (value, len(raw))
    # at an offset, and followed by other bytes: only the varint is consumed
    assert decode_varint(b"\x7f" + raw + b"\x01\x02", 1) == (value, 1 + len(raw))


@pytest.mark.parametrize(
    ("raw", "value", "end"),
    [
        (b"\x80\x00", 0, 2),  # non-minimal encodings are accepted (Go: ReadVarint)
        (b"\x81\x80\x00", -1, 3),
        (b"\x80" * 9 + b"\x00", 0, 10),  # 10 bytes, 10th byte 0
        (b"\x80" * 9 + b"\x01", 1 << 62, 10),  # 10th byte 1 sets bit 63 of the zigzag value
    ],
)
def test_varint_noncanonical_accepted(raw: bytes, value: int, end: int) -> None:
    assert decode_varint(raw, 0) == (value, end)


@pytest.mark.parametrize(
    ("raw", "go_error"),
    [
        (b"", "EOF"),
        (b"\x80", "unexpected EOF"),
        (b"\xff" * 9, "unexpected EOF"),
        (b"\xff" * 9 + b"\x02", "binary: varint overflows a 64-bit integer"),
        (b"\x80" * 9 + b"\x7f", "binary: varint overflows a 64-bit integer"),
        (b"\xff" * 10 + b"\x01", "binary: varint overflows a 64-bit integer"),
        (b"\x80" * 11, "binary: varint overflows a 64-bit integer"),
    ],
)
def test_varint_errors(raw: bytes, go_error: str) -> None:
    with pytest.raises(FrameError) as info:
        decode_varint(raw, 0)
    assert info.value.go_error == go_error


@pytest.mark.parametrize("value", [INT64_MAX + 1, INT64_MIN - 1, 1 << 80])
def test_encode_varint_rejects_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match="int64"):
        encode_varint(value)


@given(st.integers(INT64_MIN, INT64_MAX), st.binary(max_size=4))
@FAST
def test_varint_roundtrip(value: int, tail: bytes) -> None:
    raw = encode_varint(value)
    assert 1 <= len(raw) <= 10
    assert decode_varint(raw + tail, 0) == (value, len(raw))


# --- PROTOCOL.md 2.6 examples (message ids 1000...1004) --------------------

PROTOCOL_EXAMPLES = [
    (
        Frame(1000, 2, MessageType.CONNECT, b"tcp/127.0.0.1:8080", LEGACY_DEADLINE),
        "d00f0404b0ea01" + b"tcp/127.0.0.1:8080".hex(),
    ),
    (Frame(1001, 2, MessageType.DATA, b"hi", LEGACY_DEADLINE), "d20f0402b0ea016869"),
    (Frame(1002, 2, MessageType.ERROR, b"EOF"), "d40f0406454f46"),
    (
        Frame(1003, 0, MessageType.SYNC_CONNECTIONS, encode_sync([5, 2])),
        "d60f0010" + "0200000000000000" + "0500000000000000",
    ),
    (Frame(1004, 7, MessageType.PAUSE), "d80f0e0c"),
]


@pytest.mark.parametrize(("frame", "hex_"), PROTOCOL_EXAMPLES)
def test_protocol_examples(frame: Frame, hex_: str) -> None:
    assert encode(frame).hex() == hex_
    assert decode(bytes.fromhex(hex_)) == frame


def test_encode_defaults_legacy_deadline() -> None:
    assert encode(Frame(1, 2, MessageType.DATA, b"x")) == encode(
        Frame(1, 2, MessageType.DATA, b"x", LEGACY_DEADLINE)
    )
    assert decode(encode(Frame(1, 2, MessageType.DATA, b"x"))).deadline == LEGACY_DEADLINE


@given(st.integers(INT64_MIN, INT64_MAX), st.integers(INT64_MIN, INT64_MAX), st.binary())
@FAST
def test_data_header_matches_encode(msg_id: int, conn_id: int, payload: bytes) -> None:
    assert data_header(msg_id, conn_id) + payload == encode(
        Frame(msg_id, conn_id, MessageType.DATA, payload)
    )


# --- comparing a decoded frame with Go's newServerMessage ------------------


def check_against_go(frame: Frame, go: dict[str, Any]) -> None:
    """``frame`` (our decode) says what Go's decode ``go`` says, field by field."""
    assert (frame.msg_id, frame.conn_id, frame.type) == (go["id"], go["connID"], go["type"])
    remaining = bytes.fromhex(go["remaining_body_hex"])
    t = frame.type
    if t == MessageType.CONNECT:
        assert frame.payload == bytes.fromhex(go["parsed_bytes_hex"]) + remaining
        assert parse_connect(frame.payload) == (go["proto"], go["address"])
    elif t in (MessageType.ADD_CLIENT, MessageType.REMOVE_CLIENT):
        assert frame.payload == bytes.fromhex(go["parsed_bytes_hex"]) + remaining
        key, session_key = parse_client(frame.payload)
        assert f"{key}/{session_key}" == go["address"]
    elif t == MessageType.ERROR:
        # Go's Err() consumed up to 100 bytes; remaining_body_hex is the rest
        text = parse_error_text(frame.payload)
        assert text == go["Err_text"]
        assert (text == "EOF") is go["Err_is_io_EOF"]
        assert frame.payload == text.encode() + remaining
    else:  # Data, Pause, Resume, SyncConnections, unknown types: all of it
        assert frame.payload == remaining
    if t == MessageType.SYNC_CONNECTIONS:
        assert parse_sync(frame.payload) == go["decoded_sync_ids"]
    if t in (MessageType.DATA, MessageType.CONNECT):
        assert frame.deadline is not None
    else:
        assert frame.deadline is None


# --- encode vectors --------------------------------------------------------


@pytest.mark.parametrize("item", params(encode_vectors))
def test_encode_vector(item: Vector) -> None:
    v = require(item)
    f = v["fields"]
    payload = bytes.fromhex(f["payload_hex"])
    assert len(payload) == f["payload_len"]
    if "sync_ids" in f:
        # Go's encodeConnectionIDs keeps the caller's order; ours sorts (Go sorts first too)
        assert f["sync_ids"] == sorted(f["sync_ids"])
        assert encode_sync(f["sync_ids"]) == payload
    if f["type"] == MessageType.CONNECT:
        assert payload == f"{f['proto']}/{f['address']}".encode()
    frame = Frame(f["id"], f["connID"], f["type"], payload)

    encoded = encode(frame)
    assert encoded.hex() == v["encoded_hex"]
    assert len(encoded) == v["encoded_len"]
    assert encode(Frame(f["id"], f["connID"], f["type"])).hex() == v["header_hex"]
    if f["type"] == MessageType.DATA:
        assert data_header(f["id"], f["connID"]).hex() == v["header_hex"]

    decoded = decode(encoded)
    check_against_go(decoded, v["go_decode"])
    assert decoded.payload == payload
    expected_deadline = LEGACY_DEADLINE if f["type"] in (1, 2) else None
    assert decoded == Frame(f["id"], f["connID"], f["type"], payload, expected_deadline)


# --- decode vectors --------------------------------------------------------


def expected_go_error(v: Vector) -> str | None:
    """The ``go_error`` our decode must raise for decode vector ``v`` (None: decodes)."""
    if v["newServerMessage_error"] is not None:
        return str(v["newServerMessage_error"])
    if v["go_decode"]["type"] not in STRUCTURAL_SESSION_TYPES:
        return None  # e.g. "connect not allowed" is policy, not the codec's business
    errors = {
        v[role]["serveMessage_error"]
        for role in ("client_session", "server_session")
        if v[role]["serveMessage_error"] is not None
    }
    assert len(errors) <= 1, f"client and server sessions disagree: {errors}"
    return errors.pop() if errors else None


@pytest.mark.parametrize("item", params(decode_vectors))
def test_decode_vector(item: Vector) -> None:
    v = require(item)
    data = bytes.fromhex(v["input_hex"])
    go_error = expected_go_error(v)
    if go_error is None:
        check_against_go(decode(data), v["go_decode"])
    else:
        with pytest.raises(FrameError) as info:
            decode(data)
        assert info.value.go_error == go_error
        assert isinstance(info.value, ProtocolError)


def test_decode_deviation_table_is_exact() -> None:
    """``DECODE_STRICTER_THAN_GO_CLIENT`` lists exactly the vectors where it applies."""
    stricter = set()
    for v in decode_vectors():
        if v["client_session"]["serveMessage_error"] is not None:
            continue  # Go's client fails too: no deviation
        try:
            decode(bytes.fromhex(v["input_hex"]))
        except FrameError:
            stricter.add(v["name"])
    assert stricter == set(DECODE_STRICTER_THAN_GO_CLIENT)


# --- whole, truncated, with trailing bytes ---------------------------------


def all_inputs() -> list[Any]:
    """Every recorded message: encode vectors' bytes and decode vectors' inputs."""

    def source() -> list[Vector]:
        enc = [{"name": v["name"], "hex": v["encoded_hex"]} for v in encode_vectors()]
        dec = [{"name": "decode:" + v["name"], "hex": v["input_hex"]} for v in decode_vectors()]
        return enc + dec

    return params(source)


def _outcome(data: bytes) -> Frame | FrameError:
    try:
        return decode(data)
    except FrameError as exc:
        error = exc
    assert error.go_error, "every FrameError carries Go's error text"
    return error


@pytest.mark.parametrize("item", all_inputs())
def test_every_prefix_decodes_or_raises_frame_error(item: Vector) -> None:
    data = bytes.fromhex(require(item)["hex"])
    whole = _outcome(data)
    for k in range(len(data)):
        part = _outcome(data[:k])  # anything but a Frame or a FrameError propagates
        if not isinstance(whole, Frame):
            continue
        header_len = len(data) - len(whole.payload)
        if k < header_len:
            assert isinstance(part, FrameError), f"prefix {k} of the header decoded"
            assert part.go_error in ("EOF", "unexpected EOF")
        elif isinstance(part, Frame):
            assert (part.msg_id, part.conn_id, part.type, part.deadline) == (
                whole.msg_id,
                whole.conn_id,
                whole.type,
                whole.deadline,
            )
            assert part.payload == data[header_len:k]
        else:
            # only payload validation can fail once the header is complete
            assert whole.type in (MessageType.CONNECT, *STRUCTURAL_SESSION_TYPES)
        if k >= header_len and whole.type in (
            MessageType.DATA,
            MessageType.ERROR,
            MessageType.PAUSE,
            MessageType.RESUME,
        ):
            assert isinstance(part, Frame), "these payloads are never validated"
        if k >= header_len and whole.type == MessageType.SYNC_CONNECTIONS:
            assert isinstance(part, Frame) == ((k - header_len) % 8 == 0)


#: Eight ASCII zeros: keeps every accepted frame valid (a decimal suffix for
#: Add/RemoveClient, one more id for SyncConnections, more address for Connect).
TRAILING = b"00000000"


@pytest.mark.parametrize("item", all_inputs())
def test_trailing_bytes_extend_the_payload(item: Vector) -> None:
    data = bytes.fromhex(require(item)["hex"])
    whole = _outcome(data)
    if isinstance(whole, FrameError):
        # a frame that fails in its header or in its first bytes of payload
        # may become valid with more bytes, but must never raise anything else
        _outcome(data + TRAILING)
        return
    if whole.type in (MessageType.ADD_CLIENT, MessageType.REMOVE_CLIENT):
        # the zeros that fit in the 100 bytes Go reads multiply the session key
        _, session_key = parse_client(whole.payload)
        shift = max(0, min(len(TRAILING), CLIENT_READ_LIMIT - len(whole.payload)))
        if not INT64_MIN <= session_key * 10**shift <= INT64_MAX:
            with pytest.raises(FrameError) as info:
                decode(data + TRAILING)
            assert str(info.value.go_error).endswith(": value out of range")
            return
    longer = decode(data + TRAILING)
    assert longer == Frame(
        whole.msg_id, whole.conn_id, whole.type, whole.payload + TRAILING, whole.deadline
    )
    if whole.type == MessageType.SYNC_CONNECTIONS:
        assert parse_sync(longer.payload) == [*parse_sync(whole.payload), 0x3030303030303030]
    if whole.type == MessageType.ERROR and len(whole.payload) >= ERROR_READ_LIMIT:
        assert parse_error_text(longer.payload) == parse_error_text(whole.payload)
    if whole.type == MessageType.CONNECT and len(whole.payload) >= CONNECT_READ_LIMIT:
        assert parse_connect(longer.payload) == parse_connect(whole.payload)


def test_decode_accepts_whole_message_only_once() -> None:
    """Two frames in one message are one frame whose payload holds the second."""
    a = encode(Frame(1, 7, MessageType.PAUSE))
    b = encode(Frame(2, 7, MessageType.RESUME))
    assert decode(a + b) == Frame(1, 7, MessageType.PAUSE, b)


# --- payload parsers and their read limits ---------------------------------


def test_connect_read_limit_boundary() -> None:
    inside = b"x" * (CONNECT_READ_LIMIT - 1) + b"/a"  # '/' is byte 266
    assert parse_connect(inside) == ("x" * (CONNECT_READ_LIMIT - 1), "")
    outside = b"x" * CONNECT_READ_LIMIT + b"/a"  # '/' is byte 267
    with pytest.raises(FrameError) as info:
        parse_connect(outside)
    assert info.value.go_error == "failed to parse connect address"


def test_connect_splits_at_first_slash() -> None:
    assert parse_connect(b"unix//var/run/docker.sock") == ("unix", "/var/run/docker.sock")
    assert parse_connect(b"c1::tcp/10.0.0.1:22") == ("c1::tcp", "10.0.0.1:22")
    assert parse_connect(b"/") == ("", "")


def test_error_text_read_limit() -> None:
    text = "E" * ERROR_READ_LIMIT
    assert parse_error_text((text + "tail").encode()) == text
    assert parse_error_text(b"") == ""


@pytest.mark.parametrize(
    ("payload", "parsed"),
    [
        (b"c1/1234567890", ("c1", 1234567890)),
        (b"c1/+5", ("c1", 5)),  # strconv.Atoi accepts a sign
        (b"c1/-5", ("c1", -5)),
        (b"c1/007", ("c1", 7)),
        (b"/0", ("", 0)),
        (b"a/b/1", None),  # split at the first '/': "b/1" is not a number
        (b"node-a/9223372036854775807", ("node-a", INT64_MAX)),
        (b"k" * 97 + b"/12345", ("k" * 97, 12)),  # only 100 bytes are read
    ],
)
def test_parse_client(payload: bytes, parsed: tuple[str, int] | None) -> None:
    if parsed is None:
        with pytest.raises(FrameError):
            parse_client(payload)
    else:
        assert parse_client(payload) == parsed


@pytest.mark.parametrize(
    ("number", "reason"),
    [
        ("", "invalid syntax"),
        ("+", "invalid syntax"),
        ("abc", "invalid syntax"),
        (" 77", "invalid syntax"),  # Python's int() strips whitespace; Go's Atoi does not
        ("77\n", "invalid syntax"),
        ("7_7", "invalid syntax"),  # Python's int() accepts underscores; Go's Atoi does not
        ("\u0663", "invalid syntax"),  # ARABIC-INDIC DIGIT THREE: int() accepts it
        ("9223372036854775808", "value out of range"),  # int64 overflow
        ("-9223372036854775809", "value out of range"),
    ],
)
def test_parse_client_follows_go_atoi(number: str, reason: str) -> None:
    text = f"c2/{number}"
    with pytest.raises(FrameError) as info:
        parse_client(text.encode())
    go_error = info.value.go_error
    assert go_error is not None
    assert go_error.startswith(f"invalid remote Session {text}: strconv.Atoi: parsing ")
    assert go_error.endswith(f": {reason}")
    if number.isprintable():  # Go's strconv.Quote escapes only non-printable text
        assert (
            go_error == f'invalid remote Session {text}: strconv.Atoi: parsing "{number}": {reason}'
        )


def test_parse_client_not_separated() -> None:
    with pytest.raises(FrameError) as info:
        parse_client(b"c2")
    assert info.value.go_error == "invalid remote Session c2: not / separated"
    long = b"k" * (CLIENT_READ_LIMIT + 5) + b"/1"
    with pytest.raises(FrameError) as info:
        parse_client(long)
    assert (
        info.value.go_error == f"invalid remote Session {'k' * CLIENT_READ_LIMIT}: not / separated"
    )


@given(st.lists(st.integers(INT64_MIN, INT64_MAX), max_size=40))
@FAST
def test_sync_roundtrip(ids: list[int]) -> None:
    payload = encode_sync(ids)
    assert len(payload) == 8 * len(ids)
    assert parse_sync(payload) == sorted(ids)
    assert payload == struct.pack(f"<{len(ids)}q", *sorted(ids))


@pytest.mark.parametrize("size", [1, 7, 9, 15, 17])
def test_sync_rejects_partial_ids(size: int) -> None:
    with pytest.raises(FrameError) as info:
        parse_sync(bytes(size))
    assert info.value.go_error == "decoding sync connections payload: incorrect data format"


# --- hypothesis: every valid frame round-trips ------------------------------

int64s = st.integers(INT64_MIN, INT64_MAX)
unknown_types = st.one_of(
    st.sampled_from([0, 9, 10, 99, -1, -8, INT64_MAX, INT64_MIN]),
    int64s.filter(lambda t: not 1 <= t <= 8),
)


def _no_slash(b: bytes) -> bytes:
    return b.replace(b"/", b"")


def _atoi_text(n: int, plus: bool) -> bytes:
    return (("+" if plus and n >= 0 else "") + str(n)).encode()


def payloads(t: int) -> st.SearchStrategy[bytes]:
    """Payloads Go accepts for type ``t`` (unknown types: anything)."""
    if t == MessageType.CONNECT:
        # the first '/' must be within the first 266 bytes; the rest is free
        proto = st.binary(max_size=CONNECT_READ_LIMIT - 1).map(_no_slash)
        return st.builds(lambda p, a: p + b"/" + a, proto, st.binary(max_size=400))
    if t in (MessageType.ADD_CLIENT, MessageType.REMOVE_CLIENT):
        # key without '/', then a decimal int64 (Go's strconv.Atoi), within 100 bytes
        key = st.binary(max_size=60).map(_no_slash)
        number = st.builds(_atoi_text, int64s, st.booleans())
        return st.builds(lambda k, n: k + b"/" + n, key, number)
    if t == MessageType.SYNC_CONNECTIONS:
        return st.lists(int64s, max_size=16).map(lambda ids: struct.pack(f"<{len(ids)}q", *ids))
    if t in (MessageType.PAUSE, MessageType.RESUME):
        return st.binary(max_size=8)  # ignored, but legal
    return st.binary(max_size=600)  # Data, Error, unknown types


def _frames_of_type(t: int) -> st.SearchStrategy[Frame]:
    deadline = int64s if t in (MessageType.DATA, MessageType.CONNECT) else st.none()
    return st.builds(Frame, int64s, int64s, st.just(t), payloads(t), deadline)


valid_frames = st.one_of(st.sampled_from([int(t) for t in MessageType]), unknown_types).flatmap(
    _frames_of_type
)


@given(valid_frames)
@FAST
@example(Frame(0, 0, MessageType.CONNECT, b"x" * 265 + b"/", 0))
@example(Frame(INT64_MIN, INT64_MAX, MessageType.DATA, b"", INT64_MIN))
@example(Frame(-1, -1, MessageType.ADD_CLIENT, b"/-9223372036854775808"))
def test_roundtrip_valid_frames(frame: Frame) -> None:
    encoded = encode(frame)
    decoded = decode(encoded)
    assert decoded == frame
    assert encode(decoded) == encoded
    if frame.type == MessageType.DATA:
        assert encoded == encode_varint(frame.msg_id) + encode_varint(frame.conn_id) + (
            b"\x02" + encode_varint(frame.deadline or 0) + frame.payload
        )


def _varint_soup() -> st.SearchStrategy[bytes]:
    """Bytes that start like a frame: a few varints (maybe broken), then a tail."""
    varint = st.one_of(int64s.map(encode_varint), st.binary(min_size=1, max_size=11))
    kind = st.sampled_from([int(t) for t in MessageType]).map(encode_varint)
    return st.builds(
        lambda a, b, k, d, tail: a + b + k + d + tail,
        varint,
        varint,
        st.one_of(kind, varint),
        st.one_of(st.just(b""), varint),
        st.binary(max_size=300),
    )


@given(st.one_of(st.binary(max_size=400), _varint_soup()))
@FAST
def test_decode_arbitrary_bytes(data: bytes) -> None:
    outcome = _outcome(data)  # a Frame, or a FrameError with Go's text; nothing else
    if isinstance(outcome, FrameError):
        return
    frame = outcome
    assert data.endswith(frame.payload)
    assert INT64_MIN <= frame.msg_id <= INT64_MAX
    assert INT64_MIN <= frame.conn_id <= INT64_MAX
    assert INT64_MIN <= frame.type <= INT64_MAX
    # what we accepted re-encodes (minimal varints) to a frame meaning the same
    assert decode(encode(frame)) == frame
