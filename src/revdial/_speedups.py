"""Optional C speed-ups for wsproto's hot path.

wsproto masks WebSocket payloads in pure Python (about 0.5 GB/s here), which
halves the agent -> server direction: RFC 6455 requires clients to mask every
frame, so it cannot be skipped. The ``websockets`` package ships a C
``apply_mask`` (tens of GB/s); when it is importable we give wsproto a masker
built on it. The replacement has wsproto's exact semantics (the key rotates
across calls, so a frame may be processed in pieces) and is checked against
the original by a property test. Without ``websockets`` nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["FastMasker", "install_fast_masker", "fast_mask_available"]

_apply_mask: Callable[[bytes | bytearray | memoryview, bytes], bytes] | None
try:
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - depends on the environment
    _apply_mask = None


def fast_mask_available() -> bool:
    return _apply_mask is not None


class FastMasker:
    """Drop-in for ``wsproto.frame_protocol.XorMaskerSimple``."""

    __slots__ = ("_key",)

    def __init__(self, masking_key: bytes | bytearray) -> None:
        self._key = bytes(masking_key)

    def process(self, data: bytes | bytearray) -> bytearray:
        n = len(data)
        if not n:
            return bytearray()
        assert _apply_mask is not None
        out = bytearray(_apply_mask(data, self._key))
        r = n & 3
        if r:
            self._key = self._key[r:] + self._key[:r]
        return out


def install_fast_masker() -> bool:
    """Make wsproto use :class:`FastMasker`; returns False if unavailable."""
    if _apply_mask is None:
        return False
    from wsproto import frame_protocol

    frame_protocol.XorMaskerSimple = FastMasker  # type: ignore[misc,assignment]
    return True
