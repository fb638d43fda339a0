"""Session pairs over memory streams, with taps and faults, for the driver tests.

Modelled on :func:`revdial.testing.open_session_pair`, but every piece the
tests need to observe or break is exposed:

* :class:`Valve` sits under each side's :class:`~revdial._session.ActivityStream`:
  ``silence()`` makes its receive side hang forever (the peer went silent:
  nothing more is *delivered*, bytes in flight are swallowed), ``clog()``
  makes its send side block (a network that stopped draining).
* :class:`RecordingWS` wraps the ``WebSocketConnection`` a session writes to
  and records every frame the session sends (decoded, with its virtual
  time) and every ping, so tests can count Pause/Resume/Sync frames without
  touching the session's internals.
* :func:`open_pair` -- a server-role and a client-role :class:`~revdial.Session`.
  The client (agent) side answers each Connect by marking the dial
  successful and handing the agent-side :class:`~revdial.TunnelStream` to
  the test (:meth:`Pair.accept`), unless a ``behaviours`` entry for the
  address runs it instead (e.g. :func:`revdial.testing.echo_handler`).
* :func:`open_raw_client` / :func:`open_raw_server` -- one real Session facing
  a bare trio-websocket peer (:class:`RawPeer`) that the test drives frame by
  frame: the tool for malformed input and exact wire checks.

Everything runs on memory streams, so ``trio.testing.MockClock`` drives all
time: with ``autojump_threshold=0`` a test that waits 600 s takes no real time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
)

from revdial import Limits, Session, TunnelStream
from revdial._frames import ExtType, Frame, MessageType, decode, encode, encode_sync
from revdial._limits import DEFAULT_LIMITS
from revdial._session import ActivityStream, ConnectHandler
from revdial._state import Role
from revdial.testing import websocket_handshake

__all__ = [
    "Pair",
    "RawPeer",
    "RecordingWS",
    "Valve",
    "connect_frame",
    "data_frame",
    "error_frame",
    "half_close_frame",
    "open_pair",
    "open_raw_client",
    "open_raw_server",
    "pause_frame",
    "resume_frame",
    "sync_frame",
]

KiB = 1024
MiB = 1024 * KiB

#: Small limits, so flow control engages after a few frames.
SMALL_LIMITS = Limits(
    stream_low_water=16 * KiB,
    stream_high_water=64 * KiB,
    stream_max_buffer=1 * MiB,
    session_high_water=4 * MiB,
    session_max_buffer=8 * MiB,
    max_frame_size=16 * KiB,
    read_size=16 * KiB,
    outbox_bytes=64 * KiB,
    small_frame_bytes=4 * KiB,
    small_frame_budget=16 * KiB,
)

Behaviour = Callable[[TunnelStream], Awaitable[None]]


class Valve(trio.abc.Stream):
    """A transport whose receive side can go silent and whose send side can clog."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.silent = False
        self._gate: trio.Event | None = None
        #: Sizes of the writes passed on to the transport, in order.
        self.writes: list[int] = []

    def silence(self) -> None:
        """From now on nothing more is received (in-flight bytes are swallowed)."""
        self.silent = True

    def clog(self) -> None:
        """Make ``send_all`` block until :meth:`unclog`."""
        if self._gate is None:
            self._gate = trio.Event()

    def unclog(self) -> None:
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self.silent:
            data = await self.inner.receive_some(max_bytes)
            if not self.silent:
                return data
        await trio.sleep_forever()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        while self._gate is not None:
            await self._gate.wait()
        self.writes.append(len(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


class RecordingWS:
    """Forwards to a ``WebSocketConnection``; records what the session sends."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        #: ``(virtual time, frame)`` for every binary message the session sent.
        self.sent: list[tuple[float, Frame]] = []
        #: Virtual times at which the session sent a WebSocket ping.
        self.pings: list[float] = []

    async def send_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self.sent.append((trio.current_time(), decode(message)))
        await self.ws.send_message(message)

    async def ping(self, payload: bytes | None = None) -> None:
        self.pings.append(trio.current_time())
        await self.ws.ping(payload)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ws, name)

    def count(self, mtype: int, conn_id: int | None = None) -> int:
        return sum(
            1 for _, f in self.sent if f.type == mtype and (conn_id is None or f.conn_id == conn_id)
        )

    def frames(self, mtype: int, conn_id: int | None = None) -> list[Frame]:
        return [
            f for _, f in self.sent if f.type == mtype and (conn_id is None or f.conn_id == conn_id)
        ]


@dataclass
class Side:
    """One end of a memory connection: its Valve, the ActivityStream above it."""

    valve: Valve
    activity: ActivityStream


def _side(raw: trio.abc.Stream) -> Side:
    valve = Valve(raw)
    return Side(valve, ActivityStream(valve))


async def _handshake(
    nursery: trio.Nursery,
    client_stream: trio.abc.Stream,
    server_stream: trio.abc.Stream,
    client_limits: Limits,
    server_limits: Limits,
) -> tuple[WebSocketConnection, WebSocketConnection]:
    """Run the WebSocket opening handshake; return ``(server_ws, client_ws)``."""
    return await websocket_handshake(
        nursery, client_stream, server_stream, client_limits, server_limits
    )


@dataclass
class Pair:
    server: Session
    client: Session
    #: Transport under the server session (``server_side.valve.silence()``
    #: = the client -> server direction goes silent).
    server_side: Side
    client_side: Side
    server_ws: RecordingWS
    client_ws: RecordingWS
    #: Agent-side streams accepted by the client session, in Connect order.
    accepted: trio.MemoryReceiveChannel[TunnelStream]
    started_at: float
    behaviours: dict[str, Behaviour] = field(default_factory=dict)

    async def accept(self) -> TunnelStream:
        """The next agent-side stream (the client session accepted its Connect)."""
        with trio.fail_after(1):
            return await self.accepted.receive()

    async def open(self, address: str = "target:1") -> tuple[TunnelStream, TunnelStream]:
        """Open a stream from the server; return ``(server_side, agent_side)``."""
        ours = self.server.open_stream("tcp", address)
        return ours, await self.accept()


@asynccontextmanager
async def open_pair(
    *,
    limits: Limits = DEFAULT_LIMITS,
    server_limits: Limits | None = None,
    client_limits: Limits | None = None,
    behaviours: dict[str, Behaviour] | None = None,
    client_key: str = "c1",
    session_key: int = 0,
    extensions: int = 0,
    record: bool = True,
    on_connect: ConnectHandler | None = None,
) -> AsyncIterator[Pair]:
    """A connected server/client session pair; both are cancelled on exit.

    ``extensions`` is the revdial extension version both sides use (0, the
    default: plain remotedialer, what a Go peer speaks). ``record=False``
    hands the sessions trio-websocket's connections themselves, so that the
    writer batches frames as in production (``server_ws.sent`` then stays
    empty: count the transport's writes in ``server_side.valve.writes``).
    ``on_connect`` replaces the client side's Connect handler (e.g. the
    agent's real one, :func:`revdial.make_connect_handler`); :meth:`Pair.accept`
    and ``behaviours`` then see nothing.
    """
    server_limits = server_limits or limits
    client_limits = client_limits or limits
    behaviours = dict(behaviours or {})
    client_raw, server_raw = trio.testing.memory_stream_pair()
    server_side, client_side = _side(server_raw), _side(client_raw)
    send, receive = trio.open_memory_channel[TunnelStream](math.inf)

    async def accept_connect(stream: TunnelStream, proto: str, address: str) -> None:
        stream.session.dial_succeeded(stream)
        behaviour = behaviours.get(address)
        if behaviour is not None:
            await behaviour(stream)
            return
        send.send_nowait(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        server_ws, client_ws = await _handshake(
            nursery, client_side.activity, server_side.activity, client_limits, server_limits
        )
        rec_server, rec_client = RecordingWS(server_ws), RecordingWS(client_ws)
        server = Session(
            cast("WebSocketConnection", rec_server) if record else server_ws,
            server_side.activity,
            Role.SERVER,
            client_key=client_key,
            limits=server_limits,
            session_key=session_key,
            extensions=extensions,
        )
        client = Session(
            cast("WebSocketConnection", rec_client) if record else client_ws,
            client_side.activity,
            Role.CLIENT,
            client_key="client",
            limits=client_limits,
            on_connect=on_connect or accept_connect,
            extensions=extensions,
        )
        started_at = trio.current_time()
        await nursery.start(server.run)
        await nursery.start(client.run)
        try:
            yield Pair(
                server,
                client,
                server_side,
                client_side,
                rec_server,
                rec_client,
                receive,
                started_at,
                behaviours,
            )
        finally:
            nursery.cancel_scope.cancel()


# --- a bare WebSocket peer ---------------------------------------------------------

_msg_ids = itertools.count(1)


def _frame(conn_id: int, mtype: int, payload: bytes = b"") -> bytes:
    return encode(Frame(next(_msg_ids), conn_id, mtype, payload))


def data_frame(conn_id: int, payload: bytes) -> bytes:
    return _frame(conn_id, MessageType.DATA, payload)


def connect_frame(conn_id: int, target: str) -> bytes:
    return _frame(conn_id, MessageType.CONNECT, target.encode())


def error_frame(conn_id: int, text: str) -> bytes:
    return _frame(conn_id, MessageType.ERROR, text.encode())


def pause_frame(conn_id: int) -> bytes:
    return _frame(conn_id, MessageType.PAUSE)


def resume_frame(conn_id: int) -> bytes:
    return _frame(conn_id, MessageType.RESUME)


def half_close_frame(conn_id: int) -> bytes:
    return _frame(conn_id, ExtType.HALF_CLOSE)


def sync_frame(conn_ids: list[int]) -> bytes:
    return _frame(0, MessageType.SYNC_CONNECTIONS, encode_sync(conn_ids))


class RawPeer:
    """A bare trio-websocket endpoint; a background task collects what arrives.

    trio-websocket answers pings and close frames by itself; :meth:`receive`
    returns the next remotedialer frame with its arrival time and raises
    ``trio.EndOfChannel`` once the connection is closed.
    """

    def __init__(self, ws: WebSocketConnection, side: Side, session_side: Side) -> None:
        self.ws = ws
        #: The raw peer's own transport.
        self.side = side
        #: The transport under the Session facing this peer.
        self.session_side = session_side
        self._send, self._receive = trio.open_memory_channel[tuple[float, Frame]](math.inf)

    async def _collect(self) -> None:
        async with self._send:
            while True:
                try:
                    message = await self.ws.get_message()
                except ConnectionClosed:
                    return
                assert isinstance(message, bytes), message
                self._send.send_nowait((trio.current_time(), decode(message)))

    async def send(self, message: bytes | str) -> None:
        await self.ws.send_message(message)

    async def receive_timed(self, within: float = 1.0) -> tuple[float, Frame]:
        """The next frame and its arrival time; TooSlowError after ``within`` s."""
        with trio.fail_after(within):
            return await self._receive.receive()

    async def receive(self, within: float = 1.0) -> Frame:
        return (await self.receive_timed(within))[1]

    def pending(self) -> list[Frame]:
        """Frames already arrived and not yet received (does not wait)."""
        out = []
        while True:
            try:
                out.append(self._receive.receive_nowait()[1])
            except (trio.WouldBlock, trio.EndOfChannel):
                return out

    async def round_trip(self) -> Frame:
        """Send Data for an id nobody uses; return the ``connection not found``
        reply, after checking nothing else arrived before it."""
        marker = 0x7EAD
        await trio.testing.wait_all_tasks_blocked()
        await self.send(data_frame(marker, b"?"))
        frame = await self.receive()
        assert (frame.type, frame.conn_id) == (MessageType.ERROR, marker), frame
        return frame


@asynccontextmanager
async def open_raw_client(
    *,
    limits: Limits = DEFAULT_LIMITS,
    client_key: str = "c1",
    session_key: int = 0,
    extensions: int = 0,
) -> AsyncIterator[tuple[Session, RawPeer]]:
    """A server-role Session whose client is a bare WebSocket (:class:`RawPeer`)."""
    client_raw, server_raw = trio.testing.memory_stream_pair()
    server_side, client_side = _side(server_raw), _side(client_raw)
    async with trio.open_nursery() as nursery:
        server_ws, client_ws = await _handshake(
            nursery, client_side.valve, server_side.activity, DEFAULT_LIMITS, limits
        )
        session = Session(
            server_ws,
            server_side.activity,
            Role.SERVER,
            client_key=client_key,
            limits=limits,
            session_key=session_key,
            extensions=extensions,
        )
        peer = RawPeer(client_ws, client_side, server_side)
        nursery.start_soon(peer._collect)
        await nursery.start(session.run)
        try:
            yield session, peer
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_raw_server(
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> AsyncIterator[tuple[Session, RawPeer, trio.MemoryReceiveChannel[TunnelStream]]]:
    """A client-role Session facing a bare WebSocket server (:class:`RawPeer`).

    The session accepts every Connect (dial marked successful) and hands the
    stream to the third element, a channel.
    """
    client_raw, server_raw = trio.testing.memory_stream_pair()
    server_side, client_side = _side(server_raw), _side(client_raw)
    send, receive = trio.open_memory_channel[TunnelStream](math.inf)

    async def on_connect(stream: TunnelStream, proto: str, address: str) -> None:
        stream.session.dial_succeeded(stream)
        send.send_nowait(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        server_ws, client_ws = await _handshake(
            nursery, client_side.activity, server_side.valve, limits, DEFAULT_LIMITS
        )
        session = Session(
            client_ws,
            client_side.activity,
            Role.CLIENT,
            client_key="client",
            limits=limits,
            on_connect=on_connect,
        )
        peer = RawPeer(server_ws, server_side, client_side)
        nursery.start_soon(peer._collect)
        await nursery.start(session.run)
        try:
            yield session, peer, receive
        finally:
            nursery.cancel_scope.cancel()
