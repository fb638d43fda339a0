"""Handshake slots that waiting for the peer does not hold.

The server lets ``Limits.max_concurrent_handshakes`` connections work on
their opening handshake at once, so that a whole fleet coming back does not
starve the sessions already up (see that limit's comment). A slot is for
*work*: TLS crypto, parsing, authorization, the 101. A connection that is
only waiting for bytes -- a slow link, or a slow-loris client dribbling its
ClientHello or request head -- must not hold one, or 32 of them delay every
honest agent by ``handshake_timeout``. So:

* the request head is read before a slot is taken (:func:`read_request_head`:
  h11 says where it ends, bounded like wsproto's own parser), and handed to
  trio-websocket afterwards by :class:`ReplayStream`;
* with TLS, :class:`SlotGate` sits under the ``SSLStream`` during the TLS
  handshake: it takes a slot when bytes arrive and gives it back whenever the
  handshake has to wait for more, so the slot covers the handshake's crypto
  but not a ClientHello (or Finished) dribbled byte by byte.

``handshake_timeout`` still bounds the whole (TLS, head, wait for a slot,
upgrade): a dribbler is cut at the deadline as before.
"""

from __future__ import annotations

import h11
import trio

from ._wrapped import WrappedStream

__all__ = ["ReplayStream", "SlotGate", "read_request_head"]


async def read_request_head(stream: trio.abc.ReceiveStream, read_size: int) -> bytes:
    """Read from ``stream`` until an HTTP/1.1 request head is complete.

    Returns every byte read (the head and whatever followed it in the same
    reads). Stops early -- returning what it has -- at end of stream or when
    h11 finds the bytes malformed or the head over its 16 KiB bound: wsproto
    parses the same bytes again and answers them as it always did (400,
    431, close). Reads ``read_size`` at a time, as trio-websocket's reader
    does (so an oversized head is read as far as before, and its answer is
    not lost to a reset for unread bytes); holds at most h11's 16 KiB bound
    plus one read. The caller bounds the time; cancellation loses the bytes
    read (the connection is closed then anyway).
    """
    conn = h11.Connection(h11.SERVER)
    buf = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return bytes(buf)
        if event is not h11.NEED_DATA:
            return bytes(buf)
        data = await stream.receive_some(read_size)
        buf += data
        conn.receive_data(bytes(data))  # b"": end of stream (then no NEED_DATA again)


class ReplayStream(WrappedStream):
    """``inner``, with ``data`` (already read from it) received first."""

    __slots__ = ("_data",)

    def __init__(self, inner: trio.abc.Stream, data: bytes) -> None:
        super().__init__(inner)
        self._data = data

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._data:
            await trio.lowlevel.checkpoint()
            n = len(self._data) if max_bytes is None else max_bytes
            out, self._data = self._data[:n], self._data[n:]
            return out
        return await self.inner.receive_some(max_bytes)


class SlotGate(WrappedStream):
    """Under a TLS handshake: hold a slot of ``slots`` only while there is work.

    Each ``receive_some`` gives the slot back before it waits for the peer
    and takes one (waiting its turn) once bytes arrived, so the TLS layer
    works on them -- and sends its answer -- holding a slot. :meth:`open`
    ends this (after the handshake): the slot is given back and the gate is a
    plain pass-through from then on. ``aclose`` gives it back too.
    """

    __slots__ = ("_holding", "_slots", "gated")

    def __init__(self, inner: trio.abc.Stream, slots: trio.CapacityLimiter) -> None:
        super().__init__(inner)
        self._slots = slots
        self._holding = False
        self.gated = True

    @property
    def holding(self) -> bool:
        """Whether the gate holds a slot right now."""
        return self._holding

    def _release(self) -> None:
        if self._holding:
            self._holding = False
            self._slots.release_on_behalf_of(self)

    def open(self) -> None:
        """Stop gating: give the slot back; receive without one from now on."""
        self._release()
        self.gated = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self.gated:
            return await self.inner.receive_some(max_bytes)
        self._release()
        data = await self.inner.receive_some(max_bytes)
        await self._slots.acquire_on_behalf_of(self)
        self._holding = True
        return data

    async def aclose(self) -> None:
        self.open()
        await self.inner.aclose()
