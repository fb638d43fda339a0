"""The trio driver of one remotedialer session.

A :class:`Session` owns a nursery with one reader (this task, which also
holds the dead-peer deadline -- on a serving server, its
:class:`~revdial._watch.KeepaliveWatch` does), one writer, on the client side a keepalive
task (pings and SyncConnections) and, on the dialer side, one task per
multiplexed stream. Idle sessions are what a fleet server holds by the
thousand, so per-session objects are few and created lazily. All protocol decisions
are made by :class:`~revdial._state.SessionState`; this module only moves
bytes and wakes tasks.

Writes: a frame is never torn, even by a cancelled sender. While nothing is
queued, a small frame is written at once by the task that made it (one
non-blocking write on a socket, under TLS or not, :class:`_DirectWriter`); otherwise, and for
whatever the socket does not take, frames go through one writer task. Urgent
frames (Pause, Resume, Sync, replies) overtake queued Data; Connect and closing
Error frames keep their place behind their stream's Data. Small Data frames
(``Limits.small_frame_bytes``) of a stream with nothing else queued take a lane
ahead of bulk Data, with a byte budget so bulk is never starved; a stream's own
frames never overtake each other.
Data is bounded by ``Limits.outbox_bytes``: senders wait.

Reads never block on a stream: Data is appended to the stream's buffer and
flow control (Pause/Resume, overrun) is the state's business.

Keepalive: the client pings every ``ping_interval`` (a Go server drops a
client that has not pinged for 60 s). Both sides declare the peer dead when
no byte at all arrived for ``ping_timeout``; only the client pings, so only
the server's reader ever has a pong to write, which cannot deadlock two
writers blocked on each other.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
import trio_websocket
import wsproto
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage

from ._errors import (
    DialSessionLostError,
    DialTimeoutError,
    ProtocolError,
    RevdialError,
    SessionLostError,
    StreamResetError,
    TunnelError,
)
from ._limits import DEFAULT_LIMITS, Limits
from ._speedups import install as install_speedups
from ._state import (
    OVERRUN_TEXT,
    ClientAnnounced,
    Closed,
    ConnectRequested,
    DataReceived,
    DialConfirmed,
    FlowChanged,
    Overrun,
    PeerHalfClosed,
    Reaped,
    Reset,
    Role,
    SessionState,
)
from ._stats import DialStats, SessionCounters
from ._stream import TunnelStream
from ._watch import KeepaliveWatch
from ._wrapped import WrappedStream
from ._wsconn import Inbox, inbox_of

__all__ = [
    "EXTENSION_HEADER",
    "EXTENSION_VERSION",
    "ActivityStream",
    "ConnectHandler",
    "Session",
    "SessionCounters",
    "SessionStatistics",
    "negotiate_extensions",
    "release_handshake_state",
    "tune_transport",
]

log = logging.getLogger("revdial")

#: Called in a new task (in the session's nursery) for each Connect the peer
#: sends. It must either call ``stream.session.dial_succeeded(stream)`` and
#: use the stream, or close it with the failure text.
ConnectHandler = Callable[[TunnelStream, str, str], Awaitable[None]]

_session_ids = itertools.count(1)

#: Handshake header carrying the revdial extension version: the agent offers
#: the highest it speaks, the server answers the version both use. A peer
#: that does not answer (a Go server) or does not offer (a Go agent) gets the
#: plain remotedialer protocol.
EXTENSION_HEADER = "X-Revdial-Version"
#: Version 1: confirmed dial (CONNECT_OK) and half-close (HALF_CLOSE).
EXTENSION_VERSION = 1


def negotiate_extensions(offer: str | None, supported: int = EXTENSION_VERSION) -> int:
    """The extension version to use given the peer's header value (0 = none)."""
    if not offer:
        return 0
    try:
        version = int(offer.strip())
    except ValueError:
        return 0
    return max(0, min(version, supported))

install_speedups()


def tune_transport(stream: trio.SocketStream, limits: Limits) -> None:
    """Keep the kernel's unsent queue of the WebSocket short (TCP_NOTSENT_LOWAT).

    Frames then wait in our outbox, where a small frame of one stream is not
    stuck behind megabytes of another's bulk data. Best effort: not every
    platform has the option.
    """
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if option is None or limits.tcp_notsent_lowat <= 0:
        return
    with contextlib.suppress(OSError):
        stream.setsockopt(socket.IPPROTO_TCP, option, limits.tcp_notsent_lowat)


class ActivityStream(WrappedStream):
    """Wraps the transport and records when it last received anything.

    Over TLS (a ``trio.SSLStream`` of a tested trio release): each receive
    also returns the plaintext of the further complete TLS records already
    received. ``SSLStream.receive_some`` hands out one record per call, with a
    scheduler round each; when the peer writes each small frame as it is made
    (see ``_DirectWriter``), that is one round per frame.
    """

    __slots__ = ("_tls", "last_receive", "pending")

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.last_receive = trio.current_time()
        self._tls: Any = None  # decided on first receive (see tls_internals)
        #: The rest of a frame a direct write could not finish (``_DirectWriter``):
        #: whatever is sent next -- a pong of trio-websocket's, the writer's
        #: frames -- goes after it, never into the middle of that frame.
        self.pending = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        pending = self.pending
        if pending:
            self.pending = b""
            data = pending + bytes(data)
        await self.inner.send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        self.last_receive = trio.current_time()
        tls = self._tls
        if tls is None:
            inner = _unwrapped(self.inner)
            tls = self._tls = inner if tls_internals(inner) else False
        if tls is not False and data and max_bytes is not None:
            data = self._more_records(tls, data, max_bytes)
        return data

    @staticmethod
    def _more_records(tls: Any, data: bytes | bytearray, max_bytes: int) -> bytes | bytearray:
        """``data`` plus the plaintext of complete records already in ``tls``'s
        incoming buffer, up to ``max_bytes`` in all. Stops at anything but
        plain application data (an incomplete record, an alert, a close, a
        record that makes the TLS layer want to send): the next receive
        handles it the ordinary way."""
        ssl_object = tls._ssl_object
        parts = [data]
        room = max_bytes - len(data)
        while room > 0 and (tls._incoming.pending or ssl_object.pending()):
            try:
                more = ssl_object.read(room)
            except ssl.SSLError:  # want-read (incomplete record), or a failure
                break
            if not more or tls._outgoing.pending:
                if more:
                    parts.append(more)
                break
            parts.append(more)
            room -= len(more)
        return parts[0] if len(parts) == 1 else b"".join(parts)


class _InlineDelivery:
    """Hand each message to the session in trio-websocket's own reader task.

    trio-websocket's reader parses messages and puts them on a memory
    channel, where :meth:`Session.run` picks them up: a task switch per
    message on each side, which is most of a small message's latency. This
    stands in for the channel's send side (``WebSocketConnection._send_channel``,
    a private attribute of trio-websocket 0.12), so the session's handler runs
    right where the message was parsed. Handling never blocks (reads never
    wait on a stream), so the reader keeps its pace.

    Messages already on the original channel keep their order: while it holds
    any, new ones are queued behind them and :meth:`Session.run` delivers
    them. The reader task's end still closes the original channel, which is
    how :meth:`Session.run` learns that the WebSocket closed.
    """

    __slots__ = ("_channel", "_closed", "_deliver", "_receive", "failed")

    def __init__(
        self,
        channel: Any,
        receive: Any,
        deliver: Callable[[bytes | str], None],
    ) -> None:
        self._channel = channel
        self._receive = receive
        self._deliver = deliver
        self._closed = False
        #: What an inline delivery raised (a ProtocolError ends the session).
        self.failed: Exception | None = None

    @classmethod
    def install(
        cls, ws: WebSocketConnection, deliver: Callable[[bytes | str], None]
    ) -> _InlineDelivery | Inbox | None:
        inbox = inbox_of(ws)
        if inbox is not None:  # opened by _wsconn: its Inbox delivers inline itself
            inbox.deliver_inline(deliver)
            return inbox
        channel = getattr(ws, "_send_channel", None)
        receive = getattr(ws, "_recv_channel", None)
        if not isinstance(channel, trio.MemorySendChannel) or not isinstance(
            receive, trio.MemoryReceiveChannel
        ):
            return None  # another trio-websocket: keep the channel
        inline = cls(channel, receive, deliver)
        ws._send_channel = inline  # type: ignore[assignment]
        return inline

    async def aclose(self) -> None:
        self._closed = True
        await self._channel.aclose()

    async def send(self, message: bytes | str) -> None:
        stats = self._receive.statistics()
        if (
            stats.current_buffer_used
            or stats.open_receive_channels == 0
            or self._closed
            or self.failed is not None
        ):
            await self._channel.send(message)  # keep order behind queued messages
            return
        try:
            self._deliver(message)
        except Exception as exc:
            self.failed = exc
            # Wake Session.run (the reader), which raises it in the session's own task.
            await self._channel.send(b"")


#: Longest revdial header of a Data frame (four varints: id, conn id, type, deadline).
_MAX_DATA_HEADER = 32
#: trio-websocket releases whose private send path :class:`_BatchSender` knows.
BATCH_TESTED_VERSIONS = ("0.12.",)


class _BatchSender:
    """Write several queued messages to the transport in one ``send_all``.

    trio-websocket sends each message with its own ``send_all``: a syscall and
    usually a trip through the event loop per frame. When the writer finds
    several frames ready (many streams sending small messages), this
    serializes each with the connection's wsproto object and writes them
    together, under trio-websocket's own write lock, exactly as its private
    ``WebSocketConnection._send`` does for one message (including the abort
    on a broken transport). It relies on private attributes of trio-websocket
    0.12 (``_wsproto``, ``_stream``, ``_stream_lock``, ``_close_reason``,
    ``_abort_web_socket``): :meth:`install` returns None for any other
    release, and the session falls back to one ``send_message`` per frame;
    ``tests/test_batching.py`` fails loudly if the installed release is not
    the one tested.
    """

    __slots__ = ("_ws",)

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws

    @staticmethod
    def supported(ws: object) -> bool:
        version = getattr(trio_websocket, "__version__", "")
        return (
            isinstance(ws, WebSocketConnection)  # not a wrapper that records send_message
            and version.startswith(BATCH_TESTED_VERSIONS)
        ) and all(
            hasattr(ws, name)
            for name in ("_wsproto", "_stream", "_stream_lock", "_close_reason",
                         "_abort_web_socket")
        )

    @classmethod
    def install(cls, ws: WebSocketConnection) -> _BatchSender | None:
        return cls(ws) if cls.supported(ws) else None

    async def send(self, frames: list[bytes]) -> None:
        """Send ``frames`` as binary messages in one write; ConnectionClosed if closed."""
        ws: Any = self._ws
        if ws._close_reason:
            raise ConnectionClosed(ws._close_reason)
        send = ws._wsproto.send
        await self.send_raw(b"".join([send(BytesMessage(data=frame)) for frame in frames]))

    async def send_raw(self, data: bytes) -> None:
        """Write bytes already serialized by the connection's wsproto object
        (the rest of a :class:`_DirectWriter`'s write); ConnectionClosed if closed."""
        ws: Any = self._ws
        if ws._close_reason:
            raise ConnectionClosed(ws._close_reason)
        async with ws._stream_lock:
            try:
                await ws._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await ws._abort_web_socket()
                raise ConnectionClosed(ws._close_reason) from None


#: trio releases whose private ``SSLStream`` state :class:`_DirectWriter` and
#: :class:`ActivityStream` use (see :func:`tls_internals`).
TLS_TESTED_TRIO_VERSIONS = ("0.35.",)
_TLS_ATTRIBUTES = ("_ssl_object", "_outgoing", "_incoming", "_inner_send_lock",
                   "_delayed_outgoing", "_outer_send_conflict_detector", "_state", "_handshook")


def _unwrapped(stream: object) -> object:
    while isinstance(stream, WrappedStream):
        stream = stream.inner
    return stream


def tls_internals(stream: object) -> bool:
    """May revdial use ``stream``'s private state (a ``trio.SSLStream`` of a
    tested trio release)?"""
    return (
        type(stream) is trio.SSLStream
        and trio.__version__.startswith(TLS_TESTED_TRIO_VERSIONS)
        and all(hasattr(stream, name) for name in _TLS_ATTRIBUTES)
    )


class _DirectWriter:
    """Write frames to the WebSocket's socket at once, from the task that made them.

    When nothing is queued and no write is under way, a small frame need not
    wake the writer task and wait for the next scheduler round: it is
    serialized with the connection's wsproto object and written with one
    non-blocking ``os.write``, as trio-websocket's ``_send`` would (the same
    private attributes as :class:`_BatchSender`, so the same version guard).
    Beyond saving a task switch per message, this lets the two ends of a
    tunnel work at the same time: a request goes out as soon as it is read,
    instead of with every other ready request at the end of the round, which
    made the server and the agent take turns under many small requests.

    On a plain TCP or unix socket, and on TLS over one (``wss://``): there the
    frame is encrypted with the ``SSLStream``'s own ``SSLObject`` and its
    ciphertext taken from the stream's outgoing buffer, exactly as
    ``SSLStream.send_all`` does, but only while that stream has no operation
    that could order ciphertext before ours (its send lock free, nothing
    pending, no delayed session tickets, the handshake done): private state of
    trio's ``SSLStream``, used only with the trio releases it was tested with
    (``TLS_TESTED_TRIO_VERSIONS``). What the socket does not take is sent
    before anything else: plain bytes wait in the :class:`ActivityStream`
    (``pending``), whose next ``send_all`` -- trio-websocket's own pong, or
    the writer's :meth:`flush` -- sends them first; ciphertext goes back at
    the head of the ``SSLStream``'s outgoing buffer, which its next operation
    sends first.
    """

    __slots__ = ("_broken", "_lock", "_socket", "_tls", "_transport", "_ws", "_wsproto")

    def __init__(
        self, ws: Any, transport: ActivityStream, sock: trio.socket.SocketType, tls: Any
    ) -> None:
        self._ws = ws
        self._wsproto = ws._wsproto
        self._lock = ws._stream_lock
        self._transport = transport
        self._socket = sock
        self._tls = tls
        #: The TLS object refused a write: the connection cannot go on.
        self._broken = False

    @classmethod
    def install(cls, ws: WebSocketConnection, transport: ActivityStream) -> _DirectWriter | None:
        """For ``ws`` over ``transport`` (which all its writes must pass)."""
        if not _BatchSender.supported(ws):
            return None
        stream: object = ws._stream
        while stream is not transport:  # every write of trio-websocket's passes it
            if not isinstance(stream, WrappedStream):
                return None
            stream = stream.inner
        stream = _unwrapped(stream)
        tls = None
        if isinstance(stream, trio.SSLStream):
            if not tls_internals(stream):
                return None
            tls = stream
            stream = _unwrapped(stream.transport_stream)
        if type(stream) is not trio.SocketStream:  # a memory stream, TLS over TLS, ...
            return None
        return cls(ws, transport, stream.socket, tls)

    def ready(self) -> bool:
        """No write is under way (trio-websocket's own: ping, pong, close; or
        the TLS layer's) and the connection is open."""
        if self._lock.locked() or self._wsproto.state is not ConnectionState.OPEN or (
            self._ws._close_reason or self._transport.pending
        ):
            return False
        tls = self._tls
        return tls is None or (
            not tls._inner_send_lock.locked()
            and not tls._outgoing.pending
            and tls._delayed_outgoing is None
            and not tls._outer_send_conflict_detector._held
            and tls._state.name == "OK"
            and tls._handshook.done
        )

    def write(self, frames: list[bytes]) -> bool:
        """Serialize and write ``frames``; False if the socket did not take
        everything (then the writer must :meth:`flush` before anything else)."""
        send = self._wsproto.send
        if len(frames) == 1:
            data = send(BytesMessage(data=frames[0]))
        else:
            data = b"".join([send(BytesMessage(data=frame)) for frame in frames])
        tls = self._tls
        if tls is not None:
            try:
                tls._ssl_object.write(data)
            except (ssl.SSLError, ssl.CertificateError):
                self._broken = True  # flush() ends the connection, as send_all would
                return False
            data = tls._outgoing.read()
        fd = self._socket.fileno()  # -1 once closed: never a reused descriptor
        try:
            n = os.write(fd, data) if fd >= 0 else 0
        except OSError:  # full (BlockingIOError), or broken: the writer reports it
            n = 0
        if n >= len(data):
            return True
        if tls is not None:
            # The outgoing buffer was empty (ready()) and nothing ran since:
            # the rest goes back at its head, ahead of any later ciphertext.
            tls._outgoing.write(data[n:])
        else:
            self._transport.pending = data[n:]
        return False

    async def flush(self) -> None:
        """Send what :meth:`write` left (the writer task); ConnectionClosed if
        the connection is closed or broken."""
        ws: Any = self._ws
        if self._tls is None:
            # The transport sends its pending bytes first (unless a pong of
            # trio-websocket's already took them along).
            await _BatchSender(ws).send_raw(b"")
            return
        tls = self._tls
        try:
            if self._broken:
                raise trio.BrokenResourceError("TLS refused a write")
            async with ws._stream_lock, tls._inner_send_lock:
                data = tls._outgoing.read()
                if data:
                    await tls.transport_stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            raise ConnectionClosed(ws._close_reason) from None


class _Unallocated(deque[Any]):
    """The stand-in for an outbox queue a session has not needed yet.

    An empty deque costs ~760 bytes (its first block of 64 slots); a session
    has three, and most sessions of a fleet server never queue a frame. One
    shared instance of this always-empty deque stands in until the first
    append, which must replace it (appending to it raises: a bug).
    """

    __slots__ = ()

    def append(self, item: Any) -> None:
        raise AssertionError("append to the unallocated stand-in queue")

    def extend(self, items: Any) -> None:
        raise AssertionError("extend of the unallocated stand-in queue")

    def appendleft(self, item: Any) -> None:
        raise AssertionError("appendleft to the unallocated stand-in queue")


_NO_QUEUE: deque[Any] = _Unallocated()

#: The reader's "scope" when a KeepaliveWatch holds its deadline.
_NO_SCOPE = contextlib.nullcontext()


#: trio-websocket and wsproto releases whose handshake objects
#: :func:`release_handshake_state` knows.
HANDSHAKE_TESTED_VERSIONS = {"trio-websocket": ("0.12.",), "wsproto": ("1.2.", "1.3.")}


class _OpenedHandshake:
    """What stays of wsproto's ``H11Handshake`` once the connection is open.

    ``wsproto.WSConnection`` consults its handshake after the 101 only in
    ``events()`` (``yield from self.handshake.events()``, always empty by
    then); ``send``, ``receive_data`` and ``state`` go to the connection.
    """

    __slots__ = ()

    def events(self) -> tuple[()]:
        return ()


_OPENED_HANDSHAKE = _OpenedHandshake()


class _EventList(list[Any]):
    """What replaces the open ``wsproto.Connection``'s ``_events`` deque.

    wsproto queues an event there only when the transport ends without a
    Close frame (``receive_data(None)``); ``events()`` drains it with
    ``popleft``. An empty deque is ~760 bytes, an empty list 56.
    """

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


def _set_event() -> trio.Event:
    event = trio.Event()
    event.set()
    return event


#: Stands in for trio-websocket's ``_open_handshake`` Event once it was set
#: (a set Event stays set: ``wait()`` returns at once, ``set()`` does
#: nothing) and for ``_for_testing_peer_closed_connection``, which only
#: trio-websocket's own tests wait for.
_SET_EVENT = _set_event()


def release_handshake_state(ws: object) -> bool:
    """Let the opening handshake's objects go once the WebSocket is open.

    wsproto keeps its ``H11Handshake`` (an ``h11.Connection``, the parsed
    request, an event deque: ~2-3 KiB) for the whole life of the connection,
    and trio-websocket 0.12 the client's ``Request``; neither is used again
    after the 101. On a fleet server of idle sessions that is a tenth of each
    session. This swaps the handshake for :class:`_OpenedHandshake` and drops
    the client's request; it also swaps the open connection's (empty) event
    deque for an :class:`_EventList` and trio-websocket's set
    ``_open_handshake`` Event and its test-only
    ``_for_testing_peer_closed_connection`` Event for the shared, set
    :data:`_SET_EVENT` (~1.3 KiB together). These are private attributes
    (``WebSocketConnection._wsproto``, ``._initial_request``,
    ``._open_handshake``, ``._for_testing_peer_closed_connection``,
    ``H11Handshake._events``, ``Connection._events``), so only for the
    releases in :data:`HANDSHAKE_TESTED_VERSIONS`, and only when the
    connection is open with no handshake event pending. Returns whether it
    did; ``tests/test_fleet.py`` fails loudly on other releases.
    Synchronous: call it in the task that completed the handshake.
    """
    if not isinstance(ws, WebSocketConnection):
        return False  # a wrapper (tests) or another implementation
    if not (
        getattr(trio_websocket, "__version__", "").startswith(
            HANDSHAKE_TESTED_VERSIONS["trio-websocket"]
        )
        and getattr(wsproto, "__version__", "").startswith(HANDSHAKE_TESTED_VERSIONS["wsproto"])
    ):
        return False
    connection = getattr(ws, "_wsproto", None)
    if not isinstance(connection, wsproto.WSConnection) or connection.connection is None:
        return False
    handshake: object = connection.handshake
    if handshake is not _OPENED_HANDSHAKE and getattr(handshake, "_events", True):
        return False  # an event still to be read (never seen), or unknown internals
    connection.handshake = _OPENED_HANDSHAKE  # type: ignore[assignment]
    if hasattr(ws, "_initial_request"):
        ws._initial_request = None
    opened: Any = connection.connection
    events = getattr(opened, "_events", None)
    if type(events) is deque and not events:
        opened._events = _EventList()
    conn: Any = ws
    opening = getattr(conn, "_open_handshake", None)
    if isinstance(opening, trio.Event) and opening.is_set():
        conn._open_handshake = _SET_EVENT
    if isinstance(getattr(conn, "_for_testing_peer_closed_connection", None), trio.Event):
        conn._for_testing_peer_closed_connection = _SET_EVENT
    return True


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    streams: int
    buffered_bytes: int
    outbox_bytes: int
    outbox_frames: int


class Session:
    """One WebSocket carrying many streams. Create it, then ``await run()``."""

    # Slots: a fleet server holds thousands of idle sessions, and a
    # dict for ~40 attributes (past CPython's key-sharing limit) is ~1.6 KiB.
    __slots__ = (
        "_dial_lot", "_dial_stats", "_dials_in_flight", "_direct", "_direct_pending", "_ended",
        "_ended_event", "_fifo", "_fifo_control", "_fifo_data_bytes",
        "_fifo_in", "_fifo_out", "_nursery", "_on_connect", "_pauses_received",
        "_resets_local", "_resets_overrun", "_resets_peer", "_resets_protocol", "_resets_sync",
        "_small", "_small_bytes", "_small_run", "_space_lot", "_streams", "_transport",
        "_urgent", "_watch", "_writer_idle", "_writer_lot", "_writer_retire",
        "_writer_running", "bytes_received", "bytes_sent", "client_key", "end_reason", "id",
        "limits", "on_announce", "on_end", "remote", "role", "started_at", "started_wall",
        "state", "ws",
    )

    def __init__(
        self,
        ws: WebSocketConnection,
        transport: ActivityStream,
        role: Role,
        *,
        client_key: str,
        limits: Limits = DEFAULT_LIMITS,
        on_connect: ConnectHandler | None = None,
        session_key: int = 0,
        extensions: int = 0,
        remote: str = "",
        dial_stats: DialStats | None = None,
        on_announce: Callable[[ClientAnnounced], None] | None = None,
        watch: KeepaliveWatch | None = None,
    ) -> None:
        self.ws = ws
        self._transport = transport
        self.role = role
        self.limits = limits
        #: The client key this session serves (server side) / "client" (agent).
        self.client_key = client_key
        self.id = next(_session_ids)
        #: ``host:port`` of the peer ("" if unknown), for logs and reports.
        self.remote = remote
        #: When the session started: trio's clock (for its age) and the wall clock.
        self.started_at = trio.current_time()
        self.started_wall = time.time()
        #: Dial outcomes of the streams this side opens (shared by a server's sessions).
        self._dial_stats = dial_stats  # created on first use if None (see dial_stats)
        # Cumulative counters (see counters()): plain ints, one add per frame.
        self.bytes_received = 0
        self.bytes_sent = 0
        self._pauses_received = 0
        self._resets_peer = 0
        self._resets_local = 0
        self._resets_overrun = 0
        self._resets_protocol = 0
        self._resets_sync = 0
        self.state = SessionState(
            role,
            limits,
            client_key="client" if role is Role.CLIENT else client_key,
            session_key=session_key,
            extensions=extensions,
        )
        self._on_connect = on_connect
        #: Who holds the keepalive deadline: a server's watch (running), or
        #: None: the reader, in a cancel scope of its own.
        self._watch = watch
        #: Called synchronously for each AddClient/RemoveClient received
        #: (server sessions; a peer's announcements). None: ignored.
        self.on_announce = on_announce
        #: Called synchronously, once, as the session ends (before its
        #: WebSocket is closed): a server withdraws it from its peers at once.
        self.on_end: Callable[[Session], None] | None = None
        self._streams: dict[int, TunnelStream] = {}
        # The three outbox queues start as the shared empty _NO_QUEUE and get a
        # deque of their own on first use (see _Unallocated).
        self._urgent: deque[bytes] = _NO_QUEUE
        self._fifo: deque[bytes | tuple[bytes, int, TunnelStream]] = _NO_QUEUE
        self._fifo_data_bytes = 0
        self._small_bytes = 0  # Data bytes in the small-frame lane (own bound)
        self._fifo_control = 0  # Connect/Error frames queued in _fifo
        # Items ever appended to / taken from _fifo: a stream whose Connect or
        # CONNECT_OK is still queued (hold > taken) must not use the small lane.
        self._fifo_in = 0
        self._fifo_out = 0
        #: Small Data frames of streams with nothing else queued (see _queue_data).
        self._small: deque[tuple[bytes, int, TunnelStream]] = _NO_QUEUE
        self._small_run = 0  # small-lane bytes sent since the last bulk item
        # Parking lots and the ended Event are created when first needed
        # (an idle session needs none of them).
        self._writer_lot: trio.lowlevel.ParkingLot | None = None
        # The writer task runs only while there is something to write: it is
        # started by the first frame queued and retired by the reader once it
        # has been idle (see _start_writer, _retire_idle_writer).
        self._writer_running = False
        self._writer_idle = False
        self._writer_retire = False
        #: Frames are written by the task that makes them while nothing is
        #: queued (see _DirectWriter; set by run(), None when unsupported).
        self._direct: _DirectWriter | None = None
        #: A direct write left bytes the writer must send first (_DirectWriter.flush).
        self._direct_pending = False
        self._space_lot: trio.lowlevel.ParkingLot | None = None
        # Our dials whose outcome is not known yet, and (made on first need)
        # where dials wait while max_dials_in_flight of them are (see dial_slot).
        self._dials_in_flight = 0
        self._dial_lot: trio.lowlevel.ParkingLot | None = None
        self._nursery: trio.Nursery | None = None
        self._ended = False
        self.end_reason: BaseException | None = None
        self._ended_event: trio.Event | None = None

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.role.value} {self.client_key!r}>"

    # --- public -----------------------------------------------------------

    @property
    def dial_stats(self) -> DialStats:
        """Outcomes of the dials through this session (a server shares one
        among its sessions; otherwise created when first needed)."""
        stats = self._dial_stats
        if stats is None:
            stats = self._dial_stats = DialStats()
        return stats

    @property
    def ended(self) -> trio.Event:
        """Set once :meth:`run` has finished (the WebSocket is closed)."""
        event = self._ended_event
        if event is None:
            event = self._ended_event = trio.Event()
        return event

    @property
    def is_open(self) -> bool:
        return not self._ended

    @property
    def extensions(self) -> int:
        """The negotiated revdial extension version (0: plain remotedialer)."""
        return self.state.extensions

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(
            streams=len(self.state.conns),
            buffered_bytes=self.state.buffered_total,
            outbox_bytes=self._fifo_data_bytes + self._small_bytes,
            outbox_frames=len(self._fifo) + len(self._urgent) + len(self._small),
        )

    def counters(self) -> SessionCounters:
        """Cumulative figures of this session (they never go down)."""
        return SessionCounters(
            bytes_received=self.bytes_received,
            bytes_sent=self.bytes_sent,
            pauses_sent=self.state.pauses_sent,
            pauses_received=self._pauses_received,
            resets_peer=self._resets_peer,
            resets_local=self._resets_local,
            resets_overrun=self._resets_overrun,
            resets_protocol=self._resets_protocol,
            resets_sync=self._resets_sync,
        )

    def open_stream(self, proto: str, address: str) -> TunnelStream:
        """Open a connection to ``proto/address`` on the peer (base protocol).

        Returns at once: as in remotedialer, a failed dial surfaces as a
        :class:`~revdial.DialError` from the stream's first receive or send.
        """
        if self._ended:
            raise SessionLostError(f"session {self.id} to {self.client_key!r} has ended")
        if len(self.state.conns) >= self.limits.max_streams:
            raise TunnelError(f"stream limit of the session reached ({self.limits.max_streams})")
        now = trio.current_time()
        conn_id = self.state.open(proto, address, now)
        stream = TunnelStream(self, conn_id, f"{proto}/{address}", opened_by_us=True)
        stream._dial_started = now
        self._dials_in_flight += 1
        self._streams[conn_id] = stream
        self._flush_state()
        stream._fifo_hold = self._fifo_in  # our Data must follow the Connect
        return stream

    @property
    def dials_full(self) -> bool:
        """Would a dial now exceed ``max_dials_in_flight`` (revdial agents only)?"""
        return (
            self._dials_in_flight >= self.limits.max_dials_in_flight
            and self.state.extensions >= 1
        )

    async def open_dial(self, proto: str, address: str, wait_limit: float) -> TunnelStream:
        """:meth:`open_stream`, after waiting for a dial slot if the session
        has ``max_dials_in_flight`` dials in flight (see :meth:`dial_slot`).
        No checkpoint when it need not wait (the caller's dial() has one)."""
        if self.dials_full or self._dial_lot:  # a burst: wait, after those waiting
            await self.dial_slot(wait_limit, f"{proto}/{address}")
        return self.open_stream(proto, address)

    async def dial_slot(self, wait_limit: float, target: str) -> None:
        """Wait until a dial may start on this session (see ``dials_full``).

        A revdial agent refuses Connects beyond its ``max_pending_dials``; a
        burst of dials (a front end opening hundreds of connections at once)
        waits here instead, in order, until earlier dials have their outcome.
        Raises :class:`~revdial.DialTimeoutError` after ``wait_limit`` seconds
        (0: no limit) and :class:`~revdial.DialSessionLostError` if the
        session ends meanwhile.
        """
        lot = self._dial_lot
        if lot is None:
            lot = self._dial_lot = trio.lowlevel.ParkingLot()
        took = False
        try:
            with trio.move_on_after(wait_limit or math.inf) as scope:
                while self.dials_full and not self._ended:
                    await lot.park()
            took = not (scope.cancelled_caught or self._ended)
        finally:
            if not took and not self.dials_full and lot:
                lot.unpark()  # a wake-up this task will not use goes on
        if self._ended:
            raise DialSessionLostError(
                f"session {self.id} to {self.client_key!r} ended while the dial waited",
                client_key=self.client_key, target=target,
            )
        if scope.cancelled_caught:
            self.dial_stats.record("timeout", None)
            raise DialTimeoutError(
                f"dial {target} via client {self.client_key!r}: "
                f"{self.limits.max_dials_in_flight} dials in flight for {wait_limit:g} s",
                reason="timeout", client_key=self.client_key, target=target,
            )

    def _dial_finished(self) -> None:
        """One of our dials has its outcome (called once per dial by the stream)."""
        self._dials_in_flight -= 1
        if self._dial_lot:
            self._dial_lot.unpark()

    async def dial(
        self, stream: TunnelStream, connect_timeout: float, *, wait: bool = True
    ) -> TunnelStream:
        """Finish a dial of a stream from :meth:`open_stream` (see ``Server.dial``).

        With extension v1 and ``wait``: wait for the peer's confirmation,
        raising the typed DialError, or DialTimeoutError after
        ``connect_timeout``. Plain remotedialer, or ``wait=False``: return at
        once, arming the first-byte timeout (with v1 the confirmation also
        disarms it). ``connect_timeout`` 0 disables the timeout. On any
        exception, cancellation included, the stream is closed (no table
        entry leaks).
        """
        if self.extensions < 1 or not wait:
            await trio.lowlevel.checkpoint()
            if connect_timeout > 0:
                stream._arm_first_byte_timeout(connect_timeout)
            return stream
        try:
            with trio.move_on_after(connect_timeout or math.inf) as scope:
                await stream.wait_dialed()
        except BaseException:
            stream.close_nowait()
            raise
        if scope.cancelled_caught:
            raise stream.fail_dial_timeout(connect_timeout)
        return stream

    def announce(self, client_key: str, session_key: int, *, added: bool) -> None:
        """Send AddClient (``added``) or RemoveClient ``client_key/session_key``
        to the peer (peering, PROTOCOL 4.2). A no-op once the session ended."""
        if self._ended:
            return
        self.state.announce(client_key, session_key, added=added)
        self._flush_state()

    def dial_succeeded(self, stream: TunnelStream) -> None:
        """The agent's connect for ``stream`` worked (confirms it to a v1 peer)."""
        self.state.dial_succeeded(stream.conn_id)
        self._flush_state()
        stream._fifo_hold = self._fifo_in  # our Data must follow the CONNECT_OK

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the session until the peer goes away, then clean up.

        Returns normally when the WebSocket ends or the peer breaks the
        protocol (the reason is in :attr:`end_reason` and logged); every
        stream then fails with :class:`~revdial.SessionLostError`. On
        cancellation the tables are cleaned up the same way.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._direct = _DirectWriter.install(self.ws, self._transport)
                if self._urgent or self._fifo or self._small:
                    self._start_writer()
                if self.role is Role.CLIENT:
                    nursery.start_soon(self._keepalive)
                task_status.started()
                # The reader: wait for the WebSocket's end (messages are mostly
                # handled inline) and watch for a silent peer: the keepalive
                # deadline is this task's (or, on a server, its KeepaliveWatch's),
                # so a session needs no watchdog task of its own. In run()
                # itself: a coroutine frame less per idle session.
                get_message, inline = self._start_reading()
                watch = self._watch
                entry = None
                try:
                    if watch is not None:
                        entry = watch.watch(
                            self, self._transport.last_receive + self.limits.ping_timeout
                        )
                    closed = False
                    while not closed:
                        scope: contextlib.AbstractContextManager[object] = _NO_SCOPE
                        if watch is None:
                            # One cancel scope per ping_timeout of quiet, not per message.
                            deadline = self._keepalive_due(trio.current_time())
                            if deadline is None:
                                break
                            scope = trio.CancelScope(deadline=deadline)
                        with scope:
                            while True:
                                try:
                                    message = await get_message()
                                except (ConnectionClosed, trio.EndOfChannel,
                                        trio.ClosedResourceError) as exc:
                                    self._closed_by(exc)
                                    closed = True
                                    break
                                if inline is not None and inline.failed is not None:
                                    # The next message after the failure is its marker.
                                    raise inline.failed
                                self._deliver(message)
                except ProtocolError as exc:
                    self._abort(exc)
                finally:
                    if entry is not None:
                        entry[2] = None  # the watch lets go of this session
                    self._teardown()
                    nursery.cancel_scope.cancel()
        finally:
            self._teardown()
            try:
                if trio.current_effective_deadline() == -math.inf:
                    # We are being cancelled (shutdown): trio-websocket's reader
                    # is being cancelled too, so no close handshake can complete.
                    await trio.aclose_forcefully(self._transport)
                else:
                    with trio.CancelScope(shield=True), trio.move_on_after(
                        self.limits.close_timeout
                    ):
                        await self.ws.aclose()
            finally:
                self.ended.set()

    # --- internals: stream hooks ------------------------------------------

    def _consumed(self, conn_id: int, nbytes: int) -> None:
        self.state.consumed(conn_id, nbytes)
        if self.state.has_pending:
            self._flush_state()

    def _demote_small(self, stream: TunnelStream) -> None:
        """Move the stream's small-lane frame to the queue, ahead of its Error/EOF."""
        for item in self._small:
            if item[2] is stream:
                self._small.remove(item)
                self._small_bytes -= item[1]
                if self._fifo is _NO_QUEUE:
                    self._fifo = deque()
                self._fifo.append(item)
                self._fifo_in += 1
                self._fifo_data_bytes += item[1]  # may exceed the bound by this frame
                break
        stream._small_pending = False

    def _send_eof(self, conn_id: int) -> None:
        if self._ended:
            return
        stream = self._streams.get(conn_id)
        if stream is not None and stream._small_pending:
            self._demote_small(stream)
        self.state.send_eof(conn_id)
        if conn_id not in self.state.conns:  # both directions done: retired
            self._streams.pop(conn_id, None)
        self._flush_state()

    def _close_stream(self, conn_id: int, error: str | None) -> None:
        stream = self._streams.pop(conn_id, None)
        if stream is not None and stream._small_pending:
            self._demote_small(stream)
        if not self._ended and self.state.close(conn_id, error):
            if error is not None:
                self._resets_local += 1
            self._flush_state()

    def _is_small(self, stream: TunnelStream, n: int) -> bool:
        """Would ``n`` bytes of Data from ``stream`` take the small-frame lane?"""
        limits = self.limits
        return (
            n <= limits.small_frame_bytes
            and n < limits.max_frame_size  # a full frame means more is coming: bulk
            and stream._queued == 0
            and self._fifo_out >= stream._fifo_hold
        )

    def _outbox_full(self, small: bool) -> bool:
        queued = self._small_bytes if small else self._fifo_data_bytes
        return queued >= self.limits.outbox_bytes

    async def _wait_outbox_space(self, small: bool) -> None:
        """Wait until that lane of the outbox takes more Data (at once if ended)."""
        while self._outbox_full(small) and not self._ended:
            lot = self._space_lot
            if lot is None:
                lot = self._space_lot = trio.lowlevel.ParkingLot()
            await lot.park()

    def _queue_data(self, stream: TunnelStream, chunk: memoryview, small: bool) -> None:
        """Queue one Data frame; the caller checked the stream is writable and
        decided the lane with :meth:`_is_small` (nothing awaited since)."""
        frame = b"".join((self.state.data_header(stream.conn_id), chunk))
        n = len(chunk)
        if small and self._writes_through():
            self.bytes_sent += n
            self._write_through([frame])
            return
        if small:
            # Nothing of this stream is queued: it may skip ahead of bulk Data.
            # Until the writer takes it the stream queues nothing else (see
            # TunnelStream.send_all and _demote_small), so the lanes can never
            # reorder one stream's frames.
            if self._small is _NO_QUEUE:
                self._small = deque()
            self._small.append((frame, n, stream))
            self._small_bytes += n
            stream._small_pending = True
        else:
            if self._fifo is _NO_QUEUE:
                self._fifo = deque()
            self._fifo.append((frame, n, stream))
            self._fifo_in += 1
            self._fifo_data_bytes += n
        stream._queued += n
        if self._writer_running:
            lot = self._writer_lot  # inline _wake_writer: once per queued frame
            if lot is not None:
                lot.unpark()
        else:
            self._start_writer()

    def _writes_through(self) -> bool:
        """May a frame be written at once (:class:`_DirectWriter`)? Only when
        nothing is queued and the writer is not holding frames it took."""
        direct = self._direct
        return (
            direct is not None
            and not self._direct_pending
            and not self._urgent
            and not self._small
            and not self._fifo
            and (self._writer_idle or not self._writer_running)
            and not self._ended
            and direct.ready()
        )

    def _write_through(self, frames: list[bytes]) -> None:
        """Write ``frames`` now (:meth:`_writes_through` said so); the writer
        gets what the socket did not take."""
        assert self._direct is not None
        if not self._direct.write(frames):
            self._direct_pending = True
            if self._writer_running:
                self._wake_writer()
            else:
                self._start_writer()

    def _flush_state(self) -> None:
        state = self.state
        urgent = state.take_urgent()
        ordered = state.take_ordered()
        if (urgent or ordered) and self._writes_through():
            if ordered:  # as if queued and taken: their streams may use the small lane
                self._fifo_in += len(ordered)
                self._fifo_out += len(ordered)
            self._write_through(urgent + ordered)
            return
        if urgent:
            if self._urgent is _NO_QUEUE:
                self._urgent = deque()
            self._urgent.extend(urgent)
        if ordered:
            if self._fifo is _NO_QUEUE:
                self._fifo = deque()
            self._fifo.extend(ordered)
            self._fifo_control += len(ordered)
            self._fifo_in += len(ordered)
        if len(self._urgent) + self._fifo_control > self.limits.max_control_frames:
            # The peer provokes replies but does not read them.
            self._abort(ProtocolError("peer is not reading: control frame queue overflow"))
        if self._writer_running:
            lot = self._writer_lot  # inline _wake_writer: once per queued frame
            if lot is not None:
                lot.unpark()
        else:
            self._start_writer()

    def _abort(self, reason: RevdialError) -> None:
        """End the session from any task: record why, cancel its nursery."""
        if self.end_reason is None:
            self.end_reason = reason
            log.warning("session %s (%s): %s", self.id, self.client_key, reason)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # --- internals: tasks -------------------------------------------------

    def _start_reading(self) -> tuple[Callable[[], Awaitable[bytes | str]], Any]:
        """Install inline delivery; what :meth:`run` waits on for messages."""
        ws = self.ws
        inline = _InlineDelivery.install(ws, self._deliver)
        # With an Inbox, wait on it directly (what get_message does, a
        # coroutine frame less while idle).
        if isinstance(inline, Inbox):
            return inline.receive, inline
        return ws.get_message, inline

    def _closed_by(self, exc: Exception) -> None:
        reason = exc.reason if isinstance(exc, ConnectionClosed) else self.ws.closed
        self.end_reason = SessionLostError(
            f"WebSocket closed ({reason.code} {reason.name})"
            if reason is not None
            else "WebSocket closed"
        )

    def _keepalive_due(self, now: float) -> float | None:
        """At a keepalive deadline: end the session if the peer was silent for
        ``ping_timeout`` (None), else retire an idle writer and return the
        next deadline (``ping_timeout`` after the last byte received)."""
        if self._ended:
            return None
        timeout = self.limits.ping_timeout
        deadline = self._transport.last_receive + timeout
        if now >= deadline:
            self._abort(SessionLostError(f"peer silent for {timeout:.0f} s (keepalive timeout)"))
            return None
        self._retire_idle_writer()
        return deadline

    def _deliver(self, message: bytes | str) -> None:
        """Handle one WebSocket message (from :meth:`run` or inline)."""
        if self._ended or self.end_reason is not None:
            return  # ending: trio-websocket's reader may still hand us some
        if isinstance(message, str):
            raise ProtocolError("received a text WebSocket message")
        state = self.state
        event = state.receive(message, trio.current_time())
        if event is not None:
            if type(event) is DataReceived:
                self.bytes_received += len(event.data)
                stream = self._streams.get(event.conn_id)
                if stream is not None:
                    stream._feed(event.data)
            else:
                self._dispatch(event)
            if state._overruns:  # the session cap reset the largest holder too
                for conn_id in state.take_overruns():
                    self._dispatch(Overrun(conn_id))
        if state.has_pending:
            self._flush_state()

    def _dispatch(self, event: Any) -> None:
        streams = self._streams
        if isinstance(event, FlowChanged):
            self._pauses_received += event.paused
            stream = streams.get(event.conn_id)
            if stream is not None:
                stream._set_peer_paused(event.paused)
        elif isinstance(event, Closed):
            stream = streams.pop(event.conn_id, None)
            if stream is not None:
                stream._peer_closed(event.error, event.received_data)
                if event.error is not None and type(stream.error) is StreamResetError:
                    self._resets_peer += 1
        elif isinstance(event, ConnectRequested):
            self._accept_connect(event)
        elif isinstance(event, ClientAnnounced):
            if self.on_announce is not None:
                self.on_announce(event)
        elif isinstance(event, DialConfirmed):
            stream = streams.get(event.conn_id)
            if stream is not None:
                stream._dial_confirmed()
        elif isinstance(event, PeerHalfClosed):
            stream = streams.pop(event.conn_id, None) if event.retired else streams.get(
                event.conn_id
            )
            if stream is not None:
                stream._peer_half_closed()
        elif isinstance(event, Reset):
            self._resets_protocol += 1
            stream = streams.pop(event.conn_id, None)
            log.warning(
                "session %s (%s): stream %s reset: %s",
                self.id,
                self.client_key,
                event.conn_id,
                event.reason,
            )
            if stream is not None:
                stream._fail(StreamResetError(event.reason, reason=event.reason), drop_buffer=True)
        elif isinstance(event, Overrun):
            self._resets_overrun += 1
            stream = streams.pop(event.conn_id, None)
            log.warning(
                "session %s (%s): stream %s overran its receive buffer; reset",
                self.id,
                self.client_key,
                event.conn_id,
            )
            if stream is not None:
                stream._fail(
                    StreamResetError(
                        "peer ignored Pause and overran the receive buffer", reason=OVERRUN_TEXT
                    ),
                    drop_buffer=True,
                )
        elif isinstance(event, Reaped):
            self._resets_sync += len(event.conn_ids)
            for conn_id in event.conn_ids:
                stream = streams.pop(conn_id, None)
                if stream is not None:
                    stream._fail(
                        StreamResetError(
                            "stream unknown to the peer (SyncConnections)",
                            reason="sync from client",
                        ),
                        drop_buffer=False,
                    )

    def _accept_connect(self, event: ConnectRequested) -> None:
        target = f"{event.proto}/{event.address}"
        if event.replaced:
            self._replace_stream(event.conn_id, target)
        if self._on_connect is None or self._nursery is None:
            log.warning(
                "session %s (%s): refused Connect %s from the peer: this side does not dial",
                self.id,
                self.client_key,
                target,
            )
            self.state.close(event.conn_id, "revdial: this side does not accept Connect")
            return
        stream = TunnelStream(self, event.conn_id, target, opened_by_us=False)
        self._streams[event.conn_id] = stream
        self._nursery.start_soon(self._run_handler, self._on_connect, stream, event)

    def _replace_stream(self, conn_id: int, target: str) -> None:
        """The peer reused ``conn_id`` for a new Connect: fail the old stream here.

        No Error frame (the id now names the new connection), and the old
        stream's queued Data is dropped so that none of it reaches the new one.
        """
        old = self._streams.pop(conn_id, None)
        log.warning(
            "session %s (%s): peer reused connection id %s for a Connect to %s; "
            "the stream that had it is reset",
            self.id, self.client_key, conn_id, target,
        )
        if old is None:
            return
        old._detach()
        self._drop_queued(old)
        old._fail(
            StreamResetError(
                f"stream {old.target} reset: the peer reused its connection id",
                reason="connection id reused by the peer",
            ),
            drop_buffer=True,
        )

    def _drop_queued(self, stream: TunnelStream) -> None:
        """Remove ``stream``'s Data frames from both lanes of the outbox."""
        if stream._small_pending:
            for small in self._small:
                if small[2] is stream:
                    self._small.remove(small)
                    self._small_bytes -= small[1]
                    break
            stream._small_pending = False
        if stream._queued and self._fifo is not _NO_QUEUE:
            kept: deque[bytes | tuple[bytes, int, TunnelStream]] = deque()
            for item in self._fifo:
                if type(item) is tuple and item[2] is stream:
                    self._fifo_data_bytes -= item[1]
                    self._fifo_out += 1  # as if the writer took it: later holds stay valid
                    continue
                kept.append(item)
            self._fifo = kept
        stream._queued = 0
        self._wake_senders()

    async def _run_handler(
        self, handler: ConnectHandler, stream: TunnelStream, event: ConnectRequested
    ) -> None:
        try:
            await handler(stream, event.proto, event.address)
        except TunnelError as exc:
            log.debug("session %s: stream %s ended: %s", self.id, stream.target, exc)
        except Exception:
            # A bug in one stream's handler must not end the whole session.
            log.exception("session %s: handler for %s failed", self.id, stream.target)
            stream.close_nowait("revdial: internal error")
        finally:
            stream.close_nowait()

    def _wake_senders(self) -> None:
        """Wake the senders waiting for outbox space (if any ever waited)."""
        if self._space_lot is not None:
            self._space_lot.unpark_all()

    def _wake_writer(self) -> None:
        """Wake the writer if it is parked with nothing to write."""
        if self._writer_lot is not None:
            self._writer_lot.unpark()

    def _taken(self, stream: TunnelStream, n: int) -> None:
        """The writer took ``n`` Data bytes of ``stream`` out of the outbox."""
        self.bytes_sent += n
        stream._dequeued(n)
        lot = self._space_lot
        if lot is not None:
            lot.unpark_all()

    def _next_frame(self) -> bytes | None:
        """Take the next frame to write, in lane order, or None if nothing is queued."""
        urgent = self._urgent
        if urgent:
            return urgent.popleft()
        small = self._small
        fifo = self._fifo
        if small and (not fifo or self._small_run < self.limits.small_frame_budget):
            frame, n, stream = small.popleft()
            stream._small_pending = False
            self._small_run += n
            self._small_bytes -= n
            self._taken(stream, n)
            return frame
        if fifo:
            item = fifo.popleft()
            self._fifo_out += 1
            self._small_run = 0
            if type(item) is tuple:
                frame, n, stream = item
                self._fifo_data_bytes -= n
                self._taken(stream, n)
                return frame
            self._fifo_control -= 1
            return item  # type: ignore[return-value]
        return None

    def _start_writer(self) -> None:
        """Start the writer task for newly queued frames (no-op before run()
        or after the end: run() starts it if frames are already queued)."""
        if self._writer_running or self._nursery is None or self._ended:
            return
        self._writer_running = True
        self._writer_retire = False
        self._nursery.start_soon(self._writer)

    def _retire_idle_writer(self) -> None:
        """Let a writer that is parked with nothing to write end (the reader
        calls this at its keepalive deadline): an idle session holds no
        writer task. The next queued frame starts a new one."""
        if self._writer_running and self._writer_idle:
            self._writer_retire = True
            self._wake_writer()

    async def _writer(self) -> None:
        """Write queued frames until the outbox is empty and the reader asked
        it to retire, or the WebSocket is closed. Cancelled with the session;
        a frame is only ever written whole (one ``send_message`` or one
        batched ``send_all``)."""
        send = self.ws.send_message
        batch_sender = _BatchSender.install(self.ws)
        # Frames gathered into one write: at most this many bytes, so a batch
        # never costs more than one extra copy of small frames; a frame larger
        # than a small one is written alone (no copy of bulk data).
        batch_bytes = self.limits.small_frame_budget
        small_frame = self.limits.small_frame_bytes + _MAX_DATA_HEADER
        try:
            while True:
                if self._direct_pending:
                    self._direct_pending = False
                    if self._direct is not None:
                        await self._direct.flush()
                    continue
                frame = self._next_frame()
                if frame is None:
                    if self._writer_retire:
                        self._writer_running = self._writer_retire = False
                        self._writer_lot = None  # nothing parks on it until the next writer
                        return
                    self._writer_idle = True
                    lot = self._writer_lot
                    if lot is None:
                        lot = self._writer_lot = trio.lowlevel.ParkingLot()
                    try:
                        await lot.park()
                    finally:
                        self._writer_idle = False
                    continue
                if batch_sender is None or len(frame) > small_frame:
                    await send(frame)
                    continue
                batch = [frame]
                size = len(frame)
                while size < batch_bytes and self._writer_has_small_next(small_frame):
                    frame = self._next_frame()
                    assert frame is not None
                    batch.append(frame)
                    size += len(frame)
                if len(batch) == 1:
                    await send(batch[0])
                else:
                    await batch_sender.send(batch)
        except ConnectionClosed:
            # The reader sees the same closure and ends the session; no new
            # writer is started (_writer_running stays set).
            self._wake_senders()

    def _writer_has_small_next(self, limit: int) -> bool:
        """Is the frame :meth:`_next_frame` would take next at most ``limit`` bytes?"""
        if self._urgent:
            return len(self._urgent[0]) <= limit
        small, fifo = self._small, self._fifo
        if small and (not fifo or self._small_run < self.limits.small_frame_budget):
            return len(small[0][0]) <= limit
        if fifo:
            item = fifo[0]
            return len(item[0] if type(item) is tuple else item) <= limit
        return False

    async def _keepalive(self) -> None:
        """Client side: ping every ``ping_interval`` and queue SyncConnections
        every ``sync_interval``, in one task (a task costs ~1.5 KiB per
        session).

        One ping at a time: the next is sent once the last was answered and
        ``ping_interval`` has passed since it was sent. A peer that leaves a
        ping unanswered for ``ping_timeout`` ends the session, even while it
        sends data -- so pings a peer never answers cannot pile up (each
        would stay in trio-websocket's ping table for the life of the
        session), and a peer that no longer answers is noticed. Returns when
        the WebSocket is closed; cancelled with the session."""
        limits = self.limits
        ws = self.ws
        now = trio.current_time()
        next_ping = now
        next_sync = now + limits.sync_interval
        for n in itertools.count():
            now = trio.current_time()
            if now >= next_sync:
                next_sync += limits.sync_interval
                self.state.queue_sync()
                self._flush_state()
            if now < next_ping:
                await trio.sleep_until(min(next_ping, next_sync))
                continue
            next_ping = now + limits.ping_interval
            with trio.move_on_after(limits.ping_timeout) as waiting:
                try:
                    await ws.ping(n.to_bytes(8, "big"))
                except ConnectionClosed:
                    return
            if waiting.cancelled_caught:
                self._abort(SessionLostError(
                    f"no pong within {limits.ping_timeout:.0f} s (keepalive timeout)"))
                return

    def _teardown(self) -> None:
        if self._ended:
            return
        self._ended = True
        reason = self.end_reason
        text = str(reason) if reason is not None else "session closed"
        self.state.close_all()
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream._fail(SessionLostError(f"session lost: {text}"), drop_buffer=False)
        self._urgent = self._fifo = self._small = _NO_QUEUE
        self._direct = None
        self._direct_pending = False
        self._fifo_data_bytes = 0
        self._small_bytes = 0
        self._fifo_control = 0
        self._wake_senders()
        if self._writer_lot is not None:
            self._writer_lot.unpark_all()
        if self._dial_lot is not None:
            self._dial_lot.unpark_all()
        if self.on_end is not None:
            on_end, self.on_end = self.on_end, None
            on_end(self)
