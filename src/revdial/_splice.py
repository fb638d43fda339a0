"""Pipe a tunnel stream and a local stream into each other."""

from __future__ import annotations

import trio

from ._stream import TunnelStream

__all__ = ["splice"]


async def splice(tunnel: TunnelStream, local: trio.abc.Stream, *, read_size: int) -> None:
    """Copy bytes both ways until either side ends, then close both.

    remotedialer has no half-close: when either direction ends (EOF or
    error), the other is stopped too, as a Go peer does. Bytes the tunnel had
    already received are written to ``local`` before its EOF is honoured.
    Errors of the tunnel side propagate (a :class:`~revdial.TunnelError`);
    errors of the local socket end the splice quietly, closing the tunnel
    stream with the error text so the peer learns why.
    """
    local_error: str | None = None

    async def tunnel_to_local() -> None:
        nonlocal local_error
        try:
            while data := await tunnel.receive_some():
                try:
                    await local.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    local_error = f"write to local connection failed: {exc}"
                    return
        finally:
            nursery.cancel_scope.cancel()

    async def local_to_tunnel() -> None:
        nonlocal local_error
        try:
            while True:
                try:
                    data = await local.receive_some(read_size)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    local_error = f"read from local connection failed: {exc}"
                    return
                if not data:
                    return
                await tunnel.send_all(data)
        finally:
            nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tunnel_to_local)
            nursery.start_soon(local_to_tunnel)
    finally:
        tunnel.close_nowait(local_error)
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(local)
