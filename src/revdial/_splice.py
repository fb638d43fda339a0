"""Pipe a tunnel stream and a local stream into each other."""

from __future__ import annotations

import trio

from ._errors import TunnelError
from ._stream import TunnelStream

__all__ = ["splice"]


async def splice(tunnel: TunnelStream, local: trio.abc.Stream, *, read_size: int) -> None:
    """Copy bytes both ways until both directions end, then close both.

    With the revdial extension (``tunnel.supports_half_close``) and a local
    stream that can half-close (a TCP socket), each direction ends on its own:
    an EOF from ``local`` becomes ``tunnel.send_eof()`` and the peer's
    half-close becomes ``local.send_eof()`` (``shutdown(SHUT_WR)``), while the
    other direction keeps flowing. Otherwise -- plain remotedialer, as with a
    Go peer -- the first EOF or error ends both directions, as Go does. Bytes
    the tunnel had already received are always written to ``local`` before
    its EOF is passed on.

    Raises the tunnel's :class:`~revdial.TunnelError` if the tunnel side
    failed (one exception, never a group). A failure of the local socket ends
    the splice quietly and closes the tunnel stream with the error text, so
    the peer learns why.
    """
    half = tunnel.supports_half_close and isinstance(local, trio.abc.HalfCloseableStream)
    local_error: str | None = None
    tunnel_error: TunnelError | None = None

    async def tunnel_to_local() -> None:
        nonlocal local_error, tunnel_error
        try:
            while data := await tunnel.receive_some():
                await local.send_all(data)
            if half and not tunnel.peer_closed:
                # The peer half-closed: pass the EOF on, keep the other way open.
                assert isinstance(local, trio.abc.HalfCloseableStream)
                await local.send_eof()
                return
        except TunnelError as exc:
            tunnel_error = tunnel_error or exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            local_error = local_error or f"write to local connection failed: {exc}"
        nursery.cancel_scope.cancel()

    async def local_to_tunnel() -> None:
        nonlocal local_error, tunnel_error
        try:
            while data := await local.receive_some(read_size):
                await tunnel.send_all(data)
            if half:
                await tunnel.send_eof()
                return
        except TunnelError as exc:
            tunnel_error = tunnel_error or exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # The tunnel raises BrokenResourceError after the peer's orderly
            # close; that is the end of the splice, not a local failure.
            if not tunnel.peer_closed:
                local_error = local_error or f"local connection failed: {exc}"
        nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            # One direction in this task, one child: a task less per stream
            # matters when an agent holds tens of thousands of idle streams.
            nursery.start_soon(local_to_tunnel)
            await tunnel_to_local()
    finally:
        tunnel.close_nowait(local_error)
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(local)
    if tunnel_error is not None:
        raise tunnel_error
