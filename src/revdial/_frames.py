"""remotedialer frame codec (sans-I/O: no trio, no clock, no sockets).

One remotedialer frame is one binary WebSocket message::

    varint message_id
    varint connection_id      (0 for session-level types)
    varint message_type
    varint legacy_deadline    only for Data (1) and Connect (2); we send 15000
    bytes  payload            the rest of the message, no length field

Every varint is Go's ``binary.PutVarint``: zigzag, then LEB128, 1..10 bytes.
Decoding follows Go's ``newServerMessage`` byte for byte, including its read
limits (Connect 266 bytes, Error/AddClient/RemoveClient 100 bytes) so that a
frame means to us exactly what it means to a Go peer; see
``docs/PROTOCOL.md`` section 2 and the vectors in ``tests/vectors/``.

The hot path (Data) is kept to a few Python operations per frame: small
varints come from a lookup table and the Data header is built by
:func:`data_header`, so the payload is never copied by the encoder.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from ._errors import FrameError

__all__ = [
    "CONNECT_READ_LIMIT",
    "CLIENT_READ_LIMIT",
    "ERROR_READ_LIMIT",
    "LEGACY_DEADLINE",
    "Frame",
    "ExtType",
    "MessageType",
    "decode",
    "decode_varint",
    "encode",
    "encode_varint",
    "data_header",
    "parse_client",
    "parse_connect",
    "parse_error_text",
    "parse_sync",
    "encode_sync",
]

#: What Go writes in the legacy deadline slot of Data and Connect (15 s in ms).
LEGACY_DEADLINE = 15000
#: Go reads at most this many bytes of a Connect payload (since v0.4.5-rc.2).
CONNECT_READ_LIMIT = 266
#: Go reads at most this many bytes of an Error text.
ERROR_READ_LIMIT = 100
#: Go reads at most this many bytes of an AddClient/RemoveClient payload.
CLIENT_READ_LIMIT = 100

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_UINT64_MASK = (1 << 64) - 1
_MAX_VARINT_LEN = 10


class MessageType(enum.IntEnum):
    DATA = 1
    CONNECT = 2
    ERROR = 3
    ADD_CLIENT = 4
    REMOVE_CLIENT = 5
    PAUSE = 6
    RESUME = 7
    SYNC_CONNECTIONS = 8


_KNOWN_TYPES = frozenset(int(t) for t in MessageType)


class ExtType(enum.IntEnum):
    """revdial protocol extension v1 (sent only when both sides negotiated it).

    Numbers far from Go's 1..8, which a Go peer would ignore anyway.
    """

    #: dialer -> opener: the target accepted the connection (confirmed dial).
    CONNECT_OK = 64
    #: either way: the sender will send no more Data on this connection.
    HALF_CLOSE = 65


def encode_varint(value: int) -> bytes:
    """Encode a signed 64-bit integer as Go's ``binary.PutVarint`` does."""
    if -64 <= value < 64:
        return _SMALL[value]
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"varint value out of int64 range: {value}")
    u = ((value << 1) ^ (value >> 63)) & _UINT64_MASK
    out = bytearray()
    while u >= 0x80:
        out.append((u & 0x7F) | 0x80)
        u >>= 7
    out.append(u)
    return bytes(out)


def _encode_small(value: int) -> bytes:
    u = (value << 1) ^ (value >> 63)
    return bytes([u & 0x7F])


_SMALL: dict[int, bytes] = {v: _encode_small(v) for v in range(-64, 64)}


def decode_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode one varint at ``pos``; return ``(value, next_pos)``.

    Mirrors Go's ``binary.ReadVarint``: end of data before the first byte is
    ``EOF``, inside the varint ``unexpected EOF``; more than 10 bytes, or a 10th
    byte above 1, overflow. Non-minimal encodings are accepted.
    """
    end = len(data)
    if pos >= end:
        raise FrameError("frame truncated: varint missing", go_error="EOF")
    b = data[pos]
    if b < 0x80:  # one-byte fast path
        return (b >> 1) ^ -(b & 1), pos + 1
    u = 0
    shift = 0
    for i in range(_MAX_VARINT_LEN):
        if pos >= end:
            raise FrameError("frame truncated inside a varint", go_error="unexpected EOF")
        b = data[pos]
        pos += 1
        if b < 0x80:
            if i == _MAX_VARINT_LEN - 1 and b > 1:
                break
            u |= b << shift
            return (u >> 1) ^ -(u & 1), pos
        u |= (b & 0x7F) << shift
        shift += 7
    raise FrameError(
        "varint overflows a 64-bit integer", go_error="binary: varint overflows a 64-bit integer"
    )


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded remotedialer frame.

    ``payload`` is everything after the header. ``type`` is kept as a plain
    ``int`` because unknown types are legal on the wire (and ignored).
    ``deadline`` is the legacy deadline of Data/Connect (read and ignored).
    """

    msg_id: int
    conn_id: int
    type: int
    payload: bytes = b""
    deadline: int | None = None


_LEGACY_DEADLINE_BYTES = encode_varint(LEGACY_DEADLINE)
_DATA_TYPE_AND_DEADLINE = encode_varint(MessageType.DATA) + _LEGACY_DEADLINE_BYTES


def data_header(msg_id: int, conn_id: int) -> bytes:
    """The header of a Data frame; the payload follows it unchanged."""
    return encode_varint(msg_id) + encode_varint(conn_id) + _DATA_TYPE_AND_DEADLINE


def encode(frame: Frame) -> bytes:
    """Encode a frame exactly as Go's ``message.Bytes()`` does."""
    head = encode_varint(frame.msg_id) + encode_varint(frame.conn_id) + encode_varint(frame.type)
    if frame.type in (MessageType.DATA, MessageType.CONNECT):
        deadline = LEGACY_DEADLINE if frame.deadline is None else frame.deadline
        head += encode_varint(deadline)
    return head + frame.payload


def decode(data: bytes) -> Frame:
    """Decode one WebSocket binary message.

    Raises :class:`FrameError` for everything Go's ``newServerMessage`` rejects
    (bad varints, a missing deadline, a Connect without ``/`` in its first 266
    bytes) and for the payload errors Go's session treats as fatal for every
    session (SyncConnections length not a multiple of 8, malformed
    AddClient/RemoveClient).
    """
    msg_id, pos = decode_varint(data, 0)
    conn_id, pos = decode_varint(data, pos)
    mtype, pos = decode_varint(data, pos)
    deadline: int | None = None
    if mtype == 1 or mtype == 2:  # Data, Connect  # noqa: PLR1714 (hot path)
        deadline, pos = decode_varint(data, pos)
    payload = data[pos:]
    frame = Frame(msg_id, conn_id, mtype, payload, deadline)
    if mtype != 1 and mtype in _KNOWN_TYPES:
        _validate(frame)
    return frame


def _validate(frame: Frame) -> None:
    t = frame.type
    if t == MessageType.CONNECT:
        parse_connect(frame.payload)
    elif t == MessageType.SYNC_CONNECTIONS:
        parse_sync(frame.payload)
    elif t in (MessageType.ADD_CLIENT, MessageType.REMOVE_CLIENT):
        parse_client(frame.payload)


def parse_connect(payload: bytes) -> tuple[str, str]:
    """Split a Connect payload into ``(proto, address)`` as Go does.

    Only the first 266 bytes count; the split is at the first ``/``.
    """
    head = payload[:CONNECT_READ_LIMIT].decode("utf-8", "replace")
    proto, sep, address = head.partition("/")
    if not sep:
        raise FrameError(
            "Connect payload has no '/' (expected proto/address)",
            go_error="failed to parse connect address",
        )
    return proto, address


def parse_error_text(payload: bytes) -> str:
    """The text of an Error frame as a Go peer reads it (first 100 bytes)."""
    return payload[:ERROR_READ_LIMIT].decode("utf-8", "replace")


def parse_client(payload: bytes) -> tuple[str, int]:
    """Split an AddClient/RemoveClient payload ``clientKey/sessionKey``."""
    text = payload[:CLIENT_READ_LIMIT].decode("utf-8", "replace")
    key, sep, session = text.partition("/")
    if not sep:
        raise FrameError(
            f"invalid remote session {text!r}: not / separated",
            go_error=f"invalid remote Session {text}: not / separated",
        )
    # Go's strconv.Atoi: optional sign, ASCII digits only, int64 range. (Python's
    # int() would also take whitespace, '_' and non-ASCII digits, or any size.)
    digits = session[1:] if session[:1] in ("+", "-") else session
    if not (digits.isascii() and digits.isdigit()):
        raise FrameError(
            f"invalid remote session {text!r}: session key is not an integer",
            go_error=f'invalid remote Session {text}: strconv.Atoi: parsing "{session}": '
            "invalid syntax",
        )
    session_key = int(session, 10)
    if not _INT64_MIN <= session_key <= _INT64_MAX:
        raise FrameError(
            f"invalid remote session {text!r}: session key out of int64 range",
            go_error=f'invalid remote Session {text}: strconv.Atoi: parsing "{session}": '
            "value out of range",
        )
    return key, session_key


def parse_sync(payload: bytes) -> list[int]:
    """The connection ids of a SyncConnections payload (8-byte LE int64 each)."""
    if len(payload) % 8:
        raise FrameError(
            f"SyncConnections payload of {len(payload)} bytes is not a multiple of 8",
            go_error="decoding sync connections payload: incorrect data format",
        )
    return [v for (v,) in struct.iter_unpack("<q", payload)]


def encode_sync(conn_ids: Iterable[int]) -> bytes:
    """A SyncConnections payload listing ``conn_ids`` in ascending order."""
    ids = sorted(conn_ids)
    return struct.pack(f"<{len(ids)}q", *ids)
