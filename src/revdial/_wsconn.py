"""trio-websocket connections that cost a fleet server less per idle session.

trio-websocket gives every connection a message channel (``trio.open_memory_channel``):
its reader task sends each message there and ``get_message`` receives it. A
revdial session handles messages inline, in that reader task (see
``_session._InlineDelivery``), so the channel only ever carries the messages
that arrive before the session starts, a failure marker and the end of the
connection -- yet its state, two channel objects, their task sets and an
empty deque hold ~2 KiB per connection. :class:`Inbox` stands in for both
ends: a list that is only allocated when a message has to wait, and at most
one waiting task (trio-websocket's reader on a full inbox, or the session's
reader on an empty one -- never both).

The stand-in must be in place before trio-websocket's reader task starts
(the task enters ``async with self._send_channel`` and keeps that object for
its whole life), so :func:`open_server_websocket` and
:func:`open_client_websocket` do what trio-websocket's ``wrap_server_stream``
/ ``wrap_client_stream`` do, with the channel swapped in between. That uses
private attributes of trio-websocket 0.12 (``_send_channel``,
``_recv_channel``, ``_reader_task``, ``_get_request``, ``_open_handshake``):
for any other release both fall back to trio-websocket's own functions and
its channel, and ``tests/test_wsconn.py`` fails loudly so the release is
checked before it is added to :data:`INBOX_TESTED_VERSIONS`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio
import trio_websocket
from trio_websocket import (
    WebSocketConnection,
    WebSocketRequest,
    wrap_client_stream,
    wrap_server_stream,
)
from wsproto import ConnectionType, WSConnection

__all__ = [
    "INBOX_TESTED_VERSIONS",
    "Inbox",
    "inbox_supported",
    "open_client_websocket",
    "open_server_websocket",
]

log = logging.getLogger("revdial")

#: trio-websocket releases whose message channel :class:`Inbox` replaces.
INBOX_TESTED_VERSIONS = ("0.12.",)

#: trio-websocket's default ``message_queue_size``: messages that may wait
#: before its reader task waits too.
_QUEUE_SIZE = 1


class Inbox:
    """Both ends of trio-websocket's message channel for one connection.

    trio-websocket's reader task calls :meth:`send` (through
    :class:`_InboxSend`) and closes the send side when it ends; ``get_message``
    calls :meth:`receive`; ``aclose`` of the WebSocket closes the receive side.
    The semantics are those of a memory channel of ``limit`` messages with one
    sender and one receiver: :meth:`receive` raises ``EndOfChannel`` once the
    send side closed and every queued message was taken, ``ClosedResourceError``
    after the receive side closed; :meth:`send` raises ``BrokenResourceError``
    once the receive side closed.

    With a ``deliver`` callback (:meth:`deliver_inline`), a message that
    finds nothing queued is handed to it in the sending task instead; if the
    callback raises, the exception is kept in :attr:`failed`, later messages
    queue, and an empty message wakes the receiver, which re-raises it (what
    ``_session._InlineDelivery`` does with trio's channel).
    """

    __slots__ = ("_deliver", "_limit", "_queue", "_receive_closed", "_send_closed",
                 "_waiter", "failed")

    def __init__(self, limit: int = _QUEUE_SIZE) -> None:
        self._limit = max(1, limit)
        self._queue: list[bytes | str] | None = None
        self._waiter: trio.lowlevel.Task | None = None
        self._send_closed = False
        self._receive_closed = False
        self._deliver: Callable[[bytes | str], None] | None = None
        #: What an inline delivery raised (a ProtocolError ends the session).
        self.failed: Exception | None = None

    def deliver_inline(self, deliver: Callable[[bytes | str], None]) -> None:
        self._deliver = deliver

    @property
    def delivers_inline(self) -> bool:
        return self._deliver is not None and self.failed is None

    @property
    def queued(self) -> int:
        """Messages waiting for :meth:`receive`."""
        return len(self._queue) if self._queue else 0

    # --- waiting: at most one task at a time ---------------------------------

    def _wake(self) -> None:
        task = self._waiter
        if task is not None:
            self._waiter = None
            trio.lowlevel.reschedule(task)

    def _aborted(self, _: Any) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def _wait(self) -> None:
        if self._waiter is not None:
            raise trio.BusyResourceError("another task is already waiting on this WebSocket")
        self._waiter = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._aborted)

    # --- the send side (trio-websocket's reader task) ----------------------

    async def send(self, message: bytes | str) -> None:
        if self._send_closed:
            raise trio.ClosedResourceError
        if self._receive_closed:
            raise trio.BrokenResourceError
        deliver = self._deliver
        if deliver is not None and not self._queue and self.failed is None:
            try:
                deliver(message)
            except Exception as exc:
                self.failed = exc
                message = b""  # the marker that wakes the receiver
            else:
                return
        while self._queue is not None and len(self._queue) >= self._limit:
            await self._wait()
            if self._receive_closed:
                raise trio.BrokenResourceError
            if self._send_closed:
                raise trio.ClosedResourceError
        if self._queue is None:
            self._queue = []
        self._queue.append(message)
        self._wake()

    def close_send(self) -> None:
        self._send_closed = True
        self._wake()

    # --- the receive side (get_message) ------------------------------------

    async def receive(self) -> bytes | str:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._receive_closed:
                raise trio.ClosedResourceError
            queue = self._queue
            if queue:
                message = queue.pop(0)
                if not queue:
                    self._queue = None  # an idle connection holds no list
                self._wake()
                await trio.lowlevel.cancel_shielded_checkpoint()
                return message
            if self._send_closed:
                raise trio.EndOfChannel
            # As _wait(), inline: an idle session's reader waits here, and a
            # coroutine frame less is ~250 bytes per session.
            if self._waiter is not None:
                raise trio.BusyResourceError("another task is already waiting on this WebSocket")
            self._waiter = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._aborted)

    async def aclose(self) -> None:
        """Close the receive side (trio-websocket's ``aclose`` of the WebSocket)."""
        self._receive_closed = True
        self._queue = None
        self._wake()
        await trio.lowlevel.checkpoint()


class _InboxSend:
    """The send side of an :class:`Inbox`, as trio-websocket's reader uses it."""

    __slots__ = ("inbox",)

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    async def send(self, message: bytes | str) -> None:
        await self.inbox.send(message)

    async def aclose(self) -> None:
        self.inbox.close_send()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> _InboxSend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def inbox_supported() -> bool:
    """Does the installed trio-websocket have the internals :class:`Inbox` replaces?"""
    return getattr(trio_websocket, "__version__", "").startswith(INBOX_TESTED_VERSIONS) and all(
        hasattr(WebSocketConnection, name)
        for name in ("_reader_task", "_get_request", "_handle_message_event")
    )


def _install(connection: WebSocketConnection) -> bool:
    """Swap ``connection``'s message channel for an :class:`Inbox` (before its
    reader task starts). False if the connection is not laid out as expected."""
    if not (
        isinstance(getattr(connection, "_send_channel", None), trio.MemorySendChannel)
        and isinstance(getattr(connection, "_recv_channel", None), trio.MemoryReceiveChannel)
    ):
        return False
    inbox = Inbox()
    conn: Any = connection
    conn._send_channel = _InboxSend(inbox)
    conn._recv_channel = inbox
    return True


def inbox_of(ws: object) -> Inbox | None:
    """The :class:`Inbox` of a WebSocket opened by this module, else None."""
    inbox = getattr(ws, "_recv_channel", None)
    return inbox if isinstance(inbox, Inbox) else None


async def _read(connection: WebSocketConnection, stream: trio.abc.Stream) -> None:
    """trio-websocket's reader task, run in a nursery that is not the
    connection's own: an unexpected error is logged and closes the transport
    (so the session sees the end of the connection), never raised there."""
    try:
        await connection._reader_task()
    except Exception:
        log.exception("WebSocket reader failed; connection closed")
        await trio.aclose_forcefully(stream)


async def open_server_websocket(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    *,
    max_message_size: int,
    receive_buffer_size: int,
    shared_nursery: bool = False,
) -> WebSocketRequest:
    """trio-websocket's ``wrap_server_stream``, with an :class:`Inbox`.

    ``shared_nursery``: ``nursery`` is not the connection's own but a
    server-wide one (no nursery per connection): the reader's errors are
    logged and close ``stream`` instead of propagating, and the caller must
    close ``stream`` when it is done, which ends the reader.
    """
    if not inbox_supported():
        return await wrap_server_stream(
            nursery, stream, max_message_size=max_message_size,
            receive_buffer_size=receive_buffer_size,
        )
    connection = WebSocketConnection(
        stream,
        WSConnection(ConnectionType.SERVER),
        message_queue_size=_QUEUE_SIZE,
        max_message_size=max_message_size,
        receive_buffer_size=receive_buffer_size,
    )
    _install(connection)
    if shared_nursery:
        nursery.start_soon(_read, connection, stream)
    else:
        nursery.start_soon(connection._reader_task)
    return await connection._get_request()


async def open_client_websocket(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    host: str,
    resource: str,
    *,
    extra_headers: list[tuple[bytes, bytes]],
    max_message_size: int,
    receive_buffer_size: int,
) -> WebSocketConnection:
    """trio-websocket's ``wrap_client_stream``, with an :class:`Inbox`."""
    if not inbox_supported():
        return await wrap_client_stream(
            nursery, stream, host, resource,  # type: ignore[arg-type]
            extra_headers=extra_headers, max_message_size=max_message_size,
            receive_buffer_size=receive_buffer_size,
        )
    connection = WebSocketConnection(
        stream,
        WSConnection(ConnectionType.CLIENT),
        host=host,
        path=resource,
        client_subprotocols=None,
        client_extra_headers=extra_headers,
        message_queue_size=_QUEUE_SIZE,
        max_message_size=max_message_size,
        receive_buffer_size=receive_buffer_size,
    )
    _install(connection)
    nursery.start_soon(connection._reader_task)
    await connection._open_handshake.wait()
    return connection
