"""Speed-ups for wsproto's send path, installed when revdial is imported.

wsproto is correct but copies every outgoing payload four or five times
(``bytearray(payload)``, ``header + payload``, ``bytearray(...)``, and in the
client direction once more per masking step) and masks in pure Python (about
0.5 GB/s here). RFC 6455 requires clients to mask every frame, so masking
cannot be skipped: without help the agent -> server direction runs at half
the speed of the other.

* :class:`FastMasker` replaces ``wsproto.frame_protocol.XorMaskerSimple`` with
  the C ``apply_mask`` of the ``websockets`` package (tens of GB/s). Same
  semantics: the key rotates across calls, so a frame may be unmasked in
  pieces.
* :func:`serialize_frame` replaces ``FrameProtocol._serialize_frame`` for
  connections without WebSocket extensions (revdial negotiates none): the
  header is built directly and joined with the (masked) payload in one copy.
  Connections with extensions (permessage-deflate) keep wsproto's own.
  Masking keys come from the OS CSPRNG (``os.urandom``) as wsproto's do, but
  drawn 4 KiB at a time (:class:`KeyPool`): one ``getrandom`` syscall per
  1,024 frames instead of one per frame.

Both are checked against wsproto's originals by property tests
(``tests/test_speedups.py``). Without ``websockets`` nothing is replaced.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

__all__ = [
    "ORIGINALS",
    "FastMasker",
    "KeyPool",
    "fast_mask_available",
    "install",
    "mask_key",
    "serialize_frame",
]

_apply_mask: Callable[[bytes | bytearray | memoryview, bytes], bytes] | None
try:
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - depends on the environment
    _apply_mask = None

_MAX_PAYLOAD_NORMAL = 125
_MAX_PAYLOAD_TWO_BYTE = 0xFFFF
#: wsproto's own functions, kept for connections with extensions and tests.
ORIGINALS: dict[str, Any] = {}


class KeyPool:
    """Masking keys: four fresh bytes each from the OS CSPRNG, fetched 4 KiB at a time.

    Each key is used once and never derived from another, so keys stay as
    unpredictable as ``os.urandom(4)`` (RFC 6455 5.3); only the syscall is
    shared.
    """

    __slots__ = ("_offset", "_pool", "_urandom")
    BLOCK = 4096

    def __init__(self, urandom: Callable[[int], bytes] = os.urandom) -> None:
        self._urandom = urandom
        self._pool = b""
        self._offset = 0

    def take(self) -> bytes:
        offset = self._offset
        if offset >= len(self._pool):
            self._pool = self._urandom(self.BLOCK)
            offset = 0
        self._offset = offset + 4
        return self._pool[offset : offset + 4]


#: The process's masking keys (trio runs one thread; no lock needed).
mask_key = KeyPool().take


def fast_mask_available() -> bool:
    return _apply_mask is not None


class FastMasker:
    """Drop-in for ``wsproto.frame_protocol.XorMaskerSimple``."""

    __slots__ = ("_key",)

    def __init__(self, masking_key: bytes | bytearray) -> None:
        self._key = bytes(masking_key)

    def process(self, data: bytes | bytearray) -> bytes:
        n = len(data)
        if not n:
            return b""
        assert _apply_mask is not None
        out = _apply_mask(data, self._key)
        r = n & 3
        if r:
            self._key = self._key[r:] + self._key[:r]
        return out


def serialize_frame(
    self: Any, opcode: Any, payload: bytes | bytearray = b"", fin: bool = True
) -> bytes:
    """``FrameProtocol._serialize_frame`` with one copy of the payload."""
    if self.extensions:
        return bytes(ORIGINALS["serialize_frame"](self, opcode, payload, fin))
    n = len(payload)
    first = (0x80 if fin else 0) | int(opcode)
    mask_bit = 0x80 if self.client else 0
    if n <= _MAX_PAYLOAD_NORMAL:
        header = bytes((first, mask_bit | n))
    elif opcode.iscontrol():
        raise ValueError("payload too long for control frame")
    elif n <= _MAX_PAYLOAD_TWO_BYTE:
        header = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, n)
    if self.client:
        assert _apply_mask is not None
        # RFC 6455 5.3: a fresh, unpredictable key for every frame.
        key = mask_key()
        return b"".join((header, key, _apply_mask(payload, key) if n else b""))
    return b"".join((header, payload))


def install() -> bool:
    """Install both replacements into wsproto; False if ``websockets`` is missing."""
    if _apply_mask is None:
        return False
    from wsproto import frame_protocol

    ORIGINALS.setdefault("serialize_frame", frame_protocol.FrameProtocol._serialize_frame)
    ORIGINALS.setdefault("masker", frame_protocol.XorMaskerSimple)
    frame_protocol.XorMaskerSimple = FastMasker  # type: ignore[misc,assignment]
    frame_protocol.FrameProtocol._serialize_frame = serialize_frame  # type: ignore[assignment,method-assign]
    return True
