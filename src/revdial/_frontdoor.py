"""The server's HTTP front door: users reach clusters (and HTTP services)
behind connected agents.

Routes
------
``/k8s/clusters/{client_key}/{path}`` (Rancher's URL shape)
    The request -- method, ``/{path}``, query, headers and streamed body --
    is forwarded over a tunnel stream to the agent's reverse proxy on the
    reserved virtual target ``tcp/revdial.proxy:0`` (see
    :mod:`revdial._proxy`), which sends it on to its upstream (the API
    server). WebSocket and SPDY upgrades (``kubectl exec``, ``attach``,
    ``port-forward``) are spliced through after the 101.

``/client/{client_key}/{scheme}/{host}/{path}``
    The request is sent, as HTTP/1.1, straight to ``host`` (``HOST`` or
    ``HOST:PORT``, default port 80) through a plain tunnel dial of
    ``tcp/HOST:PORT``: the agent's ``--allow`` policy decides. Only
    ``scheme`` ``http`` is supported (the front door does not speak TLS to
    targets behind the agent); anything else is answered 400.

Authentication
--------------
Users present their own bearer token (``Authorization: Bearer TOKEN``),
checked against :class:`UserTokens` (``--user-tokens FILE``: lines of
``TOKEN CLIENT_KEY[,CLIENT_KEY...]`` or ``TOKEN *``). No token or an unknown
one: 401; a token that may not reach that client key: 403. Tokens are
compared in constant time (SHA-256 digests, every entry compared), never
logged, and the user's ``Authorization`` header is removed before the
request is forwarded: neither the agent nor the upstream ever sees it (the
agent authenticates to its upstream with its own ``--upstream-token-file``).
``Impersonate-*`` headers are removed too: they would let a user borrow the
rights of whoever the agent's identity may impersonate.

Answers of the front door itself
--------------------------------
=====  ================================================================
401    no bearer token, or an unknown one (with ``WWW-Authenticate``)
403    the token may not reach that client key
404    a path that is neither route
503    the client key has no connected agent (the body says so)
502    the agent refused the dial (no ``--upstream``, or ``--allow``
       does not permit the target) or could not reach the target
504    the agent's dial timed out
=====  ================================================================

Headers: X-Forwarded-For gets the user's address appended; X-Forwarded-Proto
and X-Forwarded-Host are set from what the front door saw (replacing
anything the user sent). Upstream connections (tunnel streams) are pooled per
client key and reused for later requests.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote

import trio

from ._agent import split_host_port
from ._errors import (
    DialError,
    DialRefusedError,
    DialSessionLostError,
    DialTimeoutError,
    NoSuchClientError,
    TunnelError,
)
from ._proxy import (
    DEFAULT_PROXY_LIMITS,
    PROXY_ADDRESS,
    PROXY_PROTO,
    HTTPForwarder,
    ProxyLimits,
    ProxyRequest,
    ProxyStatistics,
    Route,
    _Answer,
    _describe,
    with_forwarded,
)
from ._server import Server, bound_addresses

__all__ = [
    "ALL_CLIENTS",
    "FrontDoor",
    "UserTokens",
    "UserTokensFile",
    "make_kubeconfig",
    "read_user_tokens",
]

log = logging.getLogger("revdial.frontdoor")

#: A user token granted every client key (``TOKEN *``).
ALL_CLIENTS = "*"

_K8S_PREFIX = b"/k8s/clusters/"
_CLIENT_PREFIX = b"/client/"


@dataclass(frozen=True, slots=True)
class _Grant:
    digest: bytes
    clients: frozenset[str] | None  # None: every client


class UserTokens:
    """The front door's users: bearer tokens, each with the client keys it may reach.

    ``UserTokens({"tok1": ["laptop", "edge"], "admin-tok": "*"})``. Only
    SHA-256 digests are kept; lookups compare against every entry in
    constant time.
    """

    def __init__(self, grants: Mapping[str, Iterable[str] | str]) -> None:
        self._grants: list[_Grant] = []
        for token, clients in grants.items():
            if not token:
                raise ValueError("empty user token")
            keys = frozenset([clients] if isinstance(clients, str) else clients)
            if not keys:
                raise ValueError("a user token needs at least one client key (or *)")
            self._grants.append(
                _Grant(
                    hashlib.sha256(token.encode()).digest(),
                    None if ALL_CLIENTS in keys else keys,
                )
            )

    def __len__(self) -> int:
        return len(self._grants)

    def __repr__(self) -> str:  # never the tokens
        return f"<UserTokens: {len(self)} tokens>"

    def authorize(self, token: str, client_key: str) -> bool | None:
        """``None``: unknown token (401); ``False``: not for that client (403); ``True``."""
        digest = hashlib.sha256(token.encode()).digest()
        found: _Grant | None = None
        for grant in self._grants:  # no early exit: the time does not tell which matched
            if hmac.compare_digest(digest, grant.digest):
                found = grant
        if found is None:
            return None
        return found.clients is None or client_key in found.clients


def read_user_tokens(path: str | os.PathLike[str]) -> UserTokens:
    """Read ``TOKEN CLIENT_KEY[,CLIENT_KEY...]`` (or ``TOKEN *``) lines.

    Blank lines and ``#`` comments are ignored. Errors name the line, never
    its content (it holds a secret).
    """
    grants: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            keys = [k for k in parts[1].split(",") if k] if len(parts) == 2 else []
            if not keys:
                raise ValueError(f"{path}:{lineno}: expected 'TOKEN CLIENT_KEY[,CLIENT_KEY...]'")
            grants.setdefault(parts[0], []).extend(keys)
    if not grants:
        raise ValueError(f"{path}: no user tokens")
    return UserTokens(grants)


class UserTokensFile:
    """The front door's users, read from a file and re-read when it changes.

    Like :func:`read_user_tokens`, but each lookup first checks the file
    (``os.stat``: inode, size, modification time; a syscall, no read) and
    re-reads it when it changed, so an added token works and a removed one
    stops working at the next request, with no restart and no session
    dropped. :meth:`reload` re-reads at once (the CLI calls it on SIGHUP). A
    file that becomes unreadable or malformed keeps the last good set, with
    one warning naming the line (never its content).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._key: tuple[int, int, int] | None = None
        self._failed_key: tuple[int, int, int] | None = None
        self.tokens = read_user_tokens(self.path)  # fails loudly at startup
        self._key = self._stat()

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:  # never the tokens
        return f"<UserTokensFile {self.path}: {len(self)} tokens>"

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def reload(self) -> bool:
        """Re-read the file now; False (and the last good set kept) if it is bad."""
        key = self._stat()
        try:
            tokens = read_user_tokens(self.path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            if key != self._failed_key:
                log.warning("user tokens %s: %s (keeping the %d tokens read before)",
                            self.path, exc if isinstance(exc, ValueError) else
                            type(exc).__name__, len(self.tokens))
                self._failed_key = key
            self._key = key
            return False
        self.tokens, self._key, self._failed_key = tokens, key, None
        log.info("user tokens %s: %d tokens", self.path, len(tokens))
        return True

    def authorize(self, token: str, client_key: str) -> bool | None:
        """As :meth:`UserTokens.authorize`, with the file as it is now."""
        if self._stat() != self._key:
            self.reload()
        return self.tokens.authorize(token, client_key)


def _bearer(request: ProxyRequest) -> str | None:
    values = [v for n, v in request.headers if n == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _unauthorized(message: str) -> _Answer:
    return _Answer(401, message, [("WWW-Authenticate", 'Bearer realm="revdial"')])


class FrontDoor:
    """HTTP/1.1 front door of a :class:`~revdial.Server` (see the module docstring).

    ``await nursery.start(front_door.serve, host, port)`` listens and
    reports the bound addresses; :meth:`handle` serves one already-accepted
    connection (any ``trio.abc.Stream``). With ``ssl_context`` it serves
    HTTPS. The front door owns no background task.
    """

    def __init__(
        self,
        server: Server,
        users: UserTokens | UserTokensFile,
        *,
        limits: ProxyLimits = DEFAULT_PROXY_LIMITS,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.server = server
        self.users = users
        self.limits = limits
        self._ssl_context = ssl_context
        self._forwarder = HTTPForwarder(limits)
        #: Bound ``(host, port)`` pairs once :meth:`serve` has started.
        self.addresses: list[tuple[str, int]] = []

    @property
    def port(self) -> int:
        if not self.addresses:
            raise RuntimeError("front door is not listening yet")
        return self.addresses[0][1]

    def statistics(self) -> ProxyStatistics:
        return self._forwarder.statistics()

    async def aclose(self) -> None:
        """Close the pooled tunnel streams. Idempotent."""
        await self._forwarder.aclose()

    async def serve(
        self,
        host: str | None,
        port: int,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` and serve users until cancelled."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.addresses = bound_addresses(listeners)
        scheme = "https" if self._ssl_context else "http"
        log.info("front door on %s",
                 ", ".join(f"{scheme}://{_fmt(h, p)}" for h, p in self.addresses))
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle_tcp, listeners)
                task_status.started(self.addresses)
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def _handle_tcp(self, tcp: trio.SocketStream) -> None:
        try:
            client: str | None = str(tcp.socket.getpeername()[0])
        except OSError:
            client = None
        stream: trio.abc.Stream = tcp
        if self._ssl_context is not None:
            stream = trio.SSLStream(tcp, self._ssl_context, server_side=True,
                                    https_compatible=True)
        await self.handle(stream, client=client)

    async def handle(self, stream: trio.abc.Stream, *, client: str | None = None) -> None:
        """Serve one user connection until it closes (then close it).

        Never raises for what the user, the agent or the upstream does: one
        bad connection must never take the server down.
        """
        scheme = "https" if isinstance(stream, trio.SSLStream) else "http"
        try:
            await self._forwarder.serve(stream, self._route, client=client, scheme=scheme)
        except Exception:
            log.exception("front door: unexpected error serving %s", client or "a connection")
            await trio.aclose_forcefully(stream)

    # --- routing ------------------------------------------------------------

    def _route(self, request: ProxyRequest) -> Route:
        path, sep, query = request.target.partition(b"?")
        suffix = sep + query
        if path.startswith(_K8S_PREFIX):
            key_raw, _, rest = path[len(_K8S_PREFIX):].partition(b"/")
            key = unquote(key_raw.decode("latin-1"))
            self._authorize(request, key)
            return self._to_agent(request, key, PROXY_PROTO, PROXY_ADDRESS, b"/" + rest + suffix,
                                  host=b"revdial.proxy")
        if path.startswith(_CLIENT_PREFIX):
            parts = path[len(_CLIENT_PREFIX):].split(b"/", 3)
            if len(parts) < 3 or not all(parts[:3]):
                raise _Answer(404, "not found: use /client/{client_key}/http/{host[:port]}/{path}")
            key = unquote(parts[0].decode("latin-1"))
            self._authorize(request, key)
            scheme = parts[1].decode("latin-1").lower()
            if scheme != "http":
                raise _Answer(400, f"scheme {scheme!r} is not supported here: only http")
            host = unquote(parts[2].decode("latin-1"))
            has_port = "]:" in host if host.startswith("[") else ":" in host
            address = host if has_port else f"{host}:80"
            try:
                split_host_port(address)
            except ValueError as exc:
                raise _Answer(400, f"bad target host: {exc}") from None
            rest = parts[3] if len(parts) == 4 else b""
            host_header = host.removesuffix(":80").encode("latin-1")
            return self._to_agent(request, key, "tcp", address, b"/" + rest + suffix,
                                  host=host_header)
        raise _Answer(404, "not found: use /k8s/clusters/{client_key}/{path} or "
                      "/client/{client_key}/http/{host[:port]}/{path}")

    def _authorize(self, request: ProxyRequest, client_key: str) -> None:
        token = _bearer(request)
        if token is None:
            raise _unauthorized("unauthorized: a bearer token is required")
        allowed = self.users.authorize(token, client_key)
        if allowed is None:
            raise _unauthorized("unauthorized: unknown token")
        if not allowed:
            raise _Answer(403, f"forbidden: this token may not reach {client_key!r}")

    def _to_agent(
        self,
        request: ProxyRequest,
        client_key: str,
        proto: str,
        address: str,
        target: bytes,
        *,
        host: bytes,
    ) -> Route:
        # The agent authenticates upstream with its own token: a user's
        # Impersonate-* headers would borrow that identity's rights, so they stop here.
        headers = [(n, v) for n, v in request.headers
                   if n not in (b"authorization", b"host") and not n.startswith(b"impersonate-")]
        headers.insert(0, (b"host", host))
        headers = with_forwarded(
            headers,
            client=request.client,
            proto=request.scheme,
            host=request.header(b"host"),
            replace=True,
        )
        via_proxy = (proto, address) == (PROXY_PROTO, PROXY_ADDRESS)
        what = "the cluster proxy" if via_proxy else f"{proto}/{address}"

        async def connect() -> trio.abc.Stream:
            try:
                return await self.server.dial(
                    client_key, proto, address, connect_timeout=self.limits.connect_timeout
                )
            except DialError as exc:
                raise self._dial_answer(exc, client_key, what, via_proxy) from None
            except TunnelError as exc:
                raise _Answer(502, f"cannot open a stream to {client_key!r}: "
                                   f"{_describe(exc)}") from None

        def classify(exc: BaseException) -> _Answer:
            cause = exc.__cause__
            if isinstance(cause, DialError):  # a plain agent reports dial errors late
                return self._dial_answer(cause, client_key, what, via_proxy)
            return _Answer(502, f"{what} via {client_key!r} failed: {_describe(exc)}")

        return Route(key=(client_key, proto, address), connect=connect, target=target,
                     headers=headers, classify=classify)

    @staticmethod
    def _dial_answer(exc: DialError, client_key: str, what: str, via_proxy: bool) -> _Answer:
        if isinstance(exc, NoSuchClientError | DialSessionLostError):
            return _Answer(503, f"cluster {client_key!r} is not connected (no agent session)")
        if isinstance(exc, DialRefusedError):
            hint = " (is the agent running with --upstream?)" if via_proxy else ""
            return _Answer(502, f"agent {client_key!r} refused {what}{hint}")
        if isinstance(exc, DialTimeoutError):
            return _Answer(504, f"agent {client_key!r} timed out dialling {what}")
        return _Answer(502, f"agent {client_key!r} could not reach {what}: {exc.reason}")


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def make_kubeconfig(
    server_url: str,
    cluster: str,
    token: str,
    *,
    name: str | None = None,
    certificate_authority_data: str | None = None,
    insecure_skip_tls_verify: bool = False,
) -> str:
    """A kubeconfig (YAML) for ``cluster`` through a front door at ``server_url``.

    The cluster's server is ``{server_url}/k8s/clusters/{cluster}``; the user
    authenticates with ``token`` (a front-door user token).
    ``certificate_authority_data`` is the base64 PEM of the front door's CA.
    Values are written as JSON strings, which YAML reads verbatim.
    """
    name = name or cluster
    q = json.dumps
    lines = [
        "apiVersion: v1",
        "kind: Config",
        "clusters:",
        f"- name: {q(name)}",
        "  cluster:",
        f"    server: {q(server_url.rstrip('/') + '/k8s/clusters/' + cluster)}",
    ]
    if certificate_authority_data:
        lines.append(f"    certificate-authority-data: {q(certificate_authority_data)}")
    if insecure_skip_tls_verify:
        lines.append("    insecure-skip-tls-verify: true")
    lines += [
        "users:",
        f"- name: {q(name + '-user')}",
        "  user:",
        f"    token: {q(token)}",
        "contexts:",
        f"- name: {q(name)}",
        "  context:",
        f"    cluster: {q(name)}",
        f"    user: {q(name + '-user')}",
        f"current-context: {q(name)}",
        "",
    ]
    return "\n".join(lines)
