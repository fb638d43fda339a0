"""TunnelStream: one multiplexed connection, as a ``trio.abc.Stream``."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ._errors import (
    DialConnectionRefusedError,
    DialError,
    DialRefusedError,
    DialSessionLostError,
    DialTimeoutError,
    DialUnreachableError,
    HalfCloseUnsupportedError,
    NoSuchClientError,
    SessionLostError,
    StreamResetError,
    TunnelError,
)
from ._stats import dial_result

if TYPE_CHECKING:
    from ._session import Session

__all__ = ["POLICY_REFUSAL_PREFIX", "TOO_MANY_DIALS_PREFIX", "TunnelStream", "classify_dial_error"]

#: Prefix of the Error text our agent sends when its allow policy refuses a dial.
POLICY_REFUSAL_PREFIX = "revdial: dial not allowed"
#: Prefix of the Error text our agent sends when ``max_pending_dials`` are in progress.
TOO_MANY_DIALS_PREFIX = "revdial: too many dials in progress"
_TIMEOUT_MARKERS = ("i/o timeout", "timed out", "timeout")
#: A peer's reply to Data for an id it no longer knows: the stream was closed
#: on that side, not refused.
_NOT_FOUND_PREFIX = "connection not found"
#: A Go server's (and a revdial peer's) Error text for a dial to a client it lacks.
NO_SESSION_PREFIX = "failed to find Session for client"


def classify_dial_error(reason: str, client_key: str, target: str) -> DialError:
    """Turn an agent's Error text for a failed dial into a typed DialError."""
    msg = f"dial {target} via client {client_key!r} failed: {reason}"
    kw = {"reason": reason, "client_key": client_key, "target": target}
    if reason.startswith(NO_SESSION_PREFIX):
        # A peer server (Go or revdial) no longer holds the client it announced.
        return NoSuchClientError(msg, **kw)
    if reason.startswith((POLICY_REFUSAL_PREFIX, TOO_MANY_DIALS_PREFIX)) or (
        reason == "connect not allowed"
    ):
        return DialRefusedError(msg, **kw)
    lowered = reason.lower()
    if any(m in lowered for m in _TIMEOUT_MARKERS):
        return DialTimeoutError(msg, **kw)
    if "connection refused" in lowered:
        return DialConnectionRefusedError(msg, **kw)
    return DialUnreachableError(msg, **kw)


class TunnelStream(trio.abc.HalfCloseableStream):
    """A bidirectional byte stream carried by a remotedialer session.

    The receive side is a byte-bounded buffer filled by the session's reader
    (never blocking it); flow control is the session state's business. The
    send side splits writes into Data frames of at most ``max_frame_size`` and
    waits while the peer has paused the stream or the session's outbox is full.

    Errors follow trio: :class:`trio.ClosedResourceError` after *you* closed
    it, :class:`trio.BusyResourceError` for two concurrent receivers or
    senders; everything the peer or network does is a
    :class:`~revdial.TunnelError` (:class:`~revdial.DialError` for a dial that
    failed, :class:`~revdial.StreamResetError`,
    :class:`~revdial.SessionLostError`). After the peer's orderly close,
    ``receive_some`` returns ``b""`` and ``send_all`` raises
    :class:`trio.BrokenResourceError`.

    Half-close (:meth:`send_eof`) needs the revdial extension on the session
    (:attr:`supports_half_close`); plain remotedialer (a Go peer) cannot
    express it and :meth:`send_eof` raises
    :class:`~revdial.HalfCloseUnsupportedError`.
    """

    __slots__ = (
        "_buffer",
        "_closed",
        "_confirmed",
        "_detached",
        "_dial_started",
        "_dial_timeout",
        "_drain_spawn",
        "_eof_sent",
        "_error",
        "_fifo_hold",
        "_first_byte_deadline",
        "_lot",
        "_opened_by_us",
        "_peer_eof",
        "_peer_paused",
        "_peer_write_closed",
        "_queued",
        "_received",
        "_receiving",
        "_sending",
        "_session",
        "_sink",
        "_small_pending",
        "conn_id",
        "target",
    )

    def __init__(self, session: Session, conn_id: int, target: str, *, opened_by_us: bool) -> None:
        self._session = session
        self.conn_id = conn_id
        #: ``proto/address`` of the connection.
        self.target = target
        self._opened_by_us = opened_by_us
        # A list, not a deque: an idle stream costs 56 bytes instead of ~600,
        # and buffers hold a handful of chunks, so pop(0) is cheap.
        self._buffer: list[bytes] = []
        self._peer_eof = False  # orderly full close by the peer (Error "EOF")
        self._peer_write_closed = False  # the peer half-closed (extension v1)
        self._eof_sent = False  # we half-closed
        self._confirmed = False  # extension v1: the peer's dial succeeded
        #: When we sent the Connect (trio clock) while the dial's outcome is
        #: unknown; None otherwise (streams the peer opened, outcome counted).
        self._dial_started: float | None = None
        #: base protocol: fail the first receive if nothing arrived by then
        self._first_byte_deadline = math.inf
        self._dial_timeout = 0.0  # the connect timeout in force (for the error text)
        self._error: BaseException | None = None  # raised once the buffer is drained
        self._queued = 0  # our Data bytes waiting in the session's outbox
        #: Our Connect / CONNECT_OK is queued until the session's writer has
        #: taken this many outbox items; until then Data keeps to the queue.
        self._fifo_hold = 0
        #: A small Data frame of ours waits in the session's small-frame lane.
        self._small_pending = False
        self._closed = False  # by us
        #: The peer reused our id for a new connection: never touch the session again.
        self._detached = False
        self._peer_paused = False
        self._received = False
        # One lot for readers and writers (each loop re-checks its condition
        # after waking): half the memory of an idle stream's wait queues.
        self._lot: trio.lowlevel.ParkingLot | None = None  # made by the first park
        self._receiving = False
        self._sending = False
        #: A non-blocking write to the local socket this stream is spliced to
        #: (see :meth:`_feed`); None when nothing is spliced.
        self._sink: Callable[[bytes], int] | None = None
        #: Set by a splice that has no receiving task yet (see
        #: :meth:`_receive_lazily`): starts one; called once, by :meth:`_wake`.
        self._drain_spawn: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<TunnelStream {self.conn_id} {self.target}>"

    @property
    def session(self) -> Session:
        return self._session

    @property
    def peer_closed(self) -> bool:
        """True once the peer closed the stream (orderly or not)."""
        return self._peer_eof or self._error is not None

    @property
    def error(self) -> TunnelError | None:
        """The failure that ended the stream, or ``None``.

        Set when the session was lost (:class:`~revdial.SessionLostError`),
        the peer reset the stream or it was reset for exceeding a limit
        (:class:`~revdial.StreamResetError`), or the dial failed
        (:class:`~revdial.DialError`); ``None`` while the stream is healthy
        and after an orderly close. Lets a caller that was cancelled (a
        session's handlers are, when it ends) still say why.
        """
        error = self._error
        return error if isinstance(error, TunnelError) else None

    @property
    def supports_half_close(self) -> bool:
        """True if :meth:`send_eof` works (the session negotiated extension v1)."""
        return self._session.extensions >= 1

    # --- called by the session driver (synchronously) ---------------------

    def _dial_done(self, result: str) -> None:
        """Count the dial's outcome once (if this stream is a dial of ours)."""
        started = self._dial_started
        if started is not None:
            self._dial_started = None
            self._session.dial_stats.record(result, trio.current_time() - started)
            self._session._dial_finished()

    def _feed(self, data: bytes) -> None:
        self._received = True
        if self._dial_started is not None:  # plain remotedialer: the first byte means connected
            self._dial_done("ok")
        sink = self._sink
        if (
            sink is not None
            and (self._receiving or self._drain_spawn is not None)
            and not self._buffer
            and len(data) <= self._session.limits.small_frame_bytes
        ):
            # The splice's receiver waits here with nothing buffered, so
            # nothing can overtake these bytes: write them to the local socket
            # right away, in the session's reader, instead of waking the
            # receiver for a hand-off (a task switch and a scheduler round per
            # message). What the socket does not take now -- it would block,
            # or it failed -- goes the usual way, and the receiver's own write
            # meets the backpressure or the error. Bulk frames always go that
            # way: the receiver's send_all waits for the socket without copying
            # the rest of a frame the socket took only part of.
            try:
                sent = sink(data)
            except OSError:
                sent = 0
            if sent:
                self._session._consumed(self.conn_id, sent)
                if sent >= len(data):
                    return
                data = data[sent:]
        self._buffer.append(data)
        self._wake()

    def _dial_confirmed(self) -> None:
        self._dial_done("ok")
        self._confirmed = True
        self._first_byte_deadline = math.inf  # a connected target may stay silent
        self._unpark()

    def _peer_half_closed(self) -> None:
        self._peer_write_closed = True
        self._wake()

    def _dequeued(self, nbytes: int) -> None:
        """The writer took ``nbytes`` of our Data out of the outbox."""
        self._queued -= nbytes
        if self._sending:
            self._unpark()

    def _set_peer_paused(self, paused: bool) -> None:
        self._peer_paused = paused
        if not paused:
            self._unpark()

    def _peer_closed(self, error: str | None, received_data: bool) -> None:
        """The peer sent Error for this stream (``None`` = orderly EOF)."""
        if error is None:
            self._dial_done("ok")
            self._peer_eof = True
            self._confirmed = True
        elif (
            self._opened_by_us
            and not received_data
            and not error.startswith(_NOT_FOUND_PREFIX)
        ):
            self._error = classify_dial_error(error, self._session.client_key, self.target)
        else:
            self._error = StreamResetError(
                f"stream {self.target} reset by peer: {error}", reason=error
            )
        if self._dial_started is not None and self._error is not None:
            self._dial_done(dial_result(self._error))
        self._wake()

    def _fail(self, exc: TunnelError, *, drop_buffer: bool) -> None:
        """Fail the stream locally (session lost, overrun, reaped)."""
        if self._error is None:
            if isinstance(exc, SessionLostError) and self._opened_by_us and not self._received:
                exc = DialSessionLostError(
                    str(exc), client_key=self._session.client_key, target=self.target
                )
            self._error = exc
        if self._dial_started is not None:
            self._dial_done(dial_result(exc))
        if drop_buffer:
            self._buffer.clear()
        self._wake()

    def _detach(self) -> None:
        """The session gave our id to a new connection; keep off its tables."""
        self._detached = True

    def _unpark(self) -> None:
        if self._lot:
            self._lot.unpark_all()

    def _parking_lot(self) -> trio.lowlevel.ParkingLot:
        lot = self._lot
        if lot is None:
            lot = self._lot = trio.lowlevel.ParkingLot()
        return lot

    def _wake(self) -> None:
        """Something for the receiver: wake it, or start it (lazy splice)."""
        spawn = self._drain_spawn
        if spawn is not None:
            self._drain_spawn = None
            spawn()
        self._unpark()

    def _receive_lazily(self, spawn: Callable[[], None]) -> None:
        """A splice with no receiving task: ``spawn`` starts one when the
        stream has something a receiver must handle (data the local socket
        did not take, the peer's EOF or half-close, a failure). At once if
        it already has. Until then data goes straight to the sink: an idle
        spliced stream holds one task, not two."""
        if self._buffer and self._sink is not None:
            self._drain_to_sink()
        if self._buffer or self._error is not None or self._peer_eof or self._peer_write_closed:
            spawn()
        else:
            self._drain_spawn = spawn

    def _drain_to_sink(self) -> None:
        """Write what is buffered to the sink, while it takes everything.

        At a splice's start: data that arrived during the dial (remotedialer
        sends the first bytes right behind the Connect) needs no receiver task
        -- which would then stay, a task per idle stream -- if the local
        socket takes it at once.
        """
        sink = self._sink
        assert sink is not None
        buffer = self._buffer
        while buffer:
            chunk = buffer[0]
            try:
                sent = sink(chunk)
            except OSError:
                return  # the receiver's own write meets the failure
            if sent:
                self._session._consumed(self.conn_id, sent)
            if sent < len(chunk):
                buffer[0] = chunk[sent:]
                return
            buffer.pop(0)

    def _first_byte_due(self) -> float:
        """The first-byte deadline while it still applies, else ``inf``."""
        if self._received or self._confirmed or self._error is not None or self._peer_eof:
            return math.inf
        return self._first_byte_deadline

    def _expire_first_byte(self) -> None:
        """Time the dial out if its first-byte deadline passed with no answer
        (what :meth:`receive_some` does for a waiting receiver)."""
        if self._first_byte_due() <= trio.current_time() and not self._buffer:
            self._time_out_dial()

    # --- trio.abc.Stream --------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return some received bytes, or ``b""`` after the peer's orderly close.

        Blocks until data arrives. Cancellation is safe: no data is lost.
        Raises a :class:`~revdial.TunnelError` once buffered data is drained
        if the stream failed.
        """
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
                if self._buffer:
                    break
                if self._error is not None:
                    raise self._error
                if self._peer_eof or self._peer_write_closed:
                    return b""
                if self._received or self._first_byte_deadline == math.inf:
                    await self._parking_lot().park()
                else:
                    with trio.move_on_at(self._first_byte_deadline):
                        await self._parking_lot().park()
                    if trio.current_time() >= self._first_byte_deadline and not (
                        self._buffer
                        or self._error
                        or self._peer_eof
                        or self._received
                        or self._confirmed
                    ):
                        self._time_out_dial()
            chunk = self._buffer[0]
            if max_bytes is None or len(chunk) <= max_bytes:
                self._buffer.pop(0)
            else:
                self._buffer[0] = chunk[max_bytes:]
                chunk = chunk[:max_bytes]
            self._session._consumed(self.conn_id, len(chunk))
            return chunk
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of ``data``, in frames of at most ``max_frame_size``.

        Blocks while the peer has paused this stream (Pause) or the session's
        outbox is full. On cancellation some, all or none of the data may have
        been queued (trio's contract); frames are never torn.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            view = memoryview(data).cast("B")
            total = len(view)
            frame_size = self._session.limits.max_frame_size
            offset = 0
            await trio.lowlevel.checkpoint()
            while True:
                self._check_writable()
                if offset >= total:
                    return
                if self._peer_paused:
                    await self._parking_lot().park()
                    continue
                session = self._session
                if self._small_pending or self._queued >= session.limits.stream_outbox_bytes:
                    await self._parking_lot().park()  # woken by _dequeued()
                    continue
                end = offset + frame_size
                small = session._is_small(self, min(end, total) - offset)
                if session._outbox_full(small):
                    await session._wait_outbox_space(small)
                    continue  # re-check: the stream may have closed meanwhile
                if not session.is_open:
                    raise SessionLostError(f"session to {session.client_key!r} has ended")
                session._queue_data(self, view[offset:end], small)
                offset = end
        finally:
            self._sending = False

    def _send_nowait(self, data: bytes) -> bool:
        """Queue ``data`` as one Data frame at once if nothing would make
        :meth:`send_all` wait or raise; False (nothing queued) otherwise.

        The splice's fast path: no checkpoint, so call it only between
        checkpoints of your own (the splice waits for the socket each time).
        """
        session = self._session
        limits = session.limits
        n = len(data)
        if (
            self._sending
            or self._closed
            or self._eof_sent
            or self._error is not None
            or self._peer_eof
            or self._peer_paused
            or self._small_pending
            or self._queued >= limits.stream_outbox_bytes
            or n > limits.max_frame_size
            or not n
            or not session.is_open
        ):
            return False
        small = session._is_small(self, n)
        if session._outbox_full(small):
            return False
        session._queue_data(self, memoryview(data), small)
        return True

    def _arm_first_byte_timeout(self, timeout: float) -> None:
        """Fail the first receive if nothing (no byte, no confirmation) arrives
        within ``timeout`` seconds from now."""
        self._dial_timeout = timeout
        self._first_byte_deadline = trio.current_time() + timeout

    def _time_out_dial(self) -> None:
        """No answer from a peer that does not confirm dials: give up."""
        self._dial_done("timeout")
        self._error = DialTimeoutError(
            f"dial {self.target} via client {self._session.client_key!r}: no answer within "
            f"{self._dial_timeout:g} s",
            reason="timeout",
            client_key=self._session.client_key,
            target=self.target,
        )
        if not self._detached:
            self._session._close_stream(self.conn_id, "revdial: dial timed out")

    async def wait_dialed(self) -> None:
        """Extension v1: wait until the peer confirms the dial.

        Raises the typed :class:`~revdial.DialError` if the dial failed.
        """
        await trio.lowlevel.checkpoint()
        while not self._confirmed:
            if self._error is not None:
                raise self._error
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            await self._parking_lot().park()

    async def wait_peer_closed(self) -> None:
        """Wait until the peer closed the stream (orderly or not), the session
        was lost, or we closed it. Received data stays buffered for
        :meth:`receive_some`. Cancellation is safe."""
        await trio.lowlevel.checkpoint()
        while not (self.peer_closed or self._closed):
            await self._parking_lot().park()

    def fail_dial_timeout(self, timeout: float) -> DialTimeoutError:
        """Give up on the dial after ``timeout`` seconds: close the stream and
        return the error to raise."""
        self._dial_timeout = timeout
        self._time_out_dial()
        assert isinstance(self._error, DialTimeoutError)
        self.close_nowait()
        return self._error

    def _check_writable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof() was called on this stream")
        if self._error is not None:
            raise self._error
        if self._peer_eof:
            raise trio.BrokenResourceError(f"stream {self.target} was closed by the peer")

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
            while self._peer_paused and not (self._closed or self._error or self._peer_eof):
                await self._parking_lot().park()
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """Half-close: tell the peer we will send no more; keep receiving.

        Idempotent. Needs the revdial extension on the session; raises
        :class:`~revdial.HalfCloseUnsupportedError` otherwise (close the
        stream instead). The EOF is queued behind this stream's Data.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if not self.supports_half_close:
            raise HalfCloseUnsupportedError(
                "the peer does not speak the revdial extension (plain remotedialer has no "
                "half-close); close the stream instead"
            )
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        if self._eof_sent:
            return
        if self._error is not None:
            raise self._error
        self._eof_sent = True
        self._session._send_eof(self.conn_id)

    async def aclose(self) -> None:
        """Close the stream: the peer gets an orderly ``EOF`` Error frame.

        Idempotent; never blocks (the frame is queued behind this stream's
        Data), so it closes even when cancelled.
        """
        self.close_nowait()
        await trio.lowlevel.checkpoint()

    def close_nowait(self, error: str | None = None) -> None:
        """Close without waiting; ``error`` sends that text instead of ``EOF``."""
        if self._closed:
            return
        self._closed = True
        if self._dial_started is not None:
            self._dial_done("cancelled")
        self._buffer.clear()
        self._drain_spawn = None  # closed by us: nothing more to receive
        if not self._detached:
            self._session._close_stream(self.conn_id, error)
        self._wake()
