"""The server: accepts agents' WebSockets and dials through them."""

from __future__ import annotations

import base64
import binascii
import hmac
import inspect
import logging
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import cast

import trio
from trio_websocket import WebSocketRequest, wrap_server_stream

from ._errors import NoSuchClientError, exception_leaves
from ._limits import DEFAULT_LIMITS, Limits
from ._session import (
    EXTENSION_HEADER,
    EXTENSION_VERSION,
    ActivityStream,
    Session,
    negotiate_extensions,
    release_handshake_state,
    tune_transport,
)
from ._state import Role
from ._stats import DialStats, SessionCounters
from ._stream import TunnelStream

__all__ = [
    "Authorizer",
    "HandshakeRequest",
    "Server",
    "ServerCounters",
    "ServerStatistics",
    "open_server",
    "token_authorizer",
]

log = logging.getLogger("revdial")


@dataclass(frozen=True, slots=True)
class HandshakeRequest:
    """What an authorizer sees of an agent's WebSocket upgrade request."""

    path: str
    #: Header names lower-cased; repeated headers joined with ", ".
    headers: Mapping[str, str]
    #: ``host:port`` of the peer, for logs.
    remote: str


#: ``authorize(request) -> client key`` (or None to refuse with 401). It may be
#: a coroutine function. Raising ``ValueError`` answers 400 with its text.
Authorizer = Callable[[HandshakeRequest], "str | Awaitable[str | None] | None"]


def token_authorizer(
    *, tokens: Mapping[str, str] | None = None, token: str | None = None
) -> Authorizer:
    """Authorize agents by ``X-Tunnel-ID: KEY`` plus ``Authorization: Bearer TOKEN``.

    ``tokens`` maps each client key to its token; ``token`` is accepted for
    any key. This is the header pair a Go remotedialer example client sends.
    Tokens are compared in constant time and never logged.
    """
    if not tokens and not token:
        raise ValueError("token_authorizer needs tokens or token")
    table = {k: v.encode() for k, v in (tokens or {}).items()}
    shared = token.encode() if token else None

    def authorize(request: HandshakeRequest) -> str | None:
        key = request.headers.get("x-tunnel-id", "").strip()
        auth = request.headers.get("authorization", "")
        scheme, _, presented = auth.partition(" ")
        if not key or scheme.lower() != "bearer":
            return None
        given = presented.strip().encode()
        ok = False
        expected = table.get(key)
        if expected is not None:
            ok = hmac.compare_digest(given, expected)
        if shared is not None:
            ok = hmac.compare_digest(given, shared) or ok
        return key if ok else None

    return authorize


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    sessions: int
    clients: int
    streams: int
    buffered_bytes: int


@dataclass(frozen=True, slots=True)
class ServerCounters:
    """Cumulative figures of a server since it was created (never go down)."""

    #: Agent sessions accepted (handshake completed).
    sessions_accepted: int
    #: WebSocket upgrades answered with an error, by HTTP status (400, 401, 404, 503).
    handshakes_rejected: Mapping[int, int]
    #: Bytes, pauses and resets of every session, ended ones included.
    sessions: SessionCounters


class Server:
    """Accepts agent sessions at ``path`` and dials connections through them.

    Use :func:`open_server`, or ``await nursery.start(server.serve, host, port)``.
    """

    def __init__(
        self,
        authorize: Authorizer,
        *,
        limits: Limits = DEFAULT_LIMITS,
        path: str = "/connect",
        ssl_context: ssl.SSLContext | None = None,
        extensions: bool = True,
    ) -> None:
        self._authorize = authorize
        self._extension_version = EXTENSION_VERSION if extensions else 0
        self.limits = limits
        self.path = path
        self._ssl_context = ssl_context
        self._sessions: dict[str, list[Session]] = {}
        self._changed = trio.Event()
        self._listening = False
        #: Outcomes and latency of every dial through this server's sessions.
        self.dial_stats = DialStats()
        self._sessions_accepted = 0
        self._rejected: dict[int, int] = {}
        self._ended_counters = SessionCounters()
        #: Opening handshakes in progress at once (``Limits.max_concurrent_handshakes``);
        #: connections beyond it wait, unread, within their ``handshake_timeout``.
        self._handshakes = trio.CapacityLimiter(limits.max_concurrent_handshakes)
        #: Authorized handshakes not yet registered, by client key: they count
        #: against ``max_sessions`` and ``max_sessions_per_client`` already,
        #: so concurrent upgrades cannot overshoot either.
        self._reserved: dict[str, int] = {}
        #: Bound ``(host, port)`` pairs once :meth:`serve` has started.
        self.addresses: list[tuple[str, int]] = []

    # --- public -----------------------------------------------------------

    @property
    def port(self) -> int:
        """The port of the first listener (useful after binding port 0)."""
        if not self.addresses:
            raise RuntimeError("server is not listening yet")
        return self.addresses[0][1]

    @property
    def listening(self) -> bool:
        """True while :meth:`serve` is accepting agents (``/readyz`` is 200)."""
        return self._listening

    def clients(self) -> list[str]:
        """Client keys that have at least one session, in connection order."""
        return list(self._sessions)

    def sessions(self, client_key: str) -> list[Session]:
        return list(self._sessions.get(client_key, ()))

    def statistics(self) -> ServerStatistics:
        sessions = [s for group in self._sessions.values() for s in group]
        stats = [s.statistics() for s in sessions]
        return ServerStatistics(
            sessions=len(sessions),
            clients=len(self._sessions),
            streams=sum(s.streams for s in stats),
            buffered_bytes=sum(s.buffered_bytes for s in stats),
        )

    def counters(self) -> ServerCounters:
        """Cumulative figures: ended sessions' counters plus the live ones'."""
        total = self._ended_counters
        for group in self._sessions.values():
            for session in group:
                total = total + session.counters()
        return ServerCounters(
            sessions_accepted=self._sessions_accepted,
            handshakes_rejected=dict(self._rejected),
            sessions=total,
        )

    async def wait_client(self, client_key: str) -> None:
        """Wait until ``client_key`` has a session (returns at once if it has)."""
        while client_key not in self._sessions:
            await self._changed.wait()
        await trio.lowlevel.checkpoint()

    async def dial(
        self,
        client_key: str,
        proto: str,
        address: str,
        *,
        connect_timeout: float | None = None,
        wait: bool = True,
    ) -> TunnelStream:
        """Open a connection to ``proto``/``address`` through ``client_key``'s agent.

        Uses the client's oldest session; raises :class:`NoSuchClientError` at
        once when the client has none.

        With a revdial agent (extension v1) this returns only once the agent's
        own connect succeeded, and otherwise raises the typed
        :class:`~revdial.DialError`: :class:`~revdial.DialRefusedError`,
        :class:`~revdial.DialConnectionRefusedError`,
        :class:`~revdial.DialUnreachableError`,
        :class:`~revdial.DialTimeoutError` or
        :class:`~revdial.DialSessionLostError`. With a plain remotedialer agent
        (Go) the stream is returned at once, and a failure surfaces from its
        first receive or send; there ``connect_timeout`` bounds the wait for
        the first byte or error instead.

        ``wait=False`` returns as soon as the Connect is queued, with any
        agent: bytes you send follow the Connect at once, which saves a round
        trip per connection (``revdial server --forward`` dials this way). A
        failed dial then surfaces from the stream's first receive (or a later
        send) as the same typed :class:`~revdial.DialError`, and
        ``connect_timeout`` bounds the wait for the agent's confirmation or
        first byte. Bytes sent to a target that could not be dialled are
        dropped by the agent.

        ``connect_timeout`` defaults to ``Limits.connect_timeout``; 0 disables it.
        Cancellation leaves no entry in the session's tables.
        """
        # session.dial() is the schedule point; one per dial is enough.
        await trio.lowlevel.checkpoint_if_cancelled()
        timeout = self.limits.connect_timeout if connect_timeout is None else connect_timeout
        for session in self._sessions.get(client_key, ()):
            if session.is_open:
                stream = session.open_stream(proto, address)
                break
        else:  # no break: no live session
            await trio.lowlevel.checkpoint()
            self.dial_stats.record("no_client", None)
            raise NoSuchClientError(
                f"no session for client {client_key!r}",
                reason="no such client",
                client_key=client_key,
                target=f"{proto}/{address}",
            )
        return await session.dial(stream, timeout, wait=wait)

    async def serve(
        self,
        host: str | None,
        port: int,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` and serve agents until cancelled.

        :attr:`listening` is True from when the bound addresses are reported
        until this returns (on cancellation it turns False first). Raises
        ``OSError`` if it cannot listen.
        """
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.addresses = bound_addresses(listeners)
        log.info("listening on %s", ", ".join(_fmt(h, p) for h, p in self.addresses))
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle_connection, listeners)
                self._listening = True
                task_status.started(self.addresses)
        finally:
            self._listening = False

    # --- internals --------------------------------------------------------

    async def _handle_connection(self, tcp: trio.SocketStream) -> None:
        try:
            peer = _fmt(*tcp.socket.getpeername()[:2])
        except OSError:
            peer = "?"
        tune_transport(tcp, self.limits)
        await self._serve_stream(tcp, peer)

    async def _serve_stream(self, stream: trio.abc.Stream, peer: str) -> None:
        """Handshake on ``stream`` (TLS first, if configured), then serve the
        session until it ends; closes ``stream`` in every case. Errors are
        logged, never raised; cancellation closes the stream forcefully."""
        if self._ssl_context is not None:
            stream = trio.SSLStream(stream, self._ssl_context, server_side=True)
        transport = ActivityStream(stream)
        try:
            async with trio.open_nursery() as nursery:
                await self._handshake_and_serve(nursery, transport, peer)
                nursery.cancel_scope.cancel()
        except Exception as exc:
            # One bad connection must never take the server down.
            leaves = exception_leaves(exc)
            benign = (trio.BrokenResourceError, trio.ClosedResourceError)
            if all(isinstance(e, benign) for e in leaves):
                log.info("connection from %s failed: %s", peer, leaves[0])
            else:
                log.exception("connection from %s: unexpected error", peer)
        finally:
            await trio.aclose_forcefully(transport)

    async def _handshake_and_serve(
        self, nursery: trio.Nursery, transport: ActivityStream, peer: str
    ) -> None:
        # The handshake's objects (the request, its headers) live in
        # _open_session's frame only, not for the whole session.
        reserved: list[str] = []  # the client key holding a place while upgrading
        try:
            session = await self._open_session(nursery, transport, peer, reserved)
        finally:
            for key in reserved:
                self._release(key)
        if session is None:
            return
        client_key = session.client_key
        self._register(session)  # no checkpoint since _release: the counts stay exact
        fields = {"session_id": session.id, "client_key": client_key, "remote": peer}
        log.info(
            "session %s: client %r connected from %s (%s)",
            session.id,
            client_key,
            peer,
            f"revdial extension v{session.extensions}" if session.extensions
            else "plain remotedialer",
            extra={**fields, "event": "session_start", "extension": session.extensions},
        )
        try:
            await session.run()
        finally:
            self._unregister(session)
            duration = trio.current_time() - session.started_at
            c = session.counters()
            log.info(
                "session %s: client %r from %s disconnected after %.1f s "
                "(%d bytes in, %d bytes out): %s",
                session.id,
                client_key,
                peer,
                duration,
                c.bytes_received,
                c.bytes_sent,
                session.end_reason or "closed",
                extra={
                    **fields,
                    "event": "session_end",
                    "duration_s": round(duration, 3),
                    "bytes_in": c.bytes_received,
                    "bytes_out": c.bytes_sent,
                    "reason": str(session.end_reason or "closed"),
                },
            )

    async def _open_session(
        self, nursery: trio.Nursery, transport: ActivityStream, peer: str, reserved: list[str]
    ) -> Session | None:
        """The WebSocket handshake, authorization and 101: a Session, or None
        once the request was refused or timed out (logged).

        At most ``max_concurrent_handshakes`` run at once; a connection beyond
        that waits for a slot without being read, and ``handshake_timeout``
        bounds its wait and handshake together: a returning fleet queues
        instead of being refused, and cannot starve the sessions already up.
        """
        limits = self.limits
        slots = self._handshakes
        got_slot = False
        with trio.move_on_after(limits.handshake_timeout):
            async with slots:
                got_slot = True
                return await self._upgrade(nursery, transport, peer, reserved)
        if got_slot:
            log.info("connection from %s: no WebSocket handshake within %.0f s", peer,
                     limits.handshake_timeout)
        else:
            log.warning(
                "connection from %s: closed after waiting %.0f s for a handshake slot "
                "(%d handshakes in progress, %d connections waiting)",
                peer, limits.handshake_timeout, slots.borrowed_tokens,
                slots.statistics().tasks_waiting,
            )
        return None

    async def _upgrade(
        self, nursery: trio.Nursery, transport: ActivityStream, peer: str, reserved: list[str]
    ) -> Session | None:
        limits = self.limits
        request = await wrap_server_stream(
            nursery,
            transport,
            max_message_size=limits.max_message_size,
            receive_buffer_size=limits.read_size,
        )
        client_key = await self._check_request(request, peer)
        if client_key is None:
            return None
        reserved.append(client_key)  # the caller releases it
        self._reserved[client_key] = self._reserved.get(client_key, 0) + 1
        offer = next(
            (v.decode("latin-1") for k, v in request.headers
             if k.decode("latin-1").lower() == EXTENSION_HEADER.lower()),
            None,
        )
        version = negotiate_extensions(offer, self._extension_version)
        answer = [(EXTENSION_HEADER.encode(), str(version).encode())] if version else []
        ws = await request.accept(extra_headers=answer)
        release_handshake_state(ws)
        return Session(
            ws,
            transport,
            Role.SERVER,
            client_key=client_key,
            limits=limits,
            session_key=random.getrandbits(63),
            extensions=version,
            remote=peer,
            dial_stats=self.dial_stats,
        )

    async def _check_request(self, request: WebSocketRequest, peer: str) -> str | None:
        path = request.path.partition("?")[0]
        if path != self.path:
            log.info("connection from %s: unknown path %s -> 404", peer, path[:100])
            self._count_rejection(404)
            await request.reject(404, body=b"not found\n")
            return None
        headers: dict[str, str] = {}
        for name, value in request.headers:
            k = name.decode("latin-1").lower()
            v = value.decode("latin-1")
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        if not _valid_websocket_key(headers.get("sec-websocket-key", "")):
            # RFC 6455 4.2.1: base64 of 16 bytes; wsproto does not check it.
            log.info("connection from %s: bad Sec-WebSocket-Key -> 400", peer)
            self._count_rejection(400)
            await request.reject(400, body=b"bad Sec-WebSocket-Key\n")
            return None
        hreq = HandshakeRequest(path=request.path, headers=headers, remote=peer)
        try:
            result = self._authorize(hreq)
            key = await result if inspect.isawaitable(result) else result
        except ValueError as exc:
            log.info("connection from %s: bad handshake: %s -> 400", peer, exc)
            self._count_rejection(400)
            await request.reject(400, body=f"{exc}\n".encode())
            return None
        if not key:
            log.info("connection from %s: authentication failed -> 401", peer)
            self._count_rejection(401)
            await request.reject(401, body=b"failed authentication\n")
            return None
        key = str(key)
        total = sum(len(g) for g in self._sessions.values()) + sum(self._reserved.values())
        if total >= self.limits.max_sessions:
            log.warning("connection from %s: session limit reached -> 503", peer)
            self._count_rejection(503)
            await request.reject(503, body=b"too many sessions\n")
            return None
        mine = len(self._sessions.get(key, ())) + self._reserved.get(key, 0)
        if mine >= self.limits.max_sessions_per_client:
            log.warning("connection from %s: client %r already has %d sessions "
                        "(max_sessions_per_client) -> 503", peer, key, mine)
            self._count_rejection(503)
            await request.reject(503, body=b"too many sessions for this client key\n")
            return None
        return key

    def _release(self, client_key: str) -> None:
        left = self._reserved[client_key] - 1
        if left:
            self._reserved[client_key] = left
        else:
            del self._reserved[client_key]

    def _count_rejection(self, status: int) -> None:
        self._rejected[status] = self._rejected.get(status, 0) + 1

    def _register(self, session: Session) -> None:
        self._sessions_accepted += 1
        self._sessions.setdefault(session.client_key, []).append(session)
        self._changed.set()
        self._changed = trio.Event()

    def _unregister(self, session: Session) -> None:
        group = self._sessions.get(session.client_key)
        if group is not None and session in group:
            group.remove(session)
            self._ended_counters = self._ended_counters + session.counters()
            if not group:
                del self._sessions[session.client_key]
        self._changed.set()
        self._changed = trio.Event()


def _valid_websocket_key(key: str) -> bool:
    """RFC 6455 4.2.1: ``Sec-WebSocket-Key`` is the base64 of 16 bytes."""
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except (ValueError, binascii.Error):
        return False


def bound_addresses(listeners: list[trio.SocketListener]) -> list[tuple[str, int]]:
    """``(host, port)`` each listener is bound to (after binding port 0)."""
    return [cast("tuple[str, int]", tuple(lst.socket.getsockname()[:2])) for lst in listeners]


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@asynccontextmanager
async def open_server(
    authorize: Authorizer,
    host: str | None = "127.0.0.1",
    port: int = 0,
    *,
    limits: Limits = DEFAULT_LIMITS,
    path: str = "/connect",
    ssl_context: ssl.SSLContext | None = None,
    extensions: bool = True,
) -> AsyncIterator[Server]:
    """Run a :class:`Server` for the duration of the ``async with`` block.

    On exit every session is closed and every stream fails with
    :class:`~revdial.SessionLostError`.
    """
    server = Server(
        authorize, limits=limits, path=path, ssl_context=ssl_context, extensions=extensions
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, host, port)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
