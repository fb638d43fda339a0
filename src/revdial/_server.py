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
from typing import Any, cast

import trio
from trio_websocket import WebSocketRequest

from ._errors import NoSuchClientError, exception_leaves
from ._handshake import ReplayStream, SlotGate, read_request_head
from ._limits import DEFAULT_LIMITS, Limits
from ._peers import PEER_ID_HEADER, PEER_TOKEN_HEADER, SELF_PEER_STATUS, PeerLink
from ._peerstate import DEFAULT_MAX_ANNOUNCED, AnnouncedClients, peer_network, valid_peer_id
from ._session import (
    EXTENSION_HEADER,
    EXTENSION_VERSION,
    ActivityStream,
    Session,
    negotiate_extensions,
    release_handshake_state,
    tune_transport,
)
from ._state import ClientAnnounced, Role
from ._stats import DialStats, SessionCounters
from ._stream import TunnelStream
from ._watch import KeepaliveWatch
from ._wsconn import inbox_supported, open_server_websocket

__all__ = [
    "Authorizer",
    "HandshakeRequest",
    "PeerStatistics",
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
class PeerStatistics:
    """Peering figures of a server, now."""

    #: Peers registered (``--peer`` and discovered), this server's own excluded.
    configured: int
    #: Outbound links up (this server -> peer).
    links_up: int
    #: Incoming peer sessions (peer -> this server).
    sessions_in: int
    #: Announced (clientKey, sessionKey) pairs held for the incoming peer sessions.
    announced: int
    #: AddClient announcements dropped because a peer exceeded the bound (cumulative).
    announcements_dropped: int


@dataclass(frozen=True, slots=True)
class ServerCounters:
    """Cumulative figures of a server since it was created (never go down)."""

    #: Agent sessions accepted (handshake completed).
    sessions_accepted: int
    #: WebSocket upgrades answered with an error, by HTTP status (400, 401, 404, 409, 503).
    handshakes_rejected: Mapping[int, int]
    #: Bytes, pauses and resets of every session, ended ones included.
    sessions: SessionCounters


class Server:
    """Accepts agent sessions at ``path`` and dials connections through them.

    Use :func:`open_server`, or ``await nursery.start(server.serve, host, port)``.

    Peering (remotedialer's HA, ``docs/PEERING.md``): with ``peer_id`` and
    ``peer_token`` the server accepts other replicas presenting that token in
    ``X-API-Tunnel-Token`` (a wrong one gets 401), keeps an outbound link to
    every peer given to :meth:`add_peer` (run in :meth:`serve`'s nursery),
    announces its agent sessions on those links, and :meth:`dial` reaches a
    client held by a peer. ``max_announced`` bounds what one peer session may
    announce, ``max_peer_sessions`` the incoming peer sessions;
    ``peer_ssl_context`` verifies ``wss://`` peers (default: not verified, as
    remotedialer).
    """

    def __init__(
        self,
        authorize: Authorizer,
        *,
        limits: Limits = DEFAULT_LIMITS,
        path: str = "/connect",
        ssl_context: ssl.SSLContext | None = None,
        extensions: bool = True,
        peer_id: str | None = None,
        peer_token: str | None = None,
        peer_ssl_context: ssl.SSLContext | None = None,
        max_announced: int = DEFAULT_MAX_ANNOUNCED,
        max_peer_sessions: int = 256,
    ) -> None:
        if bool(peer_id) != bool(peer_token):
            raise ValueError("peering needs both peer_id and peer_token")
        if peer_id is not None and not valid_peer_id(peer_id):
            raise ValueError("peer_id must be 1-80 printable bytes without '/' or '::'")
        self._authorize = authorize
        #: This server's peer id (None: peering is off).
        self.peer_id = peer_id or None
        self._peer_token = peer_token.encode() if peer_token else None
        self._peer_token_text = peer_token or ""
        self._peer_ssl_context = peer_ssl_context
        self.max_announced = max_announced
        self.max_peer_sessions = max_peer_sessions
        #: Incoming peer sessions, in connection order, with what each announced.
        self._peer_in: dict[Session, AnnouncedClients] = {}
        self._announcements_dropped = 0
        #: Outbound links, by peer id.
        self._links: dict[str, PeerLink] = {}
        self._nursery: trio.Nursery | None = None
        self._extension_version = EXTENSION_VERSION if extensions else 0
        self.limits = limits
        self.path = path
        self._ssl_context = ssl_context
        self._sessions: dict[str, list[Session]] = {}
        #: Holds the keepalive deadlines of this server's sessions while it serves.
        self._keepalive = KeepaliveWatch()
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

    def has_client(self, client_key: str) -> bool:
        """True if ``client_key`` is reachable: directly, or through a peer that announced it."""
        return client_key in self._sessions or self._peer_route(client_key) is not None

    def peer_clients(self) -> dict[str, list[str]]:
        """Client keys each connected peer announced, by peer id (sorted)."""
        out: dict[str, set[str]] = {}
        for session, table in self._peer_in.items():
            if session.is_open:
                out.setdefault(session.client_key, set()).update(table.clients)
        return {peer: sorted(keys) for peer, keys in out.items()}

    def add_peer(self, peer_id: str, url: str) -> None:
        """Peer with the server at ``url`` (``ws://`` or ``wss://``, its agent path).

        Starts an outbound link that announces this server's agents to it
        and serves its forwarded dials. Re-adding the same URL is a no-op; a
        changed URL restarts the link. Needs ``peer_id`` and ``peer_token``.
        Raises ValueError for a bad id or URL.
        """
        if self.peer_id is None:
            raise ValueError("peering is off: give the server a peer_id and peer_token")
        if not valid_peer_id(peer_id):
            raise ValueError(f"peer id {peer_id[:100]!r}: 1-80 printable bytes without '/' or '::'")
        old = self._links.get(peer_id)
        if old is not None:
            if old.url == url:
                return
            self.remove_peer(peer_id)
        ssl_context = self._peer_ssl_context
        if ssl_context is None and url.startswith("wss:"):
            # As remotedialer: peers are dialled by pod address, which no
            # certificate names. Pass peer_ssl_context to verify them.
            ssl_context = ssl.create_default_context()
            ssl_context.check_hostname = False
            ssl_context.verify_mode = ssl.CERT_NONE
        link = PeerLink(self, peer_id, url, token=self._peer_token_text, ssl_context=ssl_context)
        self._links[peer_id] = link
        log.info("peer %r added at %s", peer_id, link.agent._log_url)
        if self._nursery is not None:
            self._nursery.start_soon(link.run)

    def remove_peer(self, peer_id: str) -> None:
        """Stop the link to ``peer_id`` (no-op if unknown). Its incoming session,
        if any, ends on its own when that peer stops (or goes away)."""
        link = self._links.pop(peer_id, None)
        if link is not None:
            link.cancel_scope.cancel()
            log.info("peer %r removed", peer_id)

    def peers(self) -> dict[str, str]:
        """Registered peers: id -> URL."""
        return {peer_id: link.url for peer_id, link in self._links.items()}

    def peer_statistics(self) -> PeerStatistics:
        open_in = [(s, t) for s, t in self._peer_in.items() if s.is_open]
        links = [link for link in self._links.values() if not link.is_self]
        return PeerStatistics(
            configured=len(links),
            links_up=sum(1 for link in links if link.session is not None),
            sessions_in=len(open_in),
            announced=sum(t.pairs for _, t in open_in),
            announcements_dropped=self._announcements_dropped
            + sum(t.dropped for t in self._peer_in.values()),
        )
    def sessions(self, client_key: str) -> list[Session]:
        return list(self._sessions.get(client_key, ()))

    def statistics(self) -> ServerStatistics:
        """Agent sessions and clients now; streams and buffered bytes of every
        session, peer links (both directions) included."""
        sessions = [s for group in self._sessions.values() for s in group]
        carriers = sessions + [s for s in self._peer_in if s.is_open] + [
            link.session for link in self._links.values() if link.session is not None
        ]
        stats = [s.statistics() for s in carriers]
        return ServerStatistics(
            sessions=len(sessions),
            clients=len(self._sessions),
            streams=sum(s.streams for s in stats),
            buffered_bytes=sum(s.buffered_bytes for s in stats),
        )

    def counters(self) -> ServerCounters:
        """Cumulative figures: ended sessions' counters plus the live ones'."""
        total = self._ended_counters
        for group in [*self._sessions.values(), self._peer_in]:
            for session in group:
                total = total + session.counters()
        return ServerCounters(
            sessions_accepted=self._sessions_accepted,
            handshakes_rejected=dict(self._rejected),
            sessions=total,
        )

    async def wait_client(self, client_key: str) -> None:
        """Wait until ``client_key`` is reachable: a session here or announced by
        a peer (returns at once if it is)."""
        while not self.has_client(client_key):
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
        local_only: bool = False,
    ) -> TunnelStream:
        """Open a connection to ``proto``/``address`` through ``client_key``'s agent.

        Uses the client's oldest session on this server; if it has none,
        a peer server that announced the client (the dial is forwarded as
        ``Connect "K::proto/address"`` and the peer's errors come back as the
        same typed DialErrors); raises :class:`NoSuchClientError` at once
        when neither has it. ``local_only`` never forwards to a peer.

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
                stream = await session.open_dial(proto, address, timeout)
                break
        else:  # no break: no live session of our own
            peer = None if local_only else self._peer_route(client_key)
            if peer is not None:
                stream = await peer.open_dial(peer_network(client_key, proto), address, timeout)
                return await peer.dial(stream, timeout, wait=wait)
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
                await nursery.start(self._keepalive.run)
                await nursery.start(trio.serve_listeners, self._handle_connection, listeners)
                self._listening = True
                # Peer links run here, owned by the server (cancelled with it).
                self._nursery = nursery
                for link in self._links.values():
                    nursery.start_soon(link.run)
                task_status.started(self.addresses)
        finally:
            self._nursery = None
            self._listening = False

    # --- internals --------------------------------------------------------

    def _handle_connection(self, tcp: trio.SocketStream) -> Awaitable[None]:
        # Not a coroutine itself: the connection's task runs _serve_stream
        # directly (a coroutine frame less per idle session).
        try:
            peer = _fmt(*tcp.socket.getpeername()[:2])
        except OSError:
            peer = "?"
        tune_transport(tcp, self.limits)
        return self._serve_stream(tcp, peer)

    async def _serve_stream(self, stream: trio.abc.Stream, peer: str) -> None:
        """Handshake on ``stream`` (TLS first, if configured), then serve the
        session until it ends; closes ``stream`` in every case. Errors are
        logged, never raised; cancellation closes the stream forcefully."""
        gate: SlotGate | None = None
        if self._ssl_context is not None:
            gate = SlotGate(stream, self._handshakes)
            stream = trio.SSLStream(gate, self._ssl_context, server_side=True)
        transport = ActivityStream(stream)
        try:
            # The handshake's objects (the request, its headers) live in
            # _start_session's frame only, not for the whole session.
            shared = self._nursery if inbox_supported() else None
            if shared is not None:
                # While serving, trio-websocket's reader runs in the server's
                # nursery (no nursery per connection); closing the transport
                # below ends it.
                session = await self._start_session(shared, transport, peer, gate)
                if session is not None:
                    try:
                        await session.run()
                    finally:
                        self._end_session(session, peer)
            else:
                async with trio.open_nursery() as nursery:
                    session = await self._start_session(nursery, transport, peer, gate)
                    if session is not None:
                        try:
                            await session.run()
                        finally:
                            self._end_session(session, peer)
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

    @staticmethod
    def _session_fields(session: Session, peer: str) -> tuple[str, dict[str, Any]]:
        """"client" or "peer", and the structured log fields of ``session``."""
        is_peer = isinstance(session.on_announce, _PeerRecorder)
        fields: dict[str, Any] = {
            "session_id": session.id, "client_key": session.client_key, "remote": peer
        }
        if is_peer:
            fields["peer"] = True
        return ("peer" if is_peer else "client"), fields

    async def _start_session(
        self, nursery: trio.Nursery, transport: ActivityStream, peer: str,
        gate: SlotGate | None = None,
    ) -> Session | None:
        """Handshake, then register and log the session (None: refused, logged)."""
        reserved: list[str] = []  # the client key holding a place while upgrading
        try:
            session = await self._open_session(nursery, transport, peer, reserved, gate)
        finally:
            for key in reserved:
                self._release(key)
        if session is None:
            return None
        self._register(session)  # no checkpoint since _release: the counts stay exact
        what, fields = self._session_fields(session, peer)
        log.info(
            "session %s: %s %r connected from %s (%s)",
            session.id,
            what,
            session.client_key,
            peer,
            f"revdial extension v{session.extensions}" if session.extensions
            else "plain remotedialer",
            extra={**fields, "event": "session_start", "extension": session.extensions},
        )
        return session

    def _end_session(self, session: Session, peer: str) -> None:
        """Unregister and log a session that ended."""
        self._unregister(session)
        what, fields = self._session_fields(session, peer)
        duration = trio.current_time() - session.started_at
        c = session.counters()
        log.info(
            "session %s: %s %r from %s disconnected after %.1f s "
            "(%d bytes in, %d bytes out): %s",
            session.id,
            what,
            session.client_key,
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
        self, nursery: trio.Nursery, transport: ActivityStream, peer: str, reserved: list[str],
        gate: SlotGate | None = None,
    ) -> Session | None:
        """The WebSocket handshake, authorization and 101: a Session, or None
        once the request was refused or timed out (logged).

        At most ``max_concurrent_handshakes`` work at once, and waiting for
        the peer's bytes holds no slot (:mod:`revdial._handshake`): with TLS
        (``gate``) the slot is held only while the TLS layer works on bytes
        received; the request head is then read without one; the upgrade
        itself (parsing, authorization, 101) runs holding one. A connection
        beyond the limit waits for a slot, and ``handshake_timeout`` bounds
        all of it together: a returning fleet queues instead of being
        refused, cannot starve the sessions already up, and connections that
        dribble their bytes (slow-loris) delay nobody and are cut at the
        deadline.
        """
        limits = self.limits
        slots = self._handshakes
        phase = "handshake"
        with trio.move_on_after(limits.handshake_timeout):
            if gate is not None:
                tls = transport.inner
                assert isinstance(tls, trio.SSLStream)
                try:
                    await tls.do_handshake()
                finally:
                    gate.open()
            head = await read_request_head(transport, limits.read_size)
            phase = "slot"
            async with slots:
                phase = "handshake"
                return await self._upgrade(nursery, ReplayStream(transport, head), peer,
                                           reserved, transport)
        if phase == "handshake":
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
        self, nursery: trio.Nursery, stream: trio.abc.Stream, peer: str, reserved: list[str],
        transport: ActivityStream,
    ) -> Session | None:
        """The upgrade on ``stream`` (``transport`` with the head read ahead)."""
        limits = self.limits
        request = await open_server_websocket(
            nursery,
            stream,
            max_message_size=limits.max_message_size,
            receive_buffer_size=limits.read_size,
            shared_nursery=nursery is self._nursery,
        )
        checked = await self._check_request(request, peer)
        if checked is None:
            return None
        client_key, is_peer = checked
        if not is_peer:  # agent sessions count against the session limits
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
            on_announce=_PeerRecorder(self, client_key) if is_peer else None,
            watch=self._keepalive if self._keepalive.running else None,
        )

    async def _check_peer(
        self, request: WebSocketRequest, headers: Mapping[str, str], peer: str
    ) -> tuple[str, bool] | None:
        """A request with both peer headers, on a server that peers: a peer
        session, or a refusal (never the agents' authorizer)."""
        assert self._peer_token is not None
        peer_id = headers[PEER_ID_HEADER.lower()].strip()
        given = headers[PEER_TOKEN_HEADER.lower()].strip().encode()
        if not hmac.compare_digest(given, self._peer_token):
            log.warning("connection from %s: peer %r presented a wrong peer token -> 401",
                        peer, peer_id[:100])
            self._count_rejection(401)
            await request.reject(401, body=b"failed authentication\n")
            return None
        if not valid_peer_id(peer_id):
            log.info("connection from %s: invalid peer id -> 400", peer)
            self._count_rejection(400)
            await request.reject(400, body=b"invalid peer id\n")
            return None
        if peer_id == self.peer_id:
            # Our own link (DNS lists this replica too): tell it to stop.
            self._count_rejection(SELF_PEER_STATUS)
            await request.reject(SELF_PEER_STATUS, body=b"that is this server's own peer id\n")
            return None
        if sum(1 for s in self._peer_in if s.is_open) >= self.max_peer_sessions:
            log.warning("connection from %s: peer session limit reached -> 503", peer)
            self._count_rejection(503)
            await request.reject(503, body=b"too many peer sessions\n")
            return None
        return peer_id, True

    async def _check_request(
        self, request: WebSocketRequest, peer: str
    ) -> tuple[str, bool] | None:
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
        if (
            self._peer_token is not None
            and headers.get(PEER_ID_HEADER.lower(), "").strip()
            and headers.get(PEER_TOKEN_HEADER.lower(), "").strip()
        ):
            return await self._check_peer(request, headers, peer)
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
        return key, False

    def _release(self, client_key: str) -> None:
        left = self._reserved[client_key] - 1
        if left:
            self._reserved[client_key] = left
        else:
            del self._reserved[client_key]

    def _count_rejection(self, status: int) -> None:
        self._rejected[status] = self._rejected.get(status, 0) + 1

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _register(self, session: Session) -> None:
        self._sessions_accepted += 1
        if isinstance(session.on_announce, _PeerRecorder):
            self._peer_in[session] = session.on_announce.table
        else:
            self._sessions.setdefault(session.client_key, []).append(session)
            self._announce(session, added=True)
            # Withdrawn from the peers as soon as it ends, not once its
            # WebSocket is closed (up to close_timeout later).
            session.on_end = self._agent_session_ended
        self._notify()

    def _agent_session_ended(self, session: Session) -> None:
        self._announce(session, added=False)
        self._notify()

    def _unregister(self, session: Session) -> None:
        table = self._peer_in.pop(session, None)
        if table is not None:
            # Its announced clients are forgotten at once; dials through it
            # already failed with the session (DialSessionLostError).
            self._announcements_dropped += table.dropped
            table.clear()
            self._ended_counters = self._ended_counters + session.counters()
        group = self._sessions.get(session.client_key)
        if table is None and group is not None and session in group:
            group.remove(session)
            self._ended_counters = self._ended_counters + session.counters()
            if not group:
                del self._sessions[session.client_key]
            if session.on_end is not None:  # it never ran (on_end fires at its end)
                session.on_end = None
                self._announce(session, added=False)
        self._notify()

    def _announce(self, session: Session, *, added: bool) -> None:
        """Tell every connected peer about an agent session that came or went."""
        for link in self._links.values():
            link.announce(session.client_key, session.state.session_key, added=added)

    def _agent_session_keys(self) -> list[tuple[str, int]]:
        """``(clientKey, sessionKey)`` of every agent session held (what a new
        peer link announces first). Only agent sessions: see docs/PEERING.md."""
        return [(key, s.state.session_key) for key, group in self._sessions.items()
                for s in group if s.is_open]

    def _peer_route(self, client_key: str) -> Session | None:
        """The first (oldest) open incoming peer session that announced ``client_key``."""
        for session, table in self._peer_in.items():
            if session.is_open and table.has(client_key):
                return session
        return None


class _PeerRecorder:
    """Records one incoming peer session's AddClient/RemoveClient (bounded)."""

    __slots__ = ("peer_id", "server", "table", "warned")

    def __init__(self, server: Server, peer_id: str) -> None:
        self.server = server
        self.peer_id = peer_id
        self.table = AnnouncedClients(server.max_announced)
        self.warned = False

    def __call__(self, event: ClientAnnounced) -> None:
        table = self.table
        if event.added:
            changed = table.add(event.client_key, event.session_key)
            if table.dropped and not self.warned:
                self.warned = True
                log.warning("peer %r announced more than %d client sessions; further "
                            "announcements are dropped", self.peer_id, table.max_pairs)
        else:
            changed = table.remove(event.client_key, event.session_key)
        if changed:
            self.server._notify()


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
    peer_id: str | None = None,
    peer_token: str | None = None,
    peers: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> AsyncIterator[Server]:
    """Run a :class:`Server` for the duration of the ``async with`` block.

    ``peer_id``/``peer_token`` turn peering on, ``peers`` maps peer ids to
    their URLs (see :meth:`Server.add_peer`); other keyword arguments go to
    :class:`Server`. On exit every session and peer link is closed and every
    stream fails with :class:`~revdial.SessionLostError`.
    """
    server = Server(
        authorize, limits=limits, path=path, ssl_context=ssl_context, extensions=extensions,
        peer_id=peer_id, peer_token=peer_token, **kwargs,
    )
    for pid, url in (peers or {}).items():
        server.add_peer(pid, url)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, host, port)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
