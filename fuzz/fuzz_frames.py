"""Fuzz the frame codec: ``python -m fuzz.fuzz_frames --seconds N``.

Inputs: arbitrary bytes, mutated Go-recorded messages, "varint soup" (a few
real or broken varints, then a tail) and re-encoded valid frames.

Invariant: ``decode(data)`` returns a :class:`Frame` or raises
:class:`FrameError` carrying Go's error text -- nothing else; an accepted
frame's fields are int64, its payload is the message's tail, it re-encodes to
a frame that decodes identically (byte-identical unless the input used
non-minimal varints), and the payload parser for its type accepts it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from fuzz import FuzzRun, fuzz_settings, main, mutated, seed_messages
from revdial._errors import FrameError
from revdial._frames import (
    ERROR_READ_LIMIT,
    Frame,
    MessageType,
    decode,
    decode_varint,
    encode,
    encode_varint,
    parse_client,
    parse_connect,
    parse_error_text,
    parse_sync,
)

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
int64s = st.integers(INT64_MIN, INT64_MAX)


def _in_int64(value: int) -> bool:
    return INT64_MIN <= value <= INT64_MAX


def check_message(data: bytes) -> None:
    """Accepted, or FrameError with Go's error text; nothing else."""
    try:
        frame = decode(data)
    except FrameError as exc:
        if not exc.go_error:
            raise AssertionError(f"FrameError without go_error: {exc}") from exc
        return
    assert isinstance(frame, Frame)
    assert isinstance(frame.payload, bytes)
    assert data.endswith(frame.payload)
    assert _in_int64(frame.msg_id)
    assert _in_int64(frame.conn_id)
    assert _in_int64(frame.type)
    has_deadline = frame.type in (MessageType.DATA, MessageType.CONNECT)
    assert (frame.deadline is not None) == has_deadline
    if frame.deadline is not None:
        assert _in_int64(frame.deadline)

    again = encode(frame)
    assert decode(again) == frame
    assert len(again) <= len(data)
    if len(again) == len(data):  # all varints were minimal: same bytes
        assert again == data

    t = frame.type
    if t == MessageType.CONNECT:
        proto, _address = parse_connect(frame.payload)
        assert "/" not in proto
    elif t in (MessageType.ADD_CLIENT, MessageType.REMOVE_CLIENT):
        key, session_key = parse_client(frame.payload)
        assert "/" not in key
        assert _in_int64(session_key)
    elif t == MessageType.SYNC_CONNECTIONS:
        assert len(parse_sync(frame.payload)) * 8 == len(frame.payload)
    elif t == MessageType.ERROR:
        # one character per byte at most (invalid UTF-8 becomes U+FFFD)
        assert len(parse_error_text(frame.payload)) <= ERROR_READ_LIMIT


VARINT_ERRORS = ("EOF", "unexpected EOF", "binary: varint overflows a 64-bit integer")


def check_varints(data: bytes) -> None:
    """decode_varint at every offset: a value in int64 after 1..10 bytes, or FrameError."""
    for pos in range(min(len(data), 16) + 1):
        try:
            value, end = decode_varint(data, pos)
        except FrameError as exc:
            go_error = exc.go_error
        else:
            go_error = None
        if go_error is not None:
            assert go_error in VARINT_ERRORS
            continue
        assert _in_int64(value)
        assert 1 <= end - pos <= 10
        assert decode_varint(encode_varint(value), 0) == (value, len(encode_varint(value)))


def varint_soup() -> st.SearchStrategy[bytes]:
    varint = st.one_of(int64s.map(encode_varint), st.binary(min_size=1, max_size=11))
    kind = st.one_of(st.integers(-2, 10), int64s).map(encode_varint)
    return st.builds(
        lambda a, b, k, d, tail: a + b + k + d + tail,
        varint,
        varint,
        st.one_of(kind, varint),
        st.one_of(st.just(b""), varint),
        st.binary(max_size=400),
    )


def reencoded_frames() -> st.SearchStrategy[bytes]:
    """Structurally valid headers with any payload (may fail payload validation)."""
    return st.builds(
        lambda m, c, t, d, p: encode(Frame(m, c, t, p, d)),
        int64s,
        int64s,
        st.one_of(st.integers(0, 9), int64s),
        int64s,
        st.one_of(
            st.binary(max_size=400),
            st.binary(max_size=300).map(lambda b: b + b"/" + b),
            st.lists(int64s, max_size=8).map(
                lambda ids: b"".join(i.to_bytes(8, "little", signed=True) for i in ids)
            ),
        ),
    )


def build(run: FuzzRun) -> Callable[[], None]:
    seeds = seed_messages()
    messages = st.one_of(
        st.binary(max_size=600),
        mutated(seeds),
        varint_soup(),
        reencoded_frames(),
    )

    @given(messages)
    @fuzz_settings(max_examples=500)
    def fuzz(data: bytes) -> None:
        def check() -> None:
            check_message(data)
            check_varints(data)

        run.record(data.hex, check)

    return fuzz


if __name__ == "__main__":
    sys.exit(main("fuzz_frames", build))
