"""Peering between server replicas: outbound peer links, the relay, DNS discovery.

The bookkeeping is sans-I/O (:mod:`revdial._peerstate`); this module is the
trio side. See ``docs/PEERING.md`` for the protocol choices.

* :class:`PeerLink` keeps one outbound WebSocket to one peer up (a
  client-role session, like an agent's, carrying ``X-API-Tunnel-ID`` and
  ``X-API-Tunnel-Token``), announces the server's agent sessions on it, and
  serves the peer's forwarded dials (``Connect "K::proto/address"``) by
  dialling agent ``K`` through this server's own sessions and relaying the
  two streams into each other (:func:`relay`).
* :class:`DnsPeers` re-resolves a name (a Kubernetes headless Service) every
  ``interval`` seconds and adds or removes peers as the answer changes.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from ._agent import Agent
from ._backoff import Backoff
from ._errors import (
    DialError,
    HandshakeError,
    NoSuchClientError,
    RevdialError,
    SessionLostError,
    StreamResetError,
    TunnelError,
)
from ._peerstate import PeerSet, split_peer_network
from ._session import Session
from ._stream import NO_SESSION_PREFIX, TunnelStream

if TYPE_CHECKING:
    from ._server import Server

__all__ = [
    "PEER_ID_HEADER",
    "PEER_TOKEN_HEADER",
    "SELF_PEER_STATUS",
    "DnsPeers",
    "PeerLink",
    "Resolver",
    "relay",
    "system_resolver",
]

log = logging.getLogger("revdial")

PEER_ID_HEADER = "X-API-Tunnel-ID"
PEER_TOKEN_HEADER = "X-API-Tunnel-Token"
#: The status a server answers a peer link that reached the server itself
#: (its own peer id); the link then stops for good.
SELF_PEER_STATUS = 409
#: Peer links reconnect with the agent's backoff, capped lower: Go waits a
#: fixed 5 s, and a replica that restarts should get its links back quickly.
PEER_BACKOFF_MAX = 5.0
#: The Error text a Go server sends for a dial to a client it does not have.
NO_SESSION_TEXT = NO_SESSION_PREFIX


def _error_text(exc: BaseException) -> str:
    """The Error text to pass on to the other leg of a relay (hop by hop)."""
    if isinstance(exc, NoSuchClientError):
        return f"{NO_SESSION_TEXT} {exc.client_key}"
    if isinstance(exc, DialError | StreamResetError) and exc.reason:
        return exc.reason
    if isinstance(exc, SessionLostError):
        return "tunnel disconnect"
    return (str(exc) or type(exc).__name__)[:100]


async def relay(a: TunnelStream, b: TunnelStream, *, read_size: int) -> None:
    """Pipe two tunnel streams into each other until both directions end.

    A failure of one leg closes the other with that leg's error text, so a
    dial error or reset travels hop by hop (as Go's peers pass Error texts
    on). Half-close passes through when both sessions speak the revdial
    extension; otherwise the first EOF closes both, as in remotedialer.
    Cancellation closes both with ``tunnel disconnect``. Never raises a
    TunnelError.
    """
    half = a.supports_half_close and b.supports_half_close

    async def pump(src: TunnelStream, dst: TunnelStream, nursery: trio.Nursery) -> None:
        try:
            while data := await src.receive_some(read_size):
                await dst.send_all(data)
        except (TunnelError, trio.BrokenResourceError, trio.ClosedResourceError):
            failed = src.error or dst.error
            if failed is None:  # one side closed in order
                src.close_nowait()
                dst.close_nowait()
            elif src.error is not None:
                dst.close_nowait(_error_text(failed))
            else:
                src.close_nowait(_error_text(failed))
            nursery.cancel_scope.cancel()
            return
        if half and not src.peer_closed:
            try:
                await dst.send_eof()
            except (TunnelError, trio.BrokenResourceError, trio.ClosedResourceError):
                nursery.cancel_scope.cancel()
            return
        dst.close_nowait()
        src.close_nowait()
        nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, b, a, nursery)
            await pump(a, b, nursery)
    finally:
        # Orderly ends closed both already (no-ops then); cancellation aborts.
        a.close_nowait("tunnel disconnect")
        b.close_nowait("tunnel disconnect")


class PeerLink:
    """The outbound WebSocket from ``server`` to one peer, kept up forever.

    Runs in the server's nursery (``Server.add_peer``); cancel
    :attr:`cancel_scope` to stop it (``Server.remove_peer``). Each session
    announces every agent session the server holds (AddClient), then each
    later add and remove (the server calls :meth:`announce`). A peer that
    turns out to be this server itself (it answers 409) stops the link.
    """

    def __init__(
        self,
        server: Server,
        peer_id: str,
        url: str,
        *,
        token: str,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.server = server
        self.peer_id = peer_id
        self.url = url
        assert server.peer_id is not None
        self.agent = Agent(
            url,
            headers={PEER_ID_HEADER: server.peer_id, PEER_TOKEN_HEADER: token},
            ssl_context=ssl_context,
            limits=server.limits,
            backoff_max=PEER_BACKOFF_MAX,
        )
        self.agent._on_connect = self._handle_connect
        self.agent._session_hook = self._session_up
        self.cancel_scope = trio.CancelScope()
        #: True once the peer answered that it is this server (link stopped).
        self.is_self = False

    @property
    def session(self) -> Session | None:
        """The live session to the peer, if any."""
        session = self.agent.session
        return session if session is not None and session.is_open else None

    def announce(self, client_key: str, session_key: int, *, added: bool) -> None:
        session = self.session
        if session is not None:
            session.announce(client_key, session_key, added=added)

    def _session_up(self, session: Session) -> None:
        # Synchronous with the session becoming visible: no add or remove on
        # the server can fall between this snapshot and later announcements.
        for key, session_key in self.server._agent_session_keys():
            session.announce(key, session_key, added=True)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the link up until cancelled (or the peer is this server)."""
        task_status.started()
        with self.cancel_scope:
            await self._loop()

    async def _loop(self) -> None:
        backoff = Backoff(random.random, 0.25, PEER_BACKOFF_MAX)
        log_url = self.agent._log_url
        while True:
            up_since: float | None = None

            def on_up() -> None:
                nonlocal up_since
                up_since = trio.current_time()
                log.info("peer %r: link to %s up", self.peer_id, log_url,
                         extra={"event": "peer_up", "peer": self.peer_id})

            try:
                await self.agent._run_session(on_up)
                log.info("peer %r: link to %s ended", self.peer_id, log_url,
                         extra={"event": "peer_down", "peer": self.peer_id})
            except HandshakeError as exc:
                if exc.status == SELF_PEER_STATUS:
                    self.is_self = True
                    log.info("peer %r at %s is this server itself: not peering with it",
                             self.peer_id, log_url)
                    return
                log.warning("peer %r: link to %s failed: %s", self.peer_id, log_url, exc)
            except (RevdialError, OSError, trio.BrokenResourceError) as exc:
                log.warning("peer %r: link to %s failed: %s", self.peer_id, log_url, exc)
            lasted = None if up_since is None else trio.current_time() - up_since
            await trio.sleep(backoff.session_ended(lasted))

    async def _handle_connect(self, stream: TunnelStream, network: str, address: str) -> None:
        """A peer's forwarded dial: ``network`` is ``K::proto``. Dial agent K
        through this server's own sessions (never through another peer: every
        server announces only the agents it holds), then relay."""
        try:
            client_key, proto = split_peer_network(network)
        except ValueError as exc:
            stream.close_nowait(str(exc))
            return
        inner: TunnelStream | None = None
        async with trio.open_nursery() as nursery:

            async def give_up_with_the_peer() -> None:
                # The peer closed its stream (its caller gave up, or it went
                # away): stop waiting for our agent; the cancelled dial closes
                # its stream, so nothing is left in either table.
                await stream.wait_peer_closed()
                nursery.cancel_scope.cancel()

            nursery.start_soon(give_up_with_the_peer)
            try:
                inner = await self.server.dial(client_key, proto, address, local_only=True)
            except (TunnelError, trio.ClosedResourceError) as exc:
                log.info("peer %r: forwarded dial to %s/%s via %r failed: %s",
                         self.peer_id, proto, address, client_key, exc)
                stream.close_nowait(_error_text(exc))
            nursery.cancel_scope.cancel()
        if inner is None:
            return
        if stream.peer_closed:  # the peer gave up just as the dial succeeded
            inner.close_nowait()
            return
        stream.session.dial_succeeded(stream)
        await relay(stream, inner, read_size=self.server.limits.read_size)


#: ``resolve(name, port) -> host addresses``; raises OSError when it cannot.
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(name: str, port: int) -> list[str]:
    """The addresses ``name`` resolves to (A and AAAA), via ``getaddrinfo``.

    A name that does not exist (a headless Service without endpoints answers
    NXDOMAIN) resolves to no address; other failures raise OSError.
    """
    try:
        infos = await trio.socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return []
        raise
    return sorted({str(info[4][0]) for info in infos})


class DnsPeers:
    """Discover peers by re-resolving ``name`` every ``interval`` seconds.

    Each address ``A`` in the answer becomes peer ``A:port`` at
    ``{scheme}://A:port{path}``; addresses that leave the answer are removed
    (their links stop, their announced clients are forgotten). A failed
    lookup keeps the peers as they are. :attr:`resolved` turns True after the
    first successful lookup (``/readyz`` waits for it).
    """

    def __init__(
        self,
        server: Server,
        name: str,
        port: int,
        *,
        scheme: str = "ws",
        path: str | None = None,
        interval: float = 10.0,
        resolver: Resolver = system_resolver,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.server = server
        self.name = name
        self.port = port
        self.scheme = scheme
        self.path = server.path if path is None else path
        self.interval = interval
        self._resolve = resolver
        own = frozenset({server.peer_id} if server.peer_id else ())
        self.peers = PeerSet(port, own=own)
        self.resolved = False
        #: Lookups that failed so far.
        self.failures = 0

    def url_of(self, peer_id: str) -> str:
        return f"{self.scheme}://{peer_id}{self.path}"

    async def refresh(self) -> None:
        """One lookup, and the peer changes it implies. OSError is logged, not raised."""
        try:
            with trio.fail_after(self.interval):
                hosts = await self._resolve(self.name, self.port)
        except (OSError, trio.TooSlowError) as exc:
            self.failures += 1
            log.warning("peer discovery: cannot resolve %s: %s (keeping %d peers)",
                        self.name, exc or "timeout", len(self.peers.current))
            return
        added, removed = self.peers.update(hosts)
        for peer_id in removed:
            log.info("peer discovery: %s left %s", peer_id, self.name)
            self.server.remove_peer(peer_id)
        for peer_id in added:
            log.info("peer discovery: %s found in %s", peer_id, self.name)
            self.server.add_peer(peer_id, self.url_of(peer_id))
        if not self.resolved:
            self.resolved = True
            log.info("peer discovery: %s resolved to %d peers", self.name,
                     len(self.peers.current))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh now, report started, then every ``interval`` until cancelled."""
        await self.refresh()
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            await self.refresh()
