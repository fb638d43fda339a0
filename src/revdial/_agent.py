"""The agent: keeps one outbound WebSocket session up and dials for the server."""

from __future__ import annotations

import errno
import hashlib
import hmac
import ipaddress
import logging
import math
import random
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionRejected
from trio_websocket import HandshakeError as WSHandshakeError

from ._backoff import Backoff
from ._errors import (
    HandshakeError,
    RevdialError,
    SessionLostError,
    TunnelError,
    exception_leaves,
)
from ._limits import DEFAULT_LIMITS, Limits
from ._redact import loggable_url
from ._session import (
    EXTENSION_HEADER,
    EXTENSION_VERSION,
    ActivityStream,
    ConnectHandler,
    Session,
    negotiate_extensions,
    release_handshake_state,
    tune_transport,
)
from ._splice import splice
from ._state import Role
from ._stream import POLICY_REFUSAL_PREFIX, TOO_MANY_DIALS_PREFIX, TunnelStream
from ._wsconn import open_client_websocket

__all__ = [
    "Agent",
    "AllowPolicy",
    "Dialer",
    "StreamHandler",
    "connect",
    "default_dialer",
    "make_connect_handler",
    "make_ssl_context",
    "split_host_port",
]

log = logging.getLogger("revdial")

#: ``dialer(proto, address) -> stream``: how the agent reaches a target.
Dialer = Callable[[str, str], Awaitable[trio.abc.Stream]]
#: Serves one tunnel stream in-process (a virtual target, see ``services``).
StreamHandler = Callable[[TunnelStream], Awaitable[None]]
AllowSpec = "AllowPolicy | Callable[[str, str], bool] | Iterable[str] | None"

_TCP_PROTOS = frozenset({"tcp", "tcp4", "tcp6"})
_PROTO_FAMILY = {"tcp4": socket.AF_INET, "tcp6": socket.AF_INET6}


def split_host_port(address: str, *, allow_zero: bool = False) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``; ValueError if malformed.

    ``allow_zero`` accepts port 0 (listen on an ephemeral port).
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"address {address!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"IPv6 address {address!r} must be in brackets: [ADDR]:PORT")
    port = int(port_text)
    if not (0 if allow_zero else 1) <= port < 65536:
        raise ValueError(f"port out of range in {address!r}")
    return host, port


class AllowPolicy:
    """Which targets the server may dial through this agent (deny by default).

    Patterns: ``HOST:PORT`` (IPv6 as ``[ADDR]:PORT``), with ``*`` for any host
    or any port (``*:443``, ``db.internal:*``), and ``unix:/path/to.sock``.
    Hosts are compared as written, case-insensitively, without resolving
    names: allowing ``127.0.0.1:22`` does not allow ``localhost:22``.
    """

    def __init__(self, patterns: Iterable[str] = (), *, allow_all: bool = False) -> None:
        self.allow_all = allow_all
        self._tcp: set[tuple[str, str]] = set()
        self._unix: set[str] = set()
        for pattern in patterns:
            if pattern.startswith("unix:"):
                self._unix.add(pattern[5:])
                continue
            host, sep, port = pattern.rpartition(":")
            if not sep or not host or not (port == "*" or port.isdigit()):
                raise ValueError(f"allow pattern {pattern!r} is not HOST:PORT or unix:PATH")
            if port != "*":
                number = int(port)
                if not 0 < number < 65536:
                    raise ValueError(f"allow pattern {pattern!r}: port out of range")
                port = str(number)  # "022" allows what a dial to port 22 asks for
            self._tcp.add((host.strip("[]").lower(), port))

    def __repr__(self) -> str:
        return (
            f"AllowPolicy(tcp={sorted(self._tcp)}, unix={sorted(self._unix)}, "
            f"allow_all={self.allow_all})"
        )

    def __call__(self, proto: str, address: str) -> bool:
        if self.allow_all:
            return True
        if proto == "unix":
            return address in self._unix
        if proto not in _TCP_PROTOS:
            return False
        try:
            host, port = split_host_port(address)
        except ValueError:
            return False
        host = host.lower()
        p = str(port)
        return any(h in ("*", host) and pp in ("*", p) for h, pp in self._tcp)


def _as_policy(allow: object) -> Callable[[str, str], bool]:
    if allow is None:
        return AllowPolicy()
    if isinstance(allow, AllowPolicy) or callable(allow):
        return cast("Callable[[str, str], bool]", allow)
    if isinstance(allow, str):
        return AllowPolicy([allow])
    return AllowPolicy(cast("Iterable[str]", allow))


def _handshake_error(exc: BaseException) -> BaseException:
    """Translate what escapes the handshake into one revdial error."""
    leaves = exception_leaves(exc)
    for leaf in leaves:
        if isinstance(leaf, ConnectionRejected):
            body = (leaf.body or b"").decode("utf-8", "replace").strip()[:200]
            return HandshakeError(
                f"server refused the tunnel: HTTP {leaf.status_code} {body}".rstrip(),
                status=leaf.status_code,
                body=body,
            )
    for leaf in leaves:
        if isinstance(leaf, WSHandshakeError | trio.BrokenResourceError | OSError):
            cause = leaf.__cause__ or leaf.__context__
            detail = str(leaf) or (repr(cause) if cause is not None else type(leaf).__name__)
            return HandshakeError(f"connection failed during the handshake: {detail}")
    if len(leaves) == 1 and isinstance(leaves[0], RevdialError):
        return leaves[0]
    return exc


def _describe_oserror(exc: BaseException) -> str:
    """A Go-like description of a connect failure (``connect: connection refused``)."""
    seen: list[BaseException] = []
    stack = [exc]
    while stack:
        e = stack.pop()
        seen.append(e)
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
        if e.__cause__ is not None:
            stack.append(e.__cause__)
    for e in seen:
        if isinstance(e, socket.gaierror):
            return f"lookup failed: {e.strerror or e}"
    for e in seen:
        if isinstance(e, OSError) and e.errno is not None:
            code = errno.errorcode.get(e.errno, "")
            text = {
                "ECONNREFUSED": "connection refused",
                "ENETUNREACH": "network is unreachable",
                "EHOSTUNREACH": "no route to host",
                "ETIMEDOUT": "i/o timeout",
                "ENOENT": "no such file or directory",
            }.get(code, e.strerror or str(e))
            return f"connect: {text}"
    return str(exc) or type(exc).__name__


def _literal_family(host: str) -> socket.AddressFamily | None:
    """The family of an IP literal (no zone), or None for a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv4Address):
        return socket.AF_INET
    return None if ip.scope_id else socket.AF_INET6


async def _connect_literal(family: socket.AddressFamily, host: str, port: int) -> trio.SocketStream:
    """Connect to one IP address: no resolver, no happy-eyeballs nursery.

    ``trio.open_tcp_stream`` would end up doing the same for a literal, after
    a task spawn and a nursery; a dial is on every new stream's critical path.
    """
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def default_dialer(proto: str, address: str) -> trio.abc.Stream:
    """Dial ``tcp``/``tcp4``/``tcp6`` or ``unix`` targets with the OS."""
    if proto in _TCP_PROTOS:
        host, port = split_host_port(address)
        family = _literal_family(host)
        if family is not None and _PROTO_FAMILY.get(proto, family) == family:
            return await _connect_literal(family, host, port)
        return await trio.open_tcp_stream(host, port)
    if proto == "unix":
        return await trio.open_unix_socket(address)
    raise OSError(errno.EPROTONOSUPPORT, f"unknown network {proto}")


def make_ssl_context(
    ca_file: str | None = None, ca_checksum: str | None = None
) -> ssl.SSLContext:
    """A client TLS context; with ``ca_file`` only that CA is trusted.

    ``ca_checksum`` (SHA-256, hex, as Rancher's ``CATTLE_CA_CHECKSUM``) pins
    the CA file: a file whose checksum differs is refused.
    """
    ctx = ssl.create_default_context()
    if ca_file is not None:
        with open(ca_file, "rb") as f:
            pem = f.read()
        if ca_checksum is not None:
            digest = hashlib.sha256(pem).hexdigest()
            if not hmac.compare_digest(digest, ca_checksum.strip().lower()):
                raise ValueError(
                    f"CA file {ca_file} does not match the pinned SHA-256 checksum"
                )
        ctx = ssl.create_default_context(cadata=pem.decode("ascii"))
    elif ca_checksum is not None:
        raise ValueError("a CA checksum pins a CA file: give ca_file as well")
    return ctx


@dataclass(frozen=True, slots=True)
class _Endpoint:
    """One server URL of an agent, parsed once."""

    host: str
    port: int
    host_header: str
    resource: str
    #: The URL as logs show it (no query string, no user-info: they may hold secrets).
    log_url: str
    ssl_context: ssl.SSLContext | None

    @classmethod
    def parse(cls, url: str, ssl_context: ssl.SSLContext | None) -> _Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"server URL must be ws:// or wss://, not {loggable_url(url)!r}")
        if not parts.hostname:
            raise ValueError(f"server URL {loggable_url(url)!r} has no host")
        secure = parts.scheme == "wss"
        host = parts.hostname
        default_port = 443 if secure else 80
        port = parts.port or default_port
        host_for_header = f"[{host}]" if ":" in host else host
        return cls(
            host=host,
            port=port,
            host_header=host_for_header if port == default_port
            else f"{host_for_header}:{port}",
            resource=(parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
            log_url=loggable_url(url),
            ssl_context=ssl_context if ssl_context is not None
            else (ssl.create_default_context() if secure else None),
        )


class Agent:
    """One agent: connects to ``url`` and serves the server's dials.

    ``url`` may be a list of server URLs (replicas peered with each other, or
    a load balancer among them): the agent uses one at a time, and after a
    session ends or an attempt fails it tries the next one in the list, with
    the usual backoff between attempts.

    ``headers`` are sent with the WebSocket upgrade (for the CLI:
    ``X-Tunnel-ID`` and ``Authorization: Bearer``). ``allow`` decides which
    ``proto``/``address`` the server may dial (an :class:`AllowPolicy`, a list
    of its patterns, or a callable); by default nothing is allowed.
    ``services`` maps virtual ``"proto/address"`` targets to in-process
    handlers (see :func:`make_connect_handler`). ``extensions=False`` speaks
    plain remotedialer even to a revdial server.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        headers: Mapping[str, str] | None = None,
        allow: object = None,
        ssl_context: ssl.SSLContext | None = None,
        limits: Limits = DEFAULT_LIMITS,
        dialer: Dialer = default_dialer,
        backoff_initial: float = 0.25,
        backoff_max: float = 30.0,
        extensions: bool = True,
        services: Mapping[str, StreamHandler] | None = None,
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("give at least one server URL")
        self._endpoints = [_Endpoint.parse(u, ssl_context) for u in urls]
        self._current = 0
        #: The first server URL (see :attr:`urls` for all of them).
        self.url = urls[0]
        #: Every server URL, in the order they are tried.
        self.urls = tuple(urls)
        self._headers = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        self._extension_version = EXTENSION_VERSION if extensions else 0
        if self._extension_version:
            self._headers.append(
                (EXTENSION_HEADER.encode(), str(self._extension_version).encode())
            )
        self._on_connect = make_connect_handler(allow, dialer, limits, services)
        self.limits = limits
        Backoff(random.random, backoff_initial, backoff_max)  # validate now, not at a failure
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        #: Called synchronously with each new session before it runs (peer links
        #: queue their announcements here).
        self._session_hook: Callable[[Session], None] | None = None
        #: The live session, if any.
        self.session: Session | None = None

    @property
    def _log_url(self) -> str:
        return self._endpoints[self._current].log_url

    def _next_endpoint(self) -> None:
        """Fail over: the next attempt goes to the next URL (round robin)."""
        self._current = (self._current + 1) % len(self._endpoints)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a session up forever, reconnecting after every failure.

        The waits follow :class:`~revdial._backoff.Backoff`: quick first
        retries (``backoff_initial``, 0.25 s, then doubling with jitter up to
        ``backoff_max``), and back to the quickest after any session that was
        up for a second, so a restarted server gets its agents back within
        about a second. ``task_status.started()`` fires once the first
        session is up. Only cancellation ends it.
        """
        backoff = Backoff(random.random, self._backoff_initial, self._backoff_max)
        started = False
        while True:
            up_since: float | None = None

            def on_up() -> None:
                nonlocal started, up_since
                up_since = trio.current_time()
                if not started:
                    started = True
                    task_status.started()

            try:
                await self._run_session(on_up)
                log.info("session to %s ended", self._log_url)
            except (RevdialError, OSError, trio.BrokenResourceError) as exc:
                log.warning("tunnel to %s: %s", self._log_url, exc)
            lasted = None if up_since is None else trio.current_time() - up_since
            wait = backoff.session_ended(lasted)
            if len(self._endpoints) > 1:
                self._next_endpoint()
            log.info("reconnecting to %s in %.2f s", self._log_url, wait)
            await trio.sleep(wait)

    async def run_once(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run one session until it ends; raise :class:`HandshakeError` if the
        server refuses us, ``OSError`` if it cannot be reached."""

        def on_up() -> None:
            task_status.started()

        await self._run_session(on_up)

    async def _run_session(self, on_up: Callable[[], None]) -> None:
        limits = self.limits
        endpoint = self._endpoints[self._current]
        with trio.fail_after(limits.handshake_timeout):
            tcp = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        tune_transport(tcp, limits)
        stream: trio.abc.Stream = tcp
        if endpoint.ssl_context is not None:
            stream = trio.SSLStream(tcp, endpoint.ssl_context, server_hostname=endpoint.host)
        transport = ActivityStream(stream)
        session: Session | None = None
        try:
            # The nursery hosts trio-websocket's reader task, whose handshake
            # errors (ConnectionRejected) surface here as exception groups.
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(limits.handshake_timeout):
                    if isinstance(stream, trio.SSLStream):
                        await stream.do_handshake()
                    ws = await open_client_websocket(
                        nursery,
                        transport,
                        endpoint.host_header,
                        endpoint.resource,
                        extra_headers=list(self._headers),
                        max_message_size=limits.max_message_size,
                        receive_buffer_size=limits.read_size,
                    )
                    answer = next(
                        (v.decode("latin-1") for k, v in ws.handshake_headers
                         if k.decode("latin-1").lower() == EXTENSION_HEADER.lower()),
                        None,
                    )
                    release_handshake_state(ws)
                    session = Session(
                        ws,
                        transport,
                        Role.CLIENT,
                        client_key="client",
                        limits=limits,
                        on_connect=self._on_connect,
                        extensions=negotiate_extensions(answer, self._extension_version),
                    )
                if session is None:
                    nursery.cancel_scope.cancel()
                else:
                    self.session = session
                    if self._session_hook is not None:
                        self._session_hook(session)
                    log.info(
                        "session %s: connected to %s (%s)",
                        session.id,
                        endpoint.log_url,
                        f"revdial extension v{session.extensions}"
                        if session.extensions
                        else "plain remotedialer",
                    )
                    on_up()
                    try:
                        await session.run()
                    finally:
                        self.session = None
                        nursery.cancel_scope.cancel()
        except Exception as exc:
            if session is None:
                raise _handshake_error(exc) from None
            raise SessionLostError(f"session failed: {exc!r}") from exc
        finally:
            await trio.aclose_forcefully(transport)
        if session is None:
            raise HandshakeError(
                f"no WebSocket handshake within {limits.handshake_timeout:.0f} s"
            )
        if session.end_reason is not None:
            raise SessionLostError(f"session ended: {session.end_reason}")


def make_connect_handler(
    allow: object = None,
    dialer: Dialer = default_dialer,
    limits: Limits = DEFAULT_LIMITS,
    services: Mapping[str, StreamHandler] | None = None,
) -> ConnectHandler:
    """The agent's answer to each Connect: check ``allow``, dial, then splice.

    ``services`` maps virtual targets (``"proto/address"``) to in-process
    handlers that serve the tunnel stream themselves -- no socket, no dial --
    such as the agent's HTTP reverse proxy. They are allowed implicitly.

    A refused or failed dial closes only that stream, with an Error text a Go
    server shows its caller (``dial tcp ADDR: connect: connection refused``);
    the session lives on. A dialled connection is spliced with
    :func:`~revdial.splice`: when the stream fails (session lost, reset by the
    server) or the handler is cancelled (the session ended), the target's
    connection is reset, never closed with a FIN, and the failure is logged
    once at warning with its cause.
    """
    policy = _as_policy(allow)
    virtual = dict(services or {})
    pending = 0  # dials in progress (bounded by limits.max_pending_dials)
    refusals = _LogThrottle()

    async def handle(stream: TunnelStream, proto: str, address: str) -> None:
        nonlocal pending
        target = f"{proto}/{address}"
        service = virtual.get(target)
        if service is not None:
            stream.session.dial_succeeded(stream)
            await service(stream)
            return
        if not policy(proto, address):
            refusals.warning("refused dial to %s: not allowed by the agent's policy", target)
            stream.close_nowait(f"{POLICY_REFUSAL_PREFIX}: {target}")
            return
        if pending >= limits.max_pending_dials:
            refusals.warning("refused dial to %s: %d dials already in progress", target, pending)
            stream.close_nowait(f"{TOO_MANY_DIALS_PREFIX} ({limits.max_pending_dials})")
            return
        pending += 1
        reason: str | None
        try:
            with trio.fail_after(limits.dial_timeout):
                local = await dialer(proto, address)
        except trio.TooSlowError:
            reason = f"dial {proto} {address}: i/o timeout"
        except (OSError, ValueError) as exc:
            reason = f"dial {proto} {address}: {_describe_oserror(exc)}"
        else:
            reason = None
        finally:
            pending -= 1  # established streams do not count
        if reason is not None:
            log.warning("dial to %s failed: %s", target, reason)
            stream.close_nowait(reason)
            return
        stream.session.dial_succeeded(stream)
        failure: TunnelError | None = None
        try:
            await splice(stream, local, read_size=limits.read_size,
                         idle_timeout=limits.idle_stream_timeout)
        except TunnelError as exc:
            failure = exc
        finally:
            # Once per stream, whether the splice raised or was cancelled
            # by the session's end; the target's connection was reset.
            failure = failure or stream.error
            if failure is not None:
                log.warning("connection to %s reset: %s", target, failure)

    return handle


class _LogThrottle:
    """At most one warning per ``interval`` seconds; the rest are counted.

    A server may send thousands of Connects the agent refuses: each is still
    refused, but the log gets a line a second saying how many were.
    """

    __slots__ = ("_interval", "_next", "_suppressed")

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._next = -math.inf
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = trio.current_time()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            message += f" (and {self._suppressed} more refused in the last {self._interval:g} s)"
            self._suppressed = 0
        self._next = now + self._interval
        log.warning(message, *args)


async def connect(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    allow: object = None,
    ssl_context: ssl.SSLContext | None = None,
    limits: Limits = DEFAULT_LIMITS,
    dialer: Dialer = default_dialer,
    extensions: bool = True,
    services: Mapping[str, StreamHandler] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run an agent for ``url`` forever (see :class:`Agent`).

    ``await nursery.start(revdial.connect, url, ...)`` returns once the first
    session is up.
    """
    agent = Agent(
        url,
        headers=headers,
        allow=allow,
        ssl_context=ssl_context,
        limits=limits,
        dialer=dialer,
        extensions=extensions,
        services=services,
    )
    await agent.run(task_status=task_status)
