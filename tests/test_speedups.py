"""The wsproto speed-ups are exact replacements of wsproto's own code."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameDecoder, FrameProtocol, Opcode

from revdial import _speedups

pytestmark = pytest.mark.skipif(
    not _speedups.fast_mask_available(), reason="websockets' C apply_mask is not installed"
)

ORIGINAL_MASKER = _speedups.ORIGINALS["masker"]
ORIGINAL_SERIALIZE = _speedups.ORIGINALS["serialize_frame"]


def test_installed() -> None:
    """Importing revdial installs both (the session module does it)."""
    import wsproto.frame_protocol as fp

    import revdial  # noqa: F401

    installed: dict[str, object] = {
        "masker": fp.XorMaskerSimple,
        "serialize": fp.FrameProtocol._serialize_frame,
    }
    assert installed == {"masker": _speedups.FastMasker, "serialize": _speedups.serialize_frame}


@given(key=st.binary(min_size=4, max_size=4), pieces=st.lists(st.binary(max_size=300)))
@settings(max_examples=200, deadline=None)
def test_masker_matches_wsproto_across_pieces(key: bytes, pieces: list[bytes]) -> None:
    ours = _speedups.FastMasker(key)
    theirs = ORIGINAL_MASKER(key)
    for piece in pieces:  # the key rotates across calls in both
        assert bytes(ours.process(piece)) == bytes(theirs.process(bytearray(piece)))


OPCODES = st.sampled_from([Opcode.BINARY, Opcode.TEXT, Opcode.CONTINUATION])
SIZES = st.sampled_from([0, 1, 125, 126, 127, 65535, 65536, 70000])


@given(client=st.booleans(), opcode=OPCODES, size=SIZES, fin=st.booleans(), seed=st.binary())
@settings(max_examples=120, deadline=None)
def test_serialize_matches_wsproto(
    client: bool, opcode: Opcode, size: int, fin: bool, seed: bytes
) -> None:
    payload = (seed or b"x") * (size // max(1, len(seed or b"x")) + 1)
    payload = payload[:size]
    proto = FrameProtocol(client, [])
    ours = _speedups.serialize_frame(proto, opcode, payload, fin)
    theirs = bytes(ORIGINAL_SERIALIZE(proto, opcode, payload, fin))
    if not client:
        assert ours == theirs
        return
    # Masked: the keys are random, so compare after decoding both as a server.
    assert len(ours) == len(theirs)
    assert ours[0] == theirs[0]
    for frame in (ours, theirs):
        decoder = FrameDecoder(client=False)
        decoder.receive_bytes(frame)
        decoded = decoder.process_buffer()
        assert decoded is not None
        assert isinstance(decoded.payload, bytes | bytearray)
        assert bytes(decoded.payload) == payload
        assert decoded.message_finished == fin
        assert decoded.opcode is opcode


def test_control_frame_limit_kept() -> None:
    proto = FrameProtocol(False, [])
    with pytest.raises(ValueError, match="control frame"):
        _speedups.serialize_frame(proto, Opcode.PING, b"x" * 126)
    assert _speedups.serialize_frame(proto, Opcode.PING, b"x" * 125)[:2] == bytes([0x89, 125])


def test_fresh_mask_key_per_frame() -> None:
    proto = FrameProtocol(True, [])
    payload = os.urandom(64)
    keys = {_speedups.serialize_frame(proto, Opcode.BINARY, payload)[2:6] for _ in range(32)}
    assert len(keys) > 1


def test_mask_keys_are_fresh_and_fetched_in_blocks() -> None:
    calls: list[int] = []
    returned: list[bytes] = []

    def counting(n: int) -> bytes:
        calls.append(n)
        returned.append(os.urandom(n))
        return returned[-1]

    pool = _speedups.KeyPool(counting)
    keys = [pool.take() for _ in range(3000)]
    assert all(len(k) == 4 for k in keys)
    # One syscall per 1,024 keys.
    assert calls == [4096, 4096, 4096]
    # Every key is the next 4 bytes of what the OS generator returned, used once.
    assert b"".join(keys) == b"".join(returned)[: 4 * len(keys)]
    assert len(set(keys)) > 2990  # 32-bit keys: a handful of collisions at most


def test_client_frames_take_their_keys_from_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    blocks: list[bytes] = []

    def urandom(n: int) -> bytes:
        blocks.append(os.urandom(n))
        return blocks[-1]

    monkeypatch.setattr(_speedups, "mask_key", _speedups.KeyPool(urandom).take)
    proto = FrameProtocol(client=True, extensions=[])
    frames = [_speedups.serialize_frame(proto, Opcode.BINARY, b"abcd") for _ in range(8)]
    keys = [f[2:6] for f in frames]  # header: 2 bytes, then the 4-byte key
    assert len(blocks) == 1
    assert b"".join(keys) == blocks[0][:32]
