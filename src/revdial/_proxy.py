"""The agent's HTTP/1.1 reverse proxy, and the h11 forwarding core it shares
with the server's front door (:mod:`revdial._frontdoor`).

Reserved virtual address
------------------------
The agent serves its proxy on the virtual target ``tcp/revdial.proxy:0``
(:data:`PROXY_PROTO` / :data:`PROXY_ADDRESS`): the server opens a tunnel
stream to it with ``Server.dial(client_key, "tcp", "revdial.proxy:0")`` and
speaks HTTP/1.1 on that stream. The agent answers it in-process
(``Agent(..., services={PROXY_TARGET: proxy})``), without any listening
socket. The name can never be a real dial: port 0 cannot be connected to (the
agent's address parser refuses it before any DNS lookup) and ``.proxy`` is no
DNS top-level domain, so the reserved target never collides with, or leaks
to, a host the agent could reach. ``--allow`` dialling keeps working beside
it.

Theory of operation
-------------------
A *downstream* connection (a tunnel stream at the agent, a user's TCP
connection at the front door) carries HTTP/1.1 requests. Each request is one
*cycle*:

1. **Head.** The head is read into our own buffer, bounded by
   ``ProxyLimits.max_header_bytes`` (431 beyond) and ``header_timeout``
   from its first byte (408 beyond: slow-loris), and checked for framing
   that invites request smuggling before h11 sees it: both Content-Length
   and Transfer-Encoding, or Content-Length given twice (even with the same
   value, which h11 would quietly merge), are refused with 400. Then a fresh
   ``h11.Connection`` parses it (one per cycle: whatever follows the request
   is taken back from ``trailing_data`` and goes through the same checks).
2. **Route.** A router (the agent's or the front door's) turns the request
   into a :class:`Route`: where to connect, the request-target and the
   end-to-end headers to send. It may answer itself instead (401, 404, ...).
   Hop-by-hop headers never reach it: ``Connection`` and every header it
   names, ``Keep-Alive``, ``Proxy-Connection``, ``TE``, ``Trailer``,
   ``Transfer-Encoding``, ``Upgrade``, ``Proxy-Authorization`` and
   ``Proxy-Authenticate``. h11 parses both directions (and so decides
   where each message ends); what is sent on is written from what h11
   parsed and validated, without h11's writer: the upstream request head by
   :func:`_request_head` (checked as h11 would check it; h11's client side
   is told the method and framing only), the response head by
   :func:`_response_head` (the upstream's fields in their order and case,
   hop-by-hop ones dropped, framing and ``Connection: close`` as h11 would
   set them) and the response body as received -- re-chunked only when it
   has no length (chunked or close-delimited upstream) for an HTTP/1.1
   client, or de-chunked for an HTTP/1.0 one.
3. **Exchange.** An upstream connection is taken from the keep-alive pool
   (bounded, shared by every downstream connection of this proxy) or opened.
   The request body is pumped upstream while the response is read, each
   direction in its own task, ``read_size`` bytes at a time, so a body of
   any size passes with flat memory and a chunked response (a watch) is
   forwarded piece by piece as it arrives. One reader task per downstream
   connection (not per request) reads ahead, bounded by
   ``max_header_bytes``: once the request is complete it reports EOF, so a
   client that goes away cancels the exchange (and closes the upstream
   connection) instead of leaving an idle watch open upstream. Each
   exchange has one cancel scope, whose deadline is the response timeout.
4. **Upgrade.** A request with ``Connection: Upgrade`` (WebSocket, SPDY as
   used by ``kubectl exec``/``attach``/``port-forward``) is forwarded with
   its Upgrade header; after the upstream's ``101 Switching Protocols`` the
   proxy copies raw bytes both ways until either side closes.
5. **Reuse.** When both h11 connections finished the cycle cleanly the
   upstream connection returns to the pool -- unless bytes beyond the
   response arrived on it, which would answer the next request sent there --
   and the downstream waits for its next request (``idle_timeout``);
   otherwise both are closed.

Errors are answered with an honest status and a short ``text/plain`` body,
after which the downstream connection is closed cleanly:

=====  ==========================================================
400    malformed request, smuggling attempt, bad request-target
405    ``CONNECT``
408    request head not complete ``header_timeout`` after its first byte
431    request head larger than ``max_header_bytes``
501    a transfer coding other than chunked
502    upstream refused/unreachable, TLS failure, broken response
504    upstream connect or response head timed out
=====  ==========================================================

Once a response head has been sent downstream a failure can no longer be
answered with a status: the downstream connection is then *aborted* -- a TCP
reset (``SO_LINGER`` 0), or an Error frame other than ``EOF`` on a tunnel
stream -- never closed cleanly, so not even a close-delimited body (HTTP/1.0,
``Connection: close``) can pass for complete: no terminating chunk, no
padding, no FIN. Each such abort is logged once and counted in
``ProxyStatistics.aborted_responses``. The same holds after an upgrade: a
failure of either side resets the other, only an EOF is passed on as a close.
An upstream connection whose exchange failed (a truncated request body, a
dead tunnel) is aborted too; a client's orderly close still closes it.

A reused pooled connection that turns out to be dead (the upstream closed it
while idle) is retried once on a fresh connection when the request has no
body and nothing of a response arrived; idle connections that are already
readable (EOF, reset) or older than ``pool_idle_timeout`` are never reused.

Exceptions are translated at the I/O boundary of each side: downstream
failures become ``_DownstreamGone`` (abort quietly), upstream failures
``_UpstreamFailed`` (answered 502 while no response head was sent), and
nothing from h11 escapes to a caller.
"""

from __future__ import annotations

import contextlib
import errno
import http
import logging
import math
import os
import re
import select
import ssl
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

import h11
import trio

from ._errors import TunnelError
from ._redact import loggable_target
from ._splice import abort
from ._stream import TunnelStream

__all__ = [
    "PROXY_ADDRESS",
    "PROXY_PROTO",
    "PROXY_TARGET",
    "DEFAULT_PROXY_LIMITS",
    "ProxyLimits",
    "ProxyStatistics",
    "ReverseProxy",
    "TokenFile",
]

log = logging.getLogger("revdial.proxy")

KiB = 1024

#: The reserved virtual target the agent's proxy answers (see the module docstring).
PROXY_PROTO: Final = "tcp"
PROXY_ADDRESS: Final = "revdial.proxy:0"
PROXY_TARGET: Final = f"{PROXY_PROTO}/{PROXY_ADDRESS}"


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    """Bounds and timeouts of the HTTP proxy (agent) and the front door (server)."""

    #: Largest request or response head (start line plus headers). h11's own
    #: default is 16 KiB; Go's net/http allows 1 MiB. Kubernetes clients with
    #: OIDC tokens and impersonation headers stay far below 64 KiB. Larger
    #: request heads are answered 431, larger response heads 502.
    max_header_bytes: int = 64 * KiB
    #: Bytes read at once from either side: one tunnel Data frame
    #: (``Limits.max_frame_size``), where per-read overhead stops mattering.
    #: Together with the pump's single in-flight chunk per direction this is
    #: what bounds a request's memory, whatever the body size.
    read_size: int = 256 * KiB
    #: How long a downstream connection may take to deliver a request head,
    #: the first or the next one on a kept-alive connection. Go's Transport
    #: keeps idle connections 90 s; so do we.
    idle_timeout: float = 90.0
    #: How long a request head may take from its first byte to its end: a
    #: slow-loris client dribbling header bytes is answered 408 and cut off
    #: after this, not after ``idle_timeout``. Real clients send a head in
    #: one write; 10 s carries a 64 KiB head at 6.4 KB/s (nginx's
    #: ``client_header_timeout`` is 60 s, Apache's ``RequestReadTimeout``
    #: 20-40 s).
    header_timeout: float = 10.0
    #: Opening an upstream connection (TCP and TLS, or a tunnel dial). -> 504
    connect_timeout: float = 10.0
    #: From sending the request head to receiving the response head. Above
    #: kube-apiserver's own 60 s request timeout, so its own 504 arrives
    #: first; long-running requests (watch, exec) send their head at once.
    #: -> 504
    response_timeout: float = 120.0
    #: Idle upstream connections kept for reuse, all upstreams together (as
    #: Go's ``http.DefaultTransport``). Above the number of requests in flight
    #: at once: a pool smaller than that closes connections when a burst of
    #: responses ends and opens them again for the next burst (at 32, an agent
    #: serving 50 concurrent clients spent a tenth of its CPU doing that).
    max_idle_connections: int = 100
    #: Idle upstream connections older than this are closed rather than
    #: reused: well under the 90 s an agent's proxy (``idle_timeout``) and
    #: common servers keep an idle connection, so we rarely race their close.
    pool_idle_timeout: float = 30.0
    #: After an error answer on a TCP connection whose request body was not
    #: read, how long to drain it before closing: closing with unread data
    #: makes the kernel send a reset that can destroy the answer in flight.
    linger_timeout: float = 2.0

    def __post_init__(self) -> None:
        if self.max_header_bytes < 1024 or self.read_size < 1:
            raise ValueError("max_header_bytes must be >= 1024 and read_size positive")
        if min(self.idle_timeout, self.header_timeout, self.connect_timeout,
               self.response_timeout) <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_idle_connections < 0 or self.pool_idle_timeout < 0:
            raise ValueError("pool bounds must not be negative")


DEFAULT_PROXY_LIMITS = ProxyLimits()


@dataclass(frozen=True, slots=True)
class ProxyStatistics:
    #: Requests being forwarded right now.
    active_requests: int
    #: Requests forwarded so far (answered by the upstream or failed there).
    requests: int
    #: Idle upstream connections in the pool.
    idle_connections: int
    #: Upstream connections opened so far (``requests`` minus this: reuses).
    connections_opened: int
    #: Responses cut off after their head was sent, because the upstream (or
    #: the tunnel to it) failed, or upgraded connections that ended in a
    #: failure of either side: the downstream connection was aborted.
    aborted_responses: int = 0


# --- exceptions used inside the proxy (never escape it) -------------------------


class _Answer(Exception):
    """Answer the downstream with ``status`` and a short text body, then close."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: Iterable[tuple[str, str]] = (),
        *,
        content_type: str = "text/plain; charset=utf-8",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)
        #: The body is ``message`` (plus a newline) of this type.
        self.content_type = content_type


class _DownstreamGone(Exception):
    """The downstream connection closed or broke: nobody to answer."""


class _ClientClosed(_DownstreamGone):
    """The client closed its connection in order (EOF) during an exchange."""


class _Aborted(Exception):
    """A response was started and cannot be completed: abort the downstream."""


class _UpstreamFailed(Exception):
    """An upstream connection failed (I/O or protocol); the cause is attached."""


class _Retry(Exception):
    """A reused upstream connection was dead before answering: try a fresh one."""


#: What a broken or closed stream raises (a tunnel stream: TunnelError).
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, TunnelError, OSError)


# --- routing -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    """What a router sees of a downstream request (hop-by-hop headers removed)."""

    method: bytes
    #: As received: origin-form (``/path?query``) or ``*``.
    target: bytes
    #: End-to-end headers, ``(lower-case name, value)``, in order; no framing headers.
    headers: list[tuple[bytes, bytes]]
    http_version: bytes
    #: The downstream peer's address (front door: the user's IP), if known.
    client: str | None
    #: ``http`` or ``https``: how the request reached us.
    scheme: str

    def header(self, name: bytes) -> bytes | None:
        """The value of header ``name`` (lower-case), several joined with ``, ``."""
        values = [v for n, v in self.headers if n == name]
        return b", ".join(values) if values else None


def _default_classify(exc: BaseException) -> _Answer:
    return _Answer(502, f"upstream connection failed: {_describe(exc)}")


@dataclass(slots=True)
class Route:
    """Where and how a request is forwarded (a router's answer)."""

    #: Pool key: connections are reused only for requests with the same key.
    key: Hashable
    #: Open a new upstream connection; raise ``_Answer`` (502/503/504) on failure.
    connect: Callable[[], Awaitable[trio.abc.Stream]]
    #: Request-target to send upstream.
    target: bytes
    #: End-to-end request headers to send (Host included); framing is added.
    headers: list[tuple[bytes, bytes]]
    #: Turn an upstream I/O failure into the answer to give.
    classify: Callable[[BaseException], _Answer] = field(default=_default_classify)
    #: Awaited before the request is forwarded (and before its body is
    #: read); raises ``_Answer`` to refuse it. The front door checks a
    #: user's right to impersonate (``kubectl --as``) here.
    check: Callable[[], Awaitable[None]] | None = None


Router = Callable[[ProxyRequest], Route]


# --- header helpers ------------------------------------------------------------

_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)


_HOP_BY_HOP_AND_LENGTH: Final = _HOP_BY_HOP | {b"content-length"}


def _comma_tokens(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    tokens: list[bytes] = []
    for n, v in headers:
        if n.lower() == name:
            tokens.extend(t.strip().lower() for t in v.split(b",") if t.strip())
    return tokens


def end_to_end_headers(
    raw: Iterable[tuple[bytes, bytes]], *, keep_content_length: bool = False
) -> list[tuple[bytes, bytes]]:
    """``raw`` without hop-by-hop headers (RFC 9110 7.6.1), names lower-cased.

    Drops ``Connection`` and every header it names, plus the fixed hop-by-hop
    set; ``Content-Length`` too unless ``keep_content_length`` (framing is
    redone by h11 on each side).
    """
    items = [(n.lower(), v) for n, v in raw]
    drop = _HOP_BY_HOP if keep_content_length else _HOP_BY_HOP_AND_LENGTH
    for n, _ in items:
        if n == b"connection":  # rare in a request or response we forward: no set built
            drop = drop | set(_comma_tokens(items, b"connection"))
            break
    return [(n, v) for n, v in items if n not in drop]


def _trailers(event: h11.EndOfMessage) -> list[tuple[bytes, bytes]]:
    """A chunked message's trailer fields to pass on (hop-by-hop ones removed)."""
    return end_to_end_headers(event.headers.raw_items()) if event.headers else []


def with_forwarded(
    headers: list[tuple[bytes, bytes]],
    *,
    client: str | None,
    proto: str,
    host: bytes | None,
    replace: bool,
) -> list[tuple[bytes, bytes]]:
    """Add ``X-Forwarded-For`` / ``-Proto`` / ``-Host``.

    ``client`` is appended to X-Forwarded-For (as Go's ReverseProxy does).
    With ``replace`` (the front door: the edge, whose caller is untrusted),
    Proto and Host are set from what we know; otherwise (the agent, whose
    caller is the authenticated server) values already present are kept.
    """
    out: list[tuple[bytes, bytes]] = []
    prior: list[bytes] = []
    has_proto = has_host = False
    for n, v in headers:  # one pass: this runs for every request, twice on the front-door path
        if n == b"x-forwarded-for":
            prior.append(v)
            continue
        if n == b"x-forwarded-proto":
            if replace:
                continue
            has_proto = True
        elif n == b"x-forwarded-host":
            if replace:
                continue
            has_host = True
        out.append((n, v))
    chain = b", ".join(prior)
    if client is not None:
        chain = chain + b", " + client.encode() if chain else client.encode()
    if chain:
        out.append((b"x-forwarded-for", chain))
    if replace or not has_proto:
        out.append((b"x-forwarded-proto", proto.encode()))
    if host is not None and (replace or not has_host):
        out.append((b"x-forwarded-host", host))
    return out


_HEAD_END = re.compile(rb"\n\r?\n")


#: A Content-Length or Transfer-Encoding field line (not the request line): the
#: name as ``bytes.strip()`` would leave it, and the rest of the line.
_FRAMING_FIELD = re.compile(
    rb"\n[ \t\x0b\x0c]*(content-length|transfer-encoding)[ \t\x0b\x0c]*:([^\n]*)", re.I
)


def _framing_problem(head: bytes) -> str | None:
    """Smuggling checks h11 does not make.

    h11 merges equal Content-Lengths and unfolds obs-fold (RFC 9112 5.2 lets
    a server do either); a proxy refuses both, and a bare CR (RFC 9112 2.2),
    so that no intermediary before or after it can read the head differently.
    """
    if b"\n " in head or b"\n\t" in head:
        return "obs-fold (a header line starting with whitespace)"
    if head.count(b"\r") != head.count(b"\r\n"):
        return "bare CR"
    content_length = 0
    transfer_encoding = False
    for name, value in _FRAMING_FIELD.findall(head):
        if len(name) == 14:  # content-length
            content_length += 1 + value.count(b",")
        else:
            transfer_encoding = True
    if content_length > 1:
        return "duplicate Content-Length"
    if content_length and transfer_encoding:
        return "both Content-Length and Transfer-Encoding"
    return None


#: How :meth:`HTTPForwarder._respond` writes a response body (:func:`_response_head`).
_BODY_NONE: Final = 0  # HEAD, 204, 304: no body at all
_BODY_AS_IS: Final = 1  # Content-Length, or close-delimited to HTTP/1.0: bytes as received
_BODY_CHUNKED: Final = 2  # chunked to an HTTP/1.1 client: each piece as one chunk


def _response_head(
    event: h11.Response, method: bytes, *, http11: bool, keep_alive: bool
) -> tuple[bytes, int]:
    """The downstream head for a response h11 parsed, and how to write its body.

    What changes is what h11's server side would change, nothing more: the
    fields keep their order and case, hop-by-hop ones are dropped
    (``Connection`` and every field it names, ``Transfer-Encoding``, ...), a
    body of unknown length (chunked or close-delimited upstream) is sent
    chunked to an HTTP/1.1 client -- as is, the connection closing after it,
    to an HTTP/1.0 one -- and ``Connection: close`` is added when the
    client's request did not allow keep-alive. h11 validated the reason and
    every name and value when it parsed them: nothing here can split a head.
    """
    kept: list[tuple[bytes, bytes, bytes]] = []
    named: set[bytes] = set()
    chunked = False
    for name, value in event.headers.raw_items():
        low = name.lower()
        if low in _HOP_BY_HOP:
            if low == b"transfer-encoding":
                chunked = True
            elif low == b"connection":
                named.update(t.strip().lower() for t in value.split(b","))
            continue
        kept.append((low, name, value))
    if named:
        kept = [f for f in kept if f[0] not in named]
    if chunked:  # h11 refuses both; a named Transfer-Encoding is dropped all the same
        kept = [f for f in kept if f[0] != b"content-length"]
    has_length = not chunked and any(f[0] == b"content-length" for f in kept)
    lines = [b"HTTP/1.1 %d %s\r\n" % (event.status_code, event.reason)]
    lines += [b"%s: %s\r\n" % (name, value) for _, name, value in kept]
    mode = _BODY_AS_IS
    if event.status_code in (204, 304):
        mode = _BODY_NONE
    else:
        if not has_length and http11:
            lines.append(b"Transfer-Encoding: chunked\r\n")
            mode = _BODY_CHUNKED
        if method == b"HEAD":
            mode = _BODY_NONE
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines), mode


_END: Final = h11.EndOfMessage()

#: h11's view of a request without body or upgrade (see ``HTTPForwarder._cycle``),
#: built once for the common methods.
_BARE_HEADS: Final = {
    method: h11.Request(method=method, target=b"/", headers=[(b"host", b"-")])
    for method in (b"GET", b"HEAD", b"DELETE", b"OPTIONS")
}

_TOKEN: Final = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
#: A request head as h11 would write it: method, request-target and fields as
#: h11 0.16 validates them (``h11._abnf``: visible ASCII target; field values
#: with obs-text, no leading or trailing space, no CR, LF or NUL).
_REQUEST_HEAD: Final = re.compile(
    rb"%s [\x21-\x7e]+ HTTP/1\.1\r\n(?:%s: (?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?\r\n)*\r\n"
    % (_TOKEN, _TOKEN)
)


def _request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The upstream request head, written by hand and checked in one regex pass.

    Fields as given (the router's, then framing); raises ``_Answer(400)`` if
    any part could not stand in a head as itself (h11 would refuse it too).
    """
    if not any(name.lower() == b"host" for name, _ in headers):
        raise _Answer(400, "bad request: no Host for the upstream request")
    wire = b"".join([b"%s %s HTTP/1.1\r\n" % (method, target),
                     *(b"%s: %s\r\n" % field for field in headers), b"\r\n"])
    # The pattern alone would take a value holding "\r\n" plus a field of its
    # own as two fields: one CRLF per line (fields, request line, end) rules
    # that out -- the pattern admits no CR or LF but in a CRLF.
    if wire.count(b"\r\n") != len(headers) + 2 or _REQUEST_HEAD.fullmatch(wire) is None:
        raise _Answer(400, "bad request: an invalid request line or header field")
    return wire


def _last_chunk(trailers: list[tuple[bytes, bytes]]) -> bytes:
    """A chunked body's end: the zero-length chunk, trailer fields, a blank line."""
    return b"".join([b"0\r\n", *(b"%s: %s\r\n" % field for field in trailers), b"\r\n"])


def _error_bytes(
    status: int,
    message: str,
    headers: Iterable[tuple[str, str]],
    *,
    head_only: bool,
    content_type: str = "text/plain; charset=utf-8",
) -> bytes:
    body = (message.strip() + "\n").encode("utf-8", "replace")
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers),
    ]
    out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
    return out if head_only else out + body


def _describe(exc: BaseException) -> str:
    """A short, token-free description of a failure and its cause."""
    seen: list[BaseException] = []
    stack: list[BaseException] = [exc]
    while stack and len(seen) < 20:
        e = stack.pop(0)
        seen.append(e)
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
        cause = e.__cause__ or e.__context__
        if cause is not None:
            stack.append(cause)
    for err in seen:
        if isinstance(err, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed: {err.verify_message}"
        if isinstance(err, ssl.SSLError):
            return f"TLS error: {err.reason or err}"
    for err in seen:
        if isinstance(err, OSError) and err.errno is not None:
            return err.strerror or errno.errorcode.get(err.errno, str(err))
    for err in seen:
        text = str(err)
        if text:
            return text
    return type(exc).__name__


# --- the two sides -------------------------------------------------------------


class _Downstream:
    """The client side: one connection, one ``h11.Connection`` per request cycle.

    One long-lived reader task per connection (:meth:`read_ahead`, started
    by :meth:`HTTPForwarder.serve`) is the only caller of ``receive_some``:
    it reads ahead into :attr:`buf`, at most ``max_header_bytes`` beyond
    what the handler took (plus one read), and reports EOF -- to the
    handler waiting for bytes, and to the exchange in progress if it asked
    with :meth:`watch`. A per-request task to watch the client for EOF cost
    a fifth of the front door's CPU per small request.
    """

    def __init__(
        self, stream: trio.abc.Stream, limits: ProxyLimits, client: str | None = None
    ) -> None:
        self.stream = stream
        self.limits = limits
        self.client = client
        #: Received bytes h11 has not been given yet (the next request's).
        self.buf = bytearray()
        #: The reader saw EOF (or a failure, then :attr:`failure` says which).
        self.eof = False
        self.failure: str | None = None
        self.conn = h11.Connection(h11.SERVER)
        self.method = b"GET"
        #: A response head (or 101) was sent in this cycle: no error answer possible.
        self.responded = False
        #: The request allows the connection to go on (HTTP/1.1, no ``Connection: close``).
        self.keep_alive = True
        #: A response written by :class:`_ResponseWriter` (not h11) is under way / done.
        self.raw_body = False
        self.raw_done = False
        self._on_close: Callable[[], None] | None = None
        self._data = trio.lowlevel.ParkingLot()  # the handler, waiting for bytes
        self._room = trio.lowlevel.ParkingLot()  # the reader, waiting for room in buf
        self._reader_scope = trio.CancelScope()
        self._reader_done = trio.Event()

    @property
    def http11(self) -> bool:
        # As h11 compares it: a client of a later HTTP/1.x-style version counts as 1.1.
        version = self.conn.their_http_version
        return version is not None and version >= b"1.1"

    async def read_ahead(self) -> None:
        """The reader task: fill :attr:`buf` until EOF, a failure or :meth:`stop_reader`.

        Never raises for what the stream does: a failure counts as EOF (with
        :attr:`failure` set). Cancellation is safe (nothing read is lost).
        """
        cap = self.limits.max_header_bytes
        read_size = self.limits.read_size
        try:
            with self._reader_scope:
                while True:
                    if len(self.buf) > cap:
                        await self._room.park()  # the handler takes the bytes first
                        continue
                    try:
                        data = await self.stream.receive_some(read_size)
                    except _STREAM_ERRORS as exc:
                        self.failure = _describe(exc)
                        data = b""
                    if not data:
                        self.eof = True
                        self._data.unpark_all()
                        if self._on_close is not None:
                            self._on_close()
                        return
                    self.buf += data
                    self._data.unpark_all()
        finally:
            self._reader_done.set()

    async def stop_reader(self) -> None:
        """Stop the reader and wait until it stopped; then the stream is the caller's.

        Bytes it read stay in :attr:`buf`.
        """
        self._reader_scope.cancel()
        await self._reader_done.wait()

    async def _more(self) -> None:
        """Wait until the reader added bytes or saw EOF (call only with ``not self.eof``)."""
        await self._data.park()

    def _take(self) -> bytes:
        """Everything buffered, for h11 (the reader may read on)."""
        data = bytes(self.buf)
        self.buf.clear()
        if self._room:
            self._room.unpark_all()
        return data

    def _gone(self, what: str) -> _DownstreamGone:
        return _DownstreamGone(self.failure or f"connection closed in the middle of {what}")

    def watch(self, on_close: Callable[[], None]) -> None:
        """Call ``on_close`` (from the reader) when the client closes or fails.

        At once if it already did. :meth:`unwatch` ends it. Bytes the reader
        reads meanwhile (a pipelined request) wait in :attr:`buf`.
        """
        if self.eof:
            on_close()
        else:
            self._on_close = on_close

    def unwatch(self) -> None:
        self._on_close = None

    async def send_raw(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except _STREAM_ERRORS as exc:
            raise _DownstreamGone(_describe(exc)) from exc

    def _note_method(self) -> None:
        """Take the method from the request line before h11 parses the head.

        It decides whether an error answer may carry a body (never for HEAD),
        also for a head refused before h11 sees it (431, smuggling).
        """
        space = self.buf.find(b" ", 0, 64)
        self.method = bytes(self.buf[:space]) if space > 0 else b"GET"

    async def read_request(self) -> h11.Request | None:
        """The next request head; ``None`` after a clean close between requests.

        Raises ``_Answer`` (400, 431, 501) for a request we will not forward,
        and 408 when the head is not complete ``header_timeout`` after its
        first byte (slow-loris).
        """
        limit = self.limits.max_header_bytes
        scanned = 0
        deadline = math.inf
        while True:
            while self.buf.startswith((b"\r\n", b"\n")):  # RFC 9112 2.2: ignore them
                del self.buf[: 2 if self.buf.startswith(b"\r") else 1]
                scanned = 0
            match = _HEAD_END.search(self.buf, max(0, scanned - 3))
            if match is not None:
                break
            if len(self.buf) > limit:
                self._note_method()
                raise _Answer(431, "request header fields too large")
            if self.eof:
                if self.buf:
                    raise self._gone("a request head")
                if self.failure is not None:
                    raise _DownstreamGone(self.failure)
                return None
            scanned = len(self.buf)
            if not self.buf:  # waiting for a head (idle_timeout, the caller's, applies)
                await self._more()
                continue
            if deadline == math.inf:  # the head has started but not ended in one read
                deadline = trio.current_time() + self.limits.header_timeout
            with trio.move_on_at(deadline):  # only here: a cancel scope costs ~µs
                await self._more()
                continue
            self._note_method()
            log.info("%s: request head not complete %g s after its first byte -> 408",
                     self.client or "a client", self.limits.header_timeout)
            raise _Answer(408, "request head not received in time")
        self._note_method()
        end = match.end()
        if end > limit:
            raise _Answer(431, "request header fields too large")
        problem = _framing_problem(bytes(self.buf[:end]))
        if problem is not None:
            raise _Answer(400, f"bad request: {problem}")
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
        self.responded = self.raw_body = self.raw_done = False
        self.conn.receive_data(self._take())
        if self.eof:
            self.conn.receive_data(b"")
        try:
            event = self.conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise _Answer(exc.error_status_hint, f"bad request: {exc}") from None
        if not isinstance(event, h11.Request):  # cannot happen: the head is complete
            raise _Answer(400, "bad request")
        self.method = event.method
        return event

    async def next_body_event(self) -> h11.Data | h11.EndOfMessage:
        """The next piece of the request body. Raises ``_Answer(400)`` if malformed."""
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Answer(exc.error_status_hint, f"bad request body: {exc}") from None
            if event is h11.NEED_DATA:
                if not self.buf:
                    if self.eof:
                        raise self._gone("a request body")
                    await self._more()
                    continue
                self.conn.receive_data(self._take())
                continue
            if isinstance(event, h11.Data | h11.EndOfMessage):
                return event
            raise _DownstreamGone(f"unexpected {type(event).__name__} in a request body")

    def encode(self, event: h11.Event) -> bytes:
        """h11's bytes for ``event`` (the caller sends them)."""
        if isinstance(event, h11.Response) or (
            isinstance(event, h11.InformationalResponse) and event.status_code == 101
        ):
            self.responded = True
        return self.conn.send(event) or b""

    async def send(self, event: h11.Event) -> None:
        data = self.encode(event)
        if data:
            await self.send_raw(data)

    def end_cycle(self) -> bool:
        """Carry unparsed bytes to the next cycle; True if the connection may go on."""
        if self.conn.their_state is not h11.DONE or not (
            (self.raw_done and self.keep_alive) or self.conn.our_state is h11.DONE
        ):
            return False
        trailing, closed = self.conn.trailing_data
        self.buf[:0] = trailing
        self.eof = self.eof or closed
        return not self.eof or bool(self.buf)

    async def answer(self, exc: _Answer) -> None:
        """Send an error answer if no response was started, then linger."""
        if self.responded:
            return
        self.responded = True
        await self.send_raw(
            _error_bytes(exc.status, exc.message, exc.headers, head_only=self.method == b"HEAD",
                         content_type=exc.content_type)
        )

    @property
    def mid_response(self) -> bool:
        """A response (or an upgraded connection) was started and is not finished."""
        return self.responded and (
            self.raw_body or self.conn.our_state in (h11.SEND_BODY, h11.SWITCHED_PROTOCOL)
        )

    async def close(self, *, linger: bool) -> None:
        """Close cleanly; ``linger`` drains unread request bytes first (TCP only)."""
        stream = self.stream
        if linger and not self.eof and isinstance(stream, trio.SocketStream):
            with trio.move_on_after(self.limits.linger_timeout):
                try:
                    await stream.send_eof()
                    drained = 0
                    while drained < 64 * self.limits.read_size:
                        data = await stream.receive_some(self.limits.read_size)
                        if not data:
                            break
                        drained += len(data)
                except _STREAM_ERRORS:
                    pass
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(self.limits.linger_timeout),
            contextlib.suppress(*_STREAM_ERRORS),
        ):
            await stream.aclose()
        await trio.aclose_forcefully(stream)


class _Upstream:
    """One upstream connection and its h11 client state (reused across cycles)."""

    def __init__(self, key: Hashable, stream: trio.abc.Stream, limits: ProxyLimits) -> None:
        self.key = key
        self.stream = stream
        self.read_size = limits.read_size
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=limits.max_header_bytes)
        self.reused = False
        #: Response bytes received in this cycle (0: the connection may just be stale).
        self.received = 0
        self.idle_since = 0.0

    async def send(self, event: h11.Event) -> None:
        try:
            data = self.conn.send(event)
            if data:
                await self.stream.send_all(data)
        except (h11.LocalProtocolError, *_STREAM_ERRORS) as exc:
            raise _UpstreamFailed(_describe(exc)) from exc

    async def send_head(self, head: h11.Request, wire: bytes, *, end: bool) -> None:
        """Send request head ``wire``; ``head`` (its method and framing) tells h11.

        ``end``: the request has no body (its end is sent too).
        """
        try:
            self.conn.send(head)
            if end:
                self.conn.send(_END)
            await self.stream.send_all(wire)
        except (h11.LocalProtocolError, *_STREAM_ERRORS) as exc:
            raise _UpstreamFailed(_describe(exc)) from exc

    def next_event_nowait(self) -> h11.Event | None:
        """The next event if it needs no I/O, else ``None``."""
        try:
            event = self.conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise _UpstreamFailed(f"malformed response: {exc}") from exc
        if isinstance(event, h11.Event):
            return event
        if event is h11.PAUSED:
            raise _UpstreamFailed("unexpected data after the response")
        return None

    async def next_event(self, *, buffered: bool = True) -> h11.Event:
        """The next event, reading as needed.

        ``buffered=False``: nothing was received since the request went out
        (h11's buffer is empty: see :attr:`reusable`), so asking h11 first
        would only get ``NEED_DATA`` back.
        """
        while True:
            if buffered:
                event = self.next_event_nowait()
                if event is not None:
                    return event
            buffered = True
            try:
                data = await self.stream.receive_some(self.read_size)
            except _STREAM_ERRORS as exc:
                raise _UpstreamFailed(_describe(exc)) from exc
            self.received += len(data)
            self.conn.receive_data(bytes(data))

    @property
    def reusable(self) -> bool:
        """The exchange ended cleanly, and nothing beyond the response arrived.

        Bytes after the response in the same read would otherwise be taken
        for the response to the next request sent on this connection (another
        client's, from the pool): a response that was never asked for.
        """
        return (self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE
                and not self.conn.trailing_data[0])

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def _is_stale(stream: trio.abc.Stream) -> bool:
    """True if an idle connection can no longer be used (without blocking).

    A tunnel stream knows whether its peer closed it; a socket is stale when
    it is readable while idle (EOF, reset or unsolicited bytes: never safe).
    """
    if isinstance(stream, TunnelStream):
        return stream.peer_closed or not stream.session.is_open
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        return False
    try:
        poller = select.poll()
        poller.register(stream.socket.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class _Pool:
    """Idle upstream connections, bounded in number and age.

    Tables are changed synchronously; connections to close are returned to
    the caller, which closes them afterwards (bookkeeping before I/O).
    """

    def __init__(self, limits: ProxyLimits) -> None:
        self.limits = limits
        self._idle: dict[Hashable, list[_Upstream]] = {}
        self.count = 0
        self.opened = 0

    def take(self, key: Hashable) -> tuple[_Upstream | None, list[_Upstream]]:
        now = trio.current_time()
        dead = self._expire(now)
        conns = self._idle.get(key, [])
        found = None
        while conns:
            conn = conns.pop()  # most recently used first
            self.count -= 1
            if _is_stale(conn.stream):
                dead.append(conn)
                continue
            found = conn
            break
        if not conns:
            self._idle.pop(key, None)
        return found, dead

    def put(self, conn: _Upstream) -> list[_Upstream]:
        now = trio.current_time()
        dead = self._expire(now)
        if self.limits.max_idle_connections == 0:
            return [*dead, conn]
        conn.conn.start_next_cycle()
        conn.reused = True
        conn.received = 0
        conn.idle_since = now
        self._idle.setdefault(conn.key, []).append(conn)
        self.count += 1
        while self.count > self.limits.max_idle_connections:
            key = min(self._idle, key=lambda k: self._idle[k][0].idle_since)
            dead.append(self._idle[key].pop(0))
            self.count -= 1
            if not self._idle[key]:
                del self._idle[key]
        return dead

    def _expire(self, now: float) -> list[_Upstream]:
        dead: list[_Upstream] = []
        horizon = now - self.limits.pool_idle_timeout
        for key in list(self._idle):
            conns = self._idle[key]
            if conns[0].idle_since >= horizon:  # oldest first (put appends): none expired
                continue
            keep = [c for c in conns if c.idle_since >= horizon]
            if len(keep) != len(conns):
                dead.extend(c for c in conns if c.idle_since < horizon)
                self.count -= len(conns) - len(keep)
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]
        return dead

    def drain(self) -> list[_Upstream]:
        dead = [c for conns in self._idle.values() for c in conns]
        self._idle.clear()
        self.count = 0
        return dead


async def _close_all(conns: Iterable[_Upstream]) -> None:
    for conn in conns:
        await conn.aclose()


async def _pipe(a: trio.abc.Stream, b: trio.abc.Stream, read_size: int) -> str | None:
    """Copy bytes both ways until either side ends (EOF or error).

    Returns ``None`` after an EOF, else what failed (the caller then aborts
    both streams instead of closing them). The caller closes both streams.
    """
    failure: str | None = None

    async def copy(src: trio.abc.Stream, dst: trio.abc.Stream, scope: trio.CancelScope) -> None:
        nonlocal failure
        try:
            while data := await src.receive_some(read_size):
                await dst.send_all(data)
        except _STREAM_ERRORS as exc:
            failure = failure or _describe(exc)
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(copy, a, b, nursery.cancel_scope)
        nursery.start_soon(copy, b, a, nursery.cancel_scope)
    return failure


def _request_framing(items: list[tuple[bytes, bytes]]) -> bytes | None:
    """The framing header to send upstream, or None for a request without body.

    ``items``: the request's headers as h11 validated them, names lower-cased
    (so Transfer-Encoding, if any, is ``chunked``).
    """
    length = None
    for name, value in items:
        if name == b"transfer-encoding":
            return b"chunked"
        if name == b"content-length":
            length = value
    return length


def _origin_form(target: bytes, method: bytes) -> bytes:
    if target.startswith(b"/") or (target == b"*" and method == b"OPTIONS"):
        return target
    if target.lower().startswith((b"http://", b"https://")):  # absolute-form
        parts = urlsplit(target.decode("ascii", "replace"))
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return path.encode("ascii", "replace")
    raise _Answer(400, "bad request: unsupported request-target form")


class _Exchange:
    """One request being forwarded: the shared state of its two pump tasks."""

    def __init__(
        self, down: _Downstream, up: _Upstream, upgrade: bytes | None, deadline: float
    ) -> None:
        self.down = down
        self.up = up
        self.upgrade = upgrade
        self.error: BaseException | None = None
        #: The response timeout is its deadline (until the response head
        #: arrives); a client's close or a failure of the request pump cancels it.
        self.scope = trio.CancelScope(deadline=deadline)

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.scope.cancel()


@dataclass(slots=True)
class _End:
    """How :meth:`HTTPForwarder.serve` ends a downstream connection."""

    #: Drain unread request bytes before closing (an error answer was sent).
    linger: bool = False
    #: Abort (reset) instead of closing, with this reason.
    aborted: str | None = None


class HTTPForwarder:
    """The h11 forwarding core: serve downstream connections with a router.

    ``serve(stream, router)`` handles one downstream connection until it
    closes, forwarding each request as the router says. Upstream connections
    are pooled across all downstream connections of this forwarder.
    """

    def __init__(self, limits: ProxyLimits = DEFAULT_PROXY_LIMITS) -> None:
        self.limits = limits
        self._pool = _Pool(limits)
        self._active = 0
        self._requests = 0
        self._aborted = 0

    def statistics(self) -> ProxyStatistics:
        return ProxyStatistics(
            active_requests=self._active,
            requests=self._requests,
            idle_connections=self._pool.count,
            connections_opened=self._pool.opened,
            aborted_responses=self._aborted,
        )

    async def aclose(self) -> None:
        """Close every idle pooled connection. Idempotent; never blocks."""
        await _close_all(self._pool.drain())

    async def serve(
        self,
        stream: trio.abc.Stream,
        router: Router,
        *,
        client: str | None = None,
        scheme: str = "http",
    ) -> None:
        """Serve HTTP/1.1 requests on ``stream`` until it closes; then close it.

        Never raises for anything the downstream or upstream does; on
        cancellation both connections are closed. A response that cannot be
        completed (the upstream or the tunnel failed after its head was sent,
        or cancellation in the middle of it) aborts ``stream`` (see
        :func:`revdial.abort`) instead of closing it. The connection's reader
        task runs in a nursery of this call and ends before it returns.
        """
        down = _Downstream(stream, self.limits, client)
        end = _End()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(down.read_ahead)
                try:
                    await self._serve_requests(down, router, client, scheme, end)
                finally:
                    nursery.cancel_scope.cancel()  # the reader
        finally:
            if end.aborted is not None:
                # A tunnel stream's peer sees this text as the reset's reason.
                await abort(stream, end.aborted)
            else:
                await down.close(linger=end.linger)

    async def _serve_requests(
        self, down: _Downstream, router: Router, client: str | None, scheme: str, end: _End
    ) -> None:
        """The request cycles of :meth:`serve`; how the connection ends goes to ``end``."""
        # One scope for the whole connection; its deadline is the idle timeout
        # while a request head is awaited, none otherwise (no scope per request).
        idle = trio.CancelScope()
        try:
            with idle:
                while True:
                    idle.deadline = trio.current_time() + self.limits.idle_timeout
                    try:
                        request = await down.read_request()
                    except _Answer as exc:
                        end.linger = True
                        await down.answer(exc)
                        return
                    if request is None:
                        return
                    idle.deadline = math.inf
                    try:
                        keep = await self._cycle(down, request, router, client, scheme)
                    except _Answer as exc:
                        end.linger = True
                        await down.answer(exc)
                        return
                    if not keep or not down.end_cycle():
                        # An early answer (413, 401 from upstream) left the body unread.
                        end.linger = down.conn.their_state is h11.SEND_BODY
                        return
        except _DownstreamGone:
            pass
        except _Aborted as exc:
            end.aborted = f"revdial: response aborted: {exc}"[:200]
        except BaseException:
            if down.mid_response:  # cancelled in the middle of a response
                end.aborted = "revdial: response aborted: cancelled"
            raise

    async def _cycle(
        self,
        down: _Downstream,
        request: h11.Request,
        router: Router,
        client: str | None,
        scheme: str,
    ) -> bool:
        """Forward one request; True if the downstream connection may go on."""
        if request.method == b"CONNECT":
            raise _Answer(405, "CONNECT is not supported",
                          [("Allow", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")])
        target = _origin_form(request.target, request.method)
        items = [(n.lower(), v) for n, v in request.headers.raw_items()]
        upgrade: bytes | None = None
        connection = _comma_tokens(items, b"connection")
        # As h11 decides it: the response says Connection: close otherwise.
        down.keep_alive = request.http_version >= b"1.1" and b"close" not in connection
        if b"upgrade" in connection:
            values = [v for n, v in items if n == b"upgrade"]
            upgrade = b", ".join(values) if values else None
        route = router(
            ProxyRequest(
                method=request.method,
                target=target,
                headers=end_to_end_headers(items),
                http_version=request.http_version,
                client=client,
                scheme=scheme,
            )
        )
        if route.check is not None:
            await route.check()
        framing = _request_framing(items)
        extra: list[tuple[bytes, bytes]] = []
        if framing == b"chunked":
            extra.append((b"transfer-encoding", b"chunked"))
        elif framing is not None:
            extra.append((b"content-length", framing))
        if upgrade is not None:
            extra += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
        wire = _request_head(request.method, route.target, [*route.headers, *extra])
        # What h11's client side needs to frame the exchange (method, framing,
        # upgrade): it tracks the state; the bytes sent are ``wire``.
        head = None if extra else _BARE_HEADS.get(request.method)
        if head is None:
            try:
                head = h11.Request(method=request.method, target=b"/",
                                   headers=[(b"host", b"-"), *extra])
            except h11.LocalProtocolError as exc:  # cannot happen: h11 parsed all of it
                raise _Answer(400, f"bad request: {exc}") from None
        has_body = framing not in (None, b"0")
        if not has_body:
            # Consume the (empty) body now: a retry must not need the downstream.
            event = await down.next_body_event()
            if not isinstance(event, h11.EndOfMessage):
                raise _Answer(400, "bad request: unexpected body")
        self._requests += 1
        self._active += 1
        try:
            for attempt in (1, 2):
                up, dead = self._pool.take(route.key)
                await _close_all(dead)
                if up is None:
                    with trio.move_on_after(self.limits.connect_timeout) as scope:
                        stream = await route.connect()
                    if scope.cancelled_caught:
                        raise _Answer(
                            504, f"upstream did not answer within {self.limits.connect_timeout:g} s"
                        )
                    self._pool.opened += 1
                    up = _Upstream(route.key, stream, self.limits)
                may_retry = attempt == 1 and up.reused and not has_body
                try:
                    return await self._exchange(down, up, head, wire, route, has_body=has_body,
                                                upgrade=upgrade, may_retry=may_retry)
                except _Retry:
                    log.debug("pooled connection to %s was closed; retrying", route.key)
                    continue
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            self._active -= 1

    async def _exchange(
        self,
        down: _Downstream,
        up: _Upstream,
        head: h11.Request,
        wire: bytes,
        route: Route,
        *,
        has_body: bool,
        upgrade: bytes | None,
        may_retry: bool,
    ) -> bool:
        x = _Exchange(down, up, upgrade, trio.current_time() + self.limits.response_timeout)
        keep = False
        done = False
        try:
            try:
                await up.send_head(head, wire, end=not has_body)
            except _UpstreamFailed as exc:
                if may_retry:
                    raise _Retry from exc
                raise route.classify(exc) from None
            with x.scope:
                if has_body:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump_request, x)
                        keep = await self._respond_or_fail(x, route, may_retry)
                        nursery.cancel_scope.cancel()
                else:
                    if upgrade is None:
                        down.watch(self._client_gone(x))
                    keep = await self._respond_or_fail(x, route, may_retry)
            down.unwatch()
            if x.error is None and x.scope.cancelled_caught:
                x.error = _Answer(504, "upstream sent no response within "
                                       f"{self.limits.response_timeout:g} s")
            if x.error is not None:
                raise x.error
            done = True
            return keep and down.conn.their_state is h11.DONE
        finally:
            if done and up.reusable and down.responded:
                await _close_all(self._pool.put(up))
            elif done or isinstance(x.error, _ClientClosed):
                await up.aclose()
            else:
                # The exchange failed: a truncated request body (or upgraded
                # stream) must not look complete upstream either.
                await abort(up.stream)

    @staticmethod
    def _client_gone(x: _Exchange) -> Callable[[], None]:
        return lambda: x.fail(_ClientClosed("the client closed the connection"))

    async def _pump_request(self, x: _Exchange) -> None:
        """Downstream request body -> upstream, then have the reader watch for EOF."""
        try:
            while True:
                event = await x.down.next_body_event()
                if isinstance(event, h11.Data):
                    await x.up.send(h11.Data(data=event.data))
                else:
                    # Trailers of a chunked body pass on (the upstream request is
                    # chunked too); a Content-Length body has none.
                    await x.up.send(h11.EndOfMessage(headers=_trailers(event)))
                    break
        except _UpstreamFailed:
            # The upstream stopped taking the body (it may have answered
            # already, e.g. 413): the response side reports what happened.
            return
        except (_Answer, _DownstreamGone) as exc:
            x.fail(exc)
            return
        if x.upgrade is None:
            x.down.watch(self._client_gone(x))

    async def _respond_or_fail(self, x: _Exchange, route: Route, may_retry: bool) -> bool:
        try:
            return await self._respond(x, route, may_retry)
        except (_Answer, _Retry, _DownstreamGone, _Aborted) as exc:
            x.fail(exc)
            return False

    async def _respond(self, x: _Exchange, route: Route, may_retry: bool) -> bool:
        """Upstream response -> downstream. True if both may be reused."""
        down, up = x.down, x.up
        try:
            buffered = False  # a fresh or pooled connection has nothing buffered
            while True:
                event = await up.next_event(buffered=buffered)
                buffered = True
                if isinstance(event, h11.InformationalResponse):
                    if event.status_code == 101:
                        break
                    if down.http11:
                        await down.send(
                            h11.InformationalResponse(
                                status_code=event.status_code,
                                headers=end_to_end_headers(event.headers.raw_items()),
                                reason=event.reason,
                            )
                        )
                    continue
                if isinstance(event, h11.Response):
                    break
                raise _UpstreamFailed(f"unexpected {type(event).__name__} before a response")
        except _UpstreamFailed as exc:
            if may_retry and up.received == 0:
                raise _Retry from exc
            raise route.classify(exc) from None
        x.scope.deadline = math.inf  # the response timeout ends with the head
        self._log_response(route, event)
        if isinstance(event, h11.InformationalResponse):
            await self._switch(x, route, event)
            return False
        # The head is written by hand from what h11 parsed (and validated); the
        # body's bytes pass as received unless they must be (re-)chunked.
        head, mode = _response_head(event, down.method, http11=down.http11,
                                    keep_alive=down.keep_alive)
        down.responded = down.raw_body = True
        # Everything already received goes out in one write: a small response
        # costs one send (one tunnel frame) instead of one per h11 event.
        out = [head]
        size = len(head)
        while True:
            try:
                body = up.next_event_nowait() if size < self.limits.read_size else None
                if body is None:
                    if out:
                        await down.send_raw(out[0] if len(out) == 1 else b"".join(out))
                        out.clear()
                        size = 0
                    body = await up.next_event()
            except _UpstreamFailed as exc:
                raise self._abort(route, f"upstream failed mid-response: {exc}") from exc
            if isinstance(body, h11.Data):
                data = body.data
                if mode == _BODY_CHUNKED:
                    if data:  # an empty chunk would end the body
                        out += (b"%x\r\n" % len(data), data, b"\r\n")
                elif mode == _BODY_AS_IS:
                    out.append(data)
                else:  # h11 frames the upstream side alike: cannot happen
                    raise self._abort(route, "a body in a response that has none")
                size += len(data)
            elif isinstance(body, h11.EndOfMessage):
                if up.conn.trailing_data[0]:  # then not reused: see _Upstream.reusable
                    log.warning("%s %s: bytes after the response; the connection is closed",
                                route.key, loggable_target(route.target))
                if mode == _BODY_CHUNKED:
                    # Trailers pass on (hop-by-hop ones removed) when the
                    # client's response is chunked; otherwise they are dropped.
                    out.append(_last_chunk(_trailers(body)))
                await down.send_raw(b"".join(out))
                down.raw_body = False
                down.raw_done = True
                return True
            else:
                raise self._abort(route, f"unexpected {type(body).__name__} in a response")

    def _abort(self, route: Route, why: str) -> _Aborted:
        """Count and log (once) a response cut off mid-way; the caller raises it."""
        self._aborted += 1
        log.warning("%s %s: response aborted: %s", route.key, loggable_target(route.target),
                    why)
        return _Aborted(why)

    @staticmethod
    def _log_response(route: Route, event: h11.Event) -> None:
        if log.isEnabledFor(logging.DEBUG):
            status = getattr(event, "status_code", "?")
            log.debug("%s %s -> %s", route.key, loggable_target(route.target), status)

    async def _switch(
        self, x: _Exchange, route: Route, event: h11.InformationalResponse
    ) -> None:
        """After the upstream's 101: answer 101 downstream, then splice raw bytes."""
        down, up = x.down, x.up
        if x.upgrade is None:
            raise _Answer(502, "upstream switched protocols without being asked")
        raw = list(event.headers.raw_items())
        headers = end_to_end_headers(raw)
        upgrade = b", ".join(v for n, v in raw if n.lower() == b"upgrade") or x.upgrade
        headers += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
        await down.send(h11.InformationalResponse(status_code=101, headers=headers,
                                                  reason=event.reason))
        await down.stop_reader()  # the splice reads the stream itself
        from_up, _ = up.conn.trailing_data
        from_down = down.conn.trailing_data[0] + bytes(down.buf)
        down.buf.clear()
        try:
            if from_up:
                await down.stream.send_all(from_up)
            if from_down:
                await up.stream.send_all(from_down)
            failure = await _pipe(down.stream, up.stream, self.limits.read_size)
        except _STREAM_ERRORS as exc:
            failure = _describe(exc)
        if failure is not None:
            raise self._abort(route, f"upgraded connection failed: {failure}")


# --- the agent's proxy ---------------------------------------------------------


class TokenFile:
    """A bearer token read from a file, re-read whenever the file changes.

    Change is detected per use by ``os.stat`` (inode, size, modification
    time): an atomic replace (a Kubernetes projected service-account token
    is swapped by symlink) or an in-place rewrite are both seen. If the file
    becomes unreadable the last good token is kept (and a warning logged).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._key: tuple[int, int, int] | None = None
        self._token: str | None = None
        self._warned = False
        if self.current() is None:
            raise ValueError(f"token file {self.path} is empty or unreadable")

    def current(self) -> str | None:
        """The token now in the file (``None`` if it was never readable)."""
        try:
            st = os.stat(self.path)
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            if key != self._key:
                with open(self.path, encoding="utf-8") as f:
                    token = f.read().strip()
                if not token or any(c in token for c in "\r\n\0"):
                    raise ValueError("not a single-line token")
                self._token, self._key, self._warned = token, key, False
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            if not self._warned:
                log.warning("token file %s: %s (keeping the last token read)", self.path,
                            type(exc).__name__)
                self._warned = True
        return self._token


def make_upstream_ssl_context(
    ca_file: str | None = None, *, insecure: bool = False
) -> ssl.SSLContext:
    """A client TLS context for the upstream: system CAs, only ``ca_file``, or none."""
    if insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    # With a cafile, create_default_context loads that file only, not the system store.
    return ssl.create_default_context(cafile=ca_file)


class ReverseProxy:
    """The agent's HTTP/1.1 reverse proxy to one upstream (an API server).

    Serve it on the reserved virtual target::

        proxy = ReverseProxy("https://10.0.0.1:6443", ssl_context=ctx,
                             token_file="/var/run/secrets/.../token")
        agent = Agent(url, ..., services={PROXY_TARGET: proxy})

    Each tunnel stream the server opens to :data:`PROXY_TARGET` is one
    downstream HTTP/1.1 connection (``await proxy(stream)`` serves it until
    it closes). Requests go to ``upstream`` (``http://`` or ``https://``,
    an optional path prefix is prepended) with Host set to the upstream's,
    hop-by-hop headers removed, X-Forwarded-For/-Proto/-Host added (values
    the server's front door set are kept: it is the edge; ``forwarded_for``
    is appended to X-Forwarded-For if given) and, with ``token_file``, the
    caller's Authorization replaced by ``Bearer <token>``, re-read whenever
    the file changes. ``connect`` replaces how upstream connections are
    opened (tests use memory streams).

    :meth:`aclose` (or ``async with proxy:``) closes the pooled upstream
    connections; the proxy owns no task, so it needs no nursery.
    """

    def __init__(
        self,
        upstream: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        token_file: str | os.PathLike[str] | None = None,
        forwarded_for: str | None = None,
        limits: ProxyLimits = DEFAULT_PROXY_LIMITS,
        connect: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream must be http[s]://HOST[:PORT], not {upstream!r}")
        if parts.query or parts.fragment or parts.username:
            raise ValueError(f"upstream {upstream!r} must not have a query, fragment or user")
        self.upstream = upstream
        self._host = parts.hostname
        default_port = 443 if parts.scheme == "https" else 80
        self._port = parts.port or default_port
        host = f"[{self._host}]" if ":" in self._host else self._host
        host = host if self._port == default_port else f"{host}:{self._port}"
        self._host_header = host.encode()
        self._prefix = parts.path.rstrip("/").encode()
        self._ssl_context = (
            (ssl_context or ssl.create_default_context()) if parts.scheme == "https" else None
        )
        self._token = TokenFile(token_file) if token_file is not None else None
        self._forwarded_for = forwarded_for
        self._connect = connect or self._open_upstream
        self._route_connect = self._connect_upstream
        self._forwarder = HTTPForwarder(limits)
        self.limits = limits

    def __repr__(self) -> str:
        return f"<ReverseProxy to {self.upstream}>"

    def statistics(self) -> ProxyStatistics:
        return self._forwarder.statistics()

    async def __call__(self, stream: trio.abc.Stream) -> None:
        """Serve one downstream connection (a tunnel stream) until it closes."""
        await self._forwarder.serve(stream, self._route)

    async def aclose(self) -> None:
        """Close idle upstream connections (requests in flight are unaffected).

        Idempotent; never blocks. The proxy stays usable (new requests open
        new connections).
        """
        await self._forwarder.aclose()

    async def __aenter__(self) -> ReverseProxy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()

    def _route(self, request: ProxyRequest) -> Route:
        headers = [(n, v) for n, v in request.headers if n != b"host"]
        if self._token is not None:
            headers = [(n, v) for n, v in headers if n != b"authorization"]
        headers.insert(0, (b"host", self._host_header))
        headers = with_forwarded(
            headers,
            client=self._forwarded_for,
            proto=request.scheme,
            host=request.header(b"host"),
            replace=False,
        )
        if self._token is not None:
            token = self._token.current()
            if token is not None:
                headers.append((b"authorization", b"Bearer " + token.encode()))
        target = request.target if request.target == b"*" else self._prefix + request.target
        return Route(key=self.upstream, connect=self._route_connect, target=target,
                     headers=headers, classify=self._classify)

    def _classify(self, exc: BaseException) -> _Answer:
        return _Answer(502, f"upstream {self.upstream} failed: {_describe(exc)}")

    async def _connect_upstream(self) -> trio.abc.Stream:
        """Open an upstream connection; failures become ``_Answer(502)``.

        The caller bounds it with ``connect_timeout`` (-> 504).
        """
        try:
            return await self._connect()
        except OSError as exc:
            raise _Answer(502, f"upstream {self.upstream} unreachable: {_describe(exc)}") from None
        except (trio.BrokenResourceError, TunnelError) as exc:
            raise _Answer(
                502, f"connection to upstream {self.upstream} failed: {_describe(exc)}"
            ) from None

    async def _open_upstream(self) -> trio.abc.Stream:
        """TCP, and TLS for ``https://``, to the upstream."""
        tcp = await trio.open_tcp_stream(self._host, self._port)
        if self._ssl_context is None:
            return tcp
        tls = trio.SSLStream(tcp, self._ssl_context, server_hostname=self._host,
                             https_compatible=True)
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        return tls
