"""A stream that passes everything to the stream it wraps: the base of the
transport wrappers (:class:`~revdial._session.ActivityStream`,
:class:`~revdial._handshake.ReplayStream`, :class:`~revdial._handshake.SlotGate`),
each of which overrides only what it adds."""

from __future__ import annotations

import trio

__all__ = ["WrappedStream"]


class WrappedStream(trio.abc.Stream):
    """Delegates every ``trio.abc.Stream`` method to :attr:`inner`."""

    # Slots: a server wraps every session's transport (thousands, idle).
    __slots__ = ("inner",)

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()
