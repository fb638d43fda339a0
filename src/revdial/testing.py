"""Tools for testing code that uses revdial, without sockets.

* :func:`open_session_pair` -- a server-role and a client-role
  :class:`~revdial.Session` talking over in-memory streams (real
  trio-websocket and wsproto on both ends), so tests can use
  ``trio.testing.MockClock``.
* :class:`FakeNetwork` -- an in-memory "network" for the agent side: register
  handlers under addresses, and pass :meth:`FakeNetwork.dial` as the agent's
  dialer.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio
import trio.testing
from trio_websocket import WebSocketConnection

from ._agent import Dialer, make_connect_handler
from ._limits import DEFAULT_LIMITS, Limits
from ._session import EXTENSION_VERSION, ActivityStream, Session
from ._state import Role
from ._wsconn import open_client_websocket, open_server_websocket

__all__ = ["FakeNetwork", "echo_handler", "open_session_pair", "websocket_handshake"]

Handler = Callable[[trio.abc.Stream], Awaitable[None]]


async def echo_handler(stream: trio.abc.Stream) -> None:
    """Echo everything back until EOF."""
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(data)


class FakeNetwork:
    """Targets reachable by a test agent, served from memory.

    ``await nursery.start(net.run)`` first; then ``net.listen("127.0.0.1:80",
    handler)``; ``net.dial`` raises ``OSError(ECONNREFUSED)`` for unknown
    addresses and hangs forever for those marked :meth:`blackhole`.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._blackholes: set[str] = set()
        self._nursery: trio.Nursery | None = None
        #: Addresses dialled so far, in order.
        self.dialled: list[str] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def listen(self, address: str, handler: Handler) -> None:
        self._handlers[address] = handler

    def blackhole(self, address: str) -> None:
        self._blackholes.add(address)

    async def dial(self, proto: str, address: str) -> trio.abc.Stream:
        self.dialled.append(f"{proto}/{address}")
        if address in self._blackholes:
            await trio.sleep_forever()
        handler = self._handlers.get(address)
        await trio.lowlevel.checkpoint()
        if handler is None or self._nursery is None:
            raise OSError(errno.ECONNREFUSED, "Connection refused")
        ours, theirs = trio.testing.memory_stream_pair()
        self._nursery.start_soon(handler, theirs)
        return ours


async def websocket_handshake(
    nursery: trio.Nursery,
    client_stream: trio.abc.Stream,
    server_stream: trio.abc.Stream,
    client_limits: Limits = DEFAULT_LIMITS,
    server_limits: Limits = DEFAULT_LIMITS,
) -> tuple[WebSocketConnection, WebSocketConnection]:
    """Run a WebSocket opening handshake over two connected streams.

    Returns ``(server_ws, client_ws)``; trio-websocket's reader tasks run in
    ``nursery``.
    """
    client_ws: list[WebSocketConnection] = []
    client_ready = trio.Event()

    async def client_handshake() -> None:
        client_ws.append(
            await open_client_websocket(
                nursery,
                client_stream,
                "revdial.test",
                "/connect",
                extra_headers=[],
                max_message_size=client_limits.max_message_size,
                receive_buffer_size=client_limits.read_size,
            )
        )
        client_ready.set()

    nursery.start_soon(client_handshake)
    request = await open_server_websocket(
        nursery,
        server_stream,
        max_message_size=server_limits.max_message_size,
        receive_buffer_size=server_limits.read_size,
    )
    server_ws = await request.accept()
    await client_ready.wait()
    return server_ws, client_ws[0]


@asynccontextmanager
async def open_session_pair(
    *,
    server_limits: Limits = DEFAULT_LIMITS,
    client_limits: Limits = DEFAULT_LIMITS,
    allow: object = None,
    dialer: Dialer | None = None,
    client_key: str = "c1",
    extensions: int = EXTENSION_VERSION,
) -> AsyncIterator[tuple[Session, Session]]:
    """A connected ``(server_session, client_session)`` pair over memory streams.

    The client (agent) side answers Connects with the agent's real handler
    (``allow`` policy, ``dialer``). ``extensions`` is the revdial extension
    version both use (0: plain remotedialer, as with a Go peer). Both sessions
    are cancelled on exit.
    """
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client_transport = ActivityStream(client_raw)
    server_transport = ActivityStream(server_raw)
    async with trio.open_nursery() as nursery:
        server_ws, client_ws = await websocket_handshake(
            nursery, client_transport, server_transport, client_limits, server_limits
        )
        server = Session(
            server_ws,
            server_transport,
            Role.SERVER,
            client_key=client_key,
            limits=server_limits,
            extensions=extensions,
        )
        client = Session(
            client_ws,
            client_transport,
            Role.CLIENT,
            client_key="client",
            limits=client_limits,
            on_connect=make_connect_handler(
                allow, dialer if dialer is not None else _refuse_all, client_limits
            ),
            extensions=extensions,
        )
        await nursery.start(server.run)
        await nursery.start(client.run)
        try:
            yield server, client
        finally:
            nursery.cancel_scope.cancel()


async def _refuse_all(proto: str, address: str) -> trio.abc.Stream:
    await trio.lowlevel.checkpoint()
    raise OSError(errno.ECONNREFUSED, "Connection refused")
