"""Pipe a tunnel stream and a local stream into each other; abort on failure.

Failure semantics
-----------------
A stream that ends because something *failed* must never look like one that
ended in order. Protocols that mark the end of their data by closing (an
HTTP/1.0 body, ``Connection: close``, ``cat file | nc``, bulk loads) would
take a truncated transfer for the whole of it. So:

* an orderly end -- the peer's EOF or half-close, the local side's EOF --
  becomes a FIN on the local socket and an ``EOF`` Error frame (or the
  revdial half-close) on the tunnel;
* any failure -- session lost, stream reset by the peer, a dial error after
  early data, a stream reset for exceeding limits, the local socket reset,
  cancellation -- *aborts* both sides: the local socket is reset (RST,
  ``SO_LINGER`` 0 before close) and the tunnel stream is closed with an error
  text, which the peer turns into a reset of its own socket.

:func:`abort` is that second kind of close, for any stream.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import trio

from ._errors import TunnelError
from ._stream import TunnelStream

__all__ = ["ABORT_REASON", "abort", "splice"]

log = logging.getLogger("revdial")

#: The Error text :func:`abort` sends on a tunnel stream when given no reason.
ABORT_REASON = "revdial: connection aborted"
#: ``struct linger`` with l_onoff=1, l_linger=0: close() sends RST, not FIN.
_LINGER_ZERO = struct.pack("ii", 1, 0)


async def abort(stream: trio.abc.Stream, reason: str | None = None) -> None:
    """Close ``stream`` so that its peer sees a failure, never an orderly end.

    * :class:`trio.SocketStream` (also under a :class:`trio.SSLStream`, with
      no ``close_notify``): ``SO_LINGER`` 0, then close -- the peer's next
      read fails with ``ECONNRESET`` instead of returning EOF. Unsent data in
      the socket's buffer is discarded. (A unix socket has no reset: it is
      closed, and its peer reads EOF.)
    * :class:`~revdial.TunnelStream`: ``close_nowait(reason)`` -- an Error
      frame with ``reason`` (never ``EOF``), which the peer raises as
      :class:`~revdial.StreamResetError` and, with revdial, turns into a reset
      of its own socket.
    * Any other stream: :func:`trio.aclose_forcefully`.

    Idempotent, never raises, and closes even when cancelled (it is a
    checkpoint, like ``aclose_forcefully``).
    """
    if isinstance(stream, TunnelStream):
        stream.close_nowait(reason if reason and reason != "EOF" else ABORT_REASON)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return
    transport: trio.abc.Stream = stream
    while isinstance(transport, trio.SSLStream):
        transport = transport.transport_stream
    if isinstance(transport, trio.SocketStream):
        # Already closed, or a socket that does not linger: close it anyway.
        with contextlib.suppress(OSError, trio.ClosedResourceError):
            transport.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    await trio.aclose_forcefully(stream)


def _socket_fd(local: trio.abc.Stream) -> int | None:
    """The descriptor of a plain :class:`trio.SocketStream` (TCP or unix,
    never under TLS), which trio keeps non-blocking; None for anything else."""
    if type(local) is not trio.SocketStream:
        return None
    try:
        fd = local.socket.fileno()
    except (OSError, ValueError):
        return None
    return fd if fd >= 0 else None


def direct_writer(local: trio.abc.Stream) -> Callable[[bytes], int] | None:
    """A synchronous, non-blocking write to ``local``'s socket, or None: it
    returns how much the kernel took or raises ``BlockingIOError``."""
    fd = _socket_fd(local)
    return None if fd is None else functools.partial(os.write, fd)


def splice(
    tunnel: TunnelStream, local: trio.abc.Stream, *, read_size: int, idle_timeout: float = 0.0
) -> Coroutine[Any, Any, None]:
    """Copy bytes both ways until both directions end, then close both.

    With the revdial extension (``tunnel.supports_half_close``) and a local
    stream that can half-close (a TCP socket), each direction ends on its own:
    an EOF from ``local`` becomes ``tunnel.send_eof()`` and the peer's
    half-close becomes ``local.send_eof()`` (``shutdown(SHUT_WR)``), while the
    other direction keeps flowing. Otherwise -- plain remotedialer, as with a
    Go peer -- the first EOF or error ends both directions, as Go does. Bytes
    the tunnel had already received are always written to ``local`` before
    its EOF is passed on.

    Only an orderly end closes cleanly (FIN on ``local``, ``EOF`` on the
    tunnel). A failure on either side, or cancellation, aborts both with
    :func:`abort`: ``local`` is reset and the tunnel stream is closed with an
    error text, so neither peer can take a truncated transfer for a complete
    one.

    Raises the tunnel's :class:`~revdial.TunnelError` if the tunnel side
    failed (one exception, never a group); log it, it says why (session lost,
    reset by the peer, dial error). A failure of the local socket ends the
    splice quietly and closes the tunnel stream with the error text, so the
    peer learns why. On cancellation both sides are aborted and
    :class:`trio.Cancelled` propagates (the tunnel's failure, if it failed
    first, is still in :attr:`TunnelStream.error`).

    ``idle_timeout`` (seconds, ``0``: none): when no byte has moved either way
    for that long, both sides are aborted -- the tunnel stream with the reason
    ``revdial: idle for N s`` -- and the splice returns (logged at info).
    """
    # Not itself a coroutine function: ``await splice(...)`` awaits the
    # splice's own coroutine, one frame less on the stack of every idle stream.
    return _Splice(tunnel, local, read_size, idle_timeout).run()


class _Splice:
    """The state of one :func:`splice` (an object with slots, not closures:
    an idle spliced stream holds this, one task and its frames -- agents hold
    tens of thousands of them)."""

    __slots__ = (
        "fd",
        "half",
        "idle",
        "idle_timeout",
        "local",
        "local_error",
        "nursery",
        "read_size",
        "tunnel",
        "tunnel_error",
        "write",
    )

    def __init__(
        self, tunnel: TunnelStream, local: trio.abc.Stream, read_size: int, idle_timeout: float
    ) -> None:
        self.tunnel = tunnel
        self.local = local
        self.read_size = read_size
        self.idle_timeout = idle_timeout
        self.half = tunnel.supports_half_close and isinstance(
            local, trio.abc.HalfCloseableStream
        )
        self.local_error: str | None = None
        self.tunnel_error: TunnelError | None = None
        # With idle_timeout, every chunk either way moves this scope's deadline;
        # without, the loops pay one falsy test per chunk and no scope is entered.
        self.idle = trio.CancelScope() if idle_timeout else None
        self.fd = _socket_fd(local)
        #: Non-blocking write to local's socket (None: not a plain socket).
        self.write = direct_writer(local)
        self.nursery: trio.Nursery | None = None

    def active(self) -> None:
        assert self.idle is not None
        self.idle.deadline = trio.current_time() + self.idle_timeout

    def _stop(self) -> None:
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()

    async def tunnel_to_local(self) -> None:
        tunnel, local = self.tunnel, self.local
        try:
            while data := await tunnel.receive_some():
                if self.idle_timeout:
                    self.active()
                await local.send_all(data)
            if self.half and not tunnel.peer_closed:
                # The peer half-closed: pass the EOF on, keep the other way open.
                assert isinstance(local, trio.abc.HalfCloseableStream)
                await local.send_eof()
                return
        except TunnelError as exc:
            self.tunnel_error = self.tunnel_error or exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.local_error = self.local_error or f"write to local connection failed: {exc}"
        self._stop()

    async def local_to_tunnel(self) -> None:
        """Local -> tunnel. On a socket: ``local.receive_some`` +
        ``tunnel.send_all`` without their two scheduler rounds and one failed
        ``recv`` per message -- wait until the socket is readable, read what
        is there, queue it as one frame; after a full read more is likely
        waiting (bulk), so read again after a plain checkpoint, as
        ``receive_some`` would. With no receiving task (see :meth:`run`),
        this wait also enforces the tunnel's first-byte timeout. (One frame,
        no helper coroutine: it is on the stack of every idle stream.)"""
        tunnel = self.tunnel
        fd = self.fd
        try:
            if fd is None:
                while data := await self.local.receive_some(self.read_size):
                    if self.idle_timeout:
                        self.active()
                    await tunnel.send_all(data)
            else:
                read_size = self.read_size
                full = False
                while True:
                    if full:
                        await trio.lowlevel.checkpoint()
                    else:
                        due = tunnel._first_byte_due()
                        if due == math.inf:
                            await trio.lowlevel.wait_readable(fd)
                        else:
                            with trio.move_on_at(due) as waited:
                                await trio.lowlevel.wait_readable(fd)
                            if waited.cancelled_caught:
                                tunnel._expire_first_byte()
                                if tunnel.error is not None:
                                    raise tunnel.error
                                continue
                    try:
                        data = os.read(fd, read_size)
                    except BlockingIOError:
                        full = False
                        continue
                    except OSError as exc:
                        raise trio.BrokenResourceError(exc) from exc
                    if not data:
                        break
                    if self.idle_timeout:
                        self.active()
                    full = len(data) >= read_size
                    if not tunnel._send_nowait(data):
                        await tunnel.send_all(data)
            if self.half:
                await tunnel.send_eof()
                return
        except TunnelError as exc:
            self.tunnel_error = self.tunnel_error or exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # The tunnel raises BrokenResourceError after the peer's orderly
            # close; that is the end of the splice, not a local failure.
            if not tunnel.peer_closed:
                self.local_error = self.local_error or f"local connection failed: {exc}"
        self._stop()

    def _spawn_receiver(self) -> None:
        assert self.nursery is not None
        self.nursery.start_soon(self.tunnel_to_local)

    def _sink(self, data: bytes) -> int:
        """The tunnel's direct write when idle_timeout applies: counts as activity."""
        self.active()
        assert self.write is not None
        return self.write(data)

    async def run(self) -> None:
        tunnel, local = self.tunnel, self.local
        orderly = False
        # While no receiver waits with data buffered, the session writes what
        # arrives for the tunnel straight to local's socket (TunnelStream._feed).
        if self.write is not None:
            tunnel._sink = self._sink if self.idle_timeout else self.write
        idle = self.idle
        try:
            if idle is not None:
                self.active()
            with idle if idle is not None else contextlib.nullcontext():
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    if self.fd is None:
                        # One direction in this task, one child: a task less per
                        # stream matters when an agent holds tens of thousands of
                        # idle streams.
                        nursery.start_soon(self.local_to_tunnel)
                        await self.tunnel_to_local()
                    else:
                        # A socket: what arrives from the tunnel goes straight
                        # to it (the sink) until a receiver is needed -- data it
                        # did not take, the peer's EOF, a failure -- and only
                        # then is tunnel_to_local started. An idle stream holds
                        # this task only.
                        tunnel._receive_lazily(self._spawn_receiver)
                        try:
                            await self.local_to_tunnel()
                            if tunnel._drain_spawn is not None and (
                                not nursery.cancel_scope.cancel_called
                            ):
                                # Local EOF, passed on as a half-close: the other
                                # direction goes on in a receiver of its own.
                                tunnel._wake()
                        finally:
                            tunnel._drain_spawn = None  # the nursery takes no task after this
            if idle is not None and idle.cancelled_caught:
                self.local_error = f"revdial: idle for {self.idle_timeout:g} s"
                log.info("connection %s: no data either way for %g s, reset",
                         tunnel.target, self.idle_timeout)
            orderly = (
                self.tunnel_error is None and self.local_error is None and tunnel.error is None
            )
        finally:
            tunnel._sink = None  # before local's descriptor is closed
            self.nursery = None
            with trio.CancelScope(shield=True):
                if orderly:
                    tunnel.close_nowait()
                    await trio.aclose_forcefully(local)
                else:
                    await abort(tunnel, self.local_error)
                    await abort(local)
        if self.tunnel_error is not None:
            raise self.tunnel_error
