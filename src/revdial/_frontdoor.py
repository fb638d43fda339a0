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

Authentication and identity
---------------------------
Users present their own bearer token (``Authorization: Bearer TOKEN``),
checked against :class:`UserTokens` (``--user-tokens FILE``: lines of
``TOKEN CLIENT_KEY[,CLIENT_KEY...] [user=NAME] [groups=GROUP[,GROUP...]]``;
``*`` for every client key). No token or an unknown one: 401; a token that
may not reach that client key: 403. Tokens are compared in constant time
(SHA-256 digests, every entry compared), never logged, and the user's
``Authorization`` header is removed before the request is forwarded: neither
the agent nor the upstream ever sees it (the agent authenticates to its
upstream with its own ``--upstream-token-file``).

A token mapped to a user (``user=alice``) reaches the cluster as that user,
as Rancher does it: the front door sets ``Impersonate-User: alice`` and one
``Impersonate-Group`` per group on ``/k8s/clusters/...`` requests, so the
cluster's RBAC decides per user while the agent's service account (which
must be allowed to impersonate) authenticates. Any ``Impersonate-*`` header
the user sent is never passed on as is.

``kubectl --as``: a request from a mapped user that carries its own
``Impersonate-User`` (with ``Impersonate-Group``, ``-Uid``, ``-Extra-*``) is
checked with the cluster first -- one ``SubjectAccessReview`` per header,
sent through the same tunnel and the agent's proxy, asking whether *the
mapped user* may ``impersonate`` that user, group, uid or extra (see
:mod:`revdial._impersonation`). Allowed: the request goes on with the
requested identity in place of the mapping's. Denied: 403 with the
``Forbidden`` Status the API server would send (``users "bob" is forbidden:
User "alice" cannot impersonate resource "users" in API group "" at the
cluster scope``), never forwarded. Answers are cached
(``impersonation_cache_ttl``, 5 s; 1,024 entries). A token without ``user=``
acts as the agent's service account (the behaviour of files written before
identities); its impersonation headers are refused with 403, since only the
service account's own, broad, right to impersonate would decide them, and
on ``/client/...`` routes (plain HTTP services) they are refused too.

Answers of the front door itself
--------------------------------
=====  ================================================================
401    no bearer token, or an unknown one (with ``WWW-Authenticate``)
400    malformed ``Impersonate-*`` headers (a group without a user, ...)
403    the token may not reach that client key; ``Impersonate-*``
       headers the cluster denied (a Kubernetes Status), or sent with a
       token that maps to no user, or on a ``/client/`` route
404    a path that is neither route
408    a request head not complete ``ProxyLimits.header_timeout`` after
       its first byte (slow-loris)
503    the client key has no connected agent (the body says so)
502    the agent refused the dial (no ``--upstream``, or ``--allow``
       does not permit the target) or could not reach the target; or the
       cluster did not answer an impersonation check with a review
504    the agent's dial timed out, or an impersonation check took longer
       than ``ProxyLimits.connect_timeout``
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
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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
from ._impersonation import (
    ImpersonationRequest,
    ReviewCache,
    ReviewError,
    attributes,
    forbidden_status,
    parse_impersonation,
    review,
    review_body,
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
    "Identity",
    "UserGrant",
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
class Identity:
    """Who a front-door user is to the cluster: a Kubernetes user name and groups.

    Sent upstream as ``Impersonate-User`` and one ``Impersonate-Group`` per
    group. Names are printable ASCII without spaces (they travel in HTTP
    headers and in a whitespace-separated file); groups hold no comma.
    """

    user: str
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.user):
            raise ValueError("a user name must be printable ASCII without spaces")
        for group in self.groups:
            if not _NAME.fullmatch(group) or "," in group:
                raise ValueError("a group must be printable ASCII without spaces or commas")


_NAME = re.compile(r"[!-~]+")


@dataclass(frozen=True, slots=True)
class UserGrant:
    """What one user token grants: the client keys it may reach, and as whom."""

    #: The client keys this token may reach; ``None``: every one (``*``).
    clients: frozenset[str] | None
    #: Who the requests run as in the cluster; ``None``: the agent's own identity.
    identity: Identity | None
    digest: bytes = field(repr=False)

    def allows(self, client_key: str) -> bool:
        return self.clients is None or client_key in self.clients


class UserTokens:
    """The front door's users: bearer tokens, each with the client keys it may reach.

    ``UserTokens({"tok1": ["laptop", "edge"], "admin-tok": "*"}, identities={
    "tok1": Identity("alice", ("dev",))})``. A token with an identity reaches
    clusters as that Kubernetes user (see the module docstring); one without
    acts as the agent's service account. Only SHA-256 digests of the tokens
    are kept; lookups compare against every entry in constant time.
    """

    def __init__(
        self,
        grants: Mapping[str, Iterable[str] | str],
        *,
        identities: Mapping[str, Identity] | None = None,
    ) -> None:
        identities = dict(identities or {})
        if set(identities) - set(grants):
            raise ValueError("an identity for a token without client keys")
        self._grants: list[UserGrant] = []
        for token, clients in grants.items():
            if not token:
                raise ValueError("empty user token")
            keys = frozenset([clients] if isinstance(clients, str) else clients)
            if not keys:
                raise ValueError("a user token needs at least one client key (or *)")
            self._grants.append(
                UserGrant(
                    clients=None if ALL_CLIENTS in keys else keys,
                    identity=identities.get(token),
                    digest=hashlib.sha256(token.encode()).digest(),
                )
            )

    def __len__(self) -> int:
        return len(self._grants)

    def __repr__(self) -> str:  # never the tokens
        return f"<UserTokens: {len(self)} tokens>"

    def lookup(self, token: str) -> UserGrant | None:
        """The grant of ``token``, or ``None`` for an unknown token (constant time)."""
        digest = hashlib.sha256(token.encode()).digest()
        found: UserGrant | None = None
        for grant in self._grants:  # no early exit: the time does not tell which matched
            if hmac.compare_digest(digest, grant.digest):
                found = grant
        return found

    def authorize(self, token: str, client_key: str) -> bool | None:
        """``None``: unknown token (401); ``False``: not for that client (403); ``True``."""
        grant = self.lookup(token)
        return None if grant is None else grant.allows(client_key)


_FILE_FORMAT = "expected 'TOKEN CLIENT_KEY[,CLIENT_KEY...] [user=NAME] [groups=G1[,G2...]]'"


def read_user_tokens(path: str | os.PathLike[str]) -> UserTokens:
    """Read ``TOKEN CLIENT_KEY[,CLIENT_KEY...] [user=NAME] [groups=G1[,G2...]]`` lines.

    ``*`` as the client keys grants every client. ``user=`` maps the token
    to a Kubernetes user (``groups=`` needs it), sent upstream as
    ``Impersonate-User``/``Impersonate-Group``; without it the token acts as
    the agent's service account (files of two fields, the older format, keep
    that meaning). A token may appear on several lines: its client keys add
    up, and at most one identity may be given for it. Blank lines and ``#``
    comments are ignored. Errors name the line, never its content (it holds a
    secret).
    """
    grants: dict[str, list[str]] = {}
    identities: dict[str, Identity] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{path}:{lineno}"
            parts = line.split()
            keys = [k for k in parts[1].split(",") if k] if len(parts) >= 2 else []
            if not keys or parts[1].startswith(("user=", "groups=")):
                raise ValueError(f"{where}: {_FILE_FORMAT}")
            fields: dict[str, str] = {}
            for part in parts[2:]:
                name, eq, value = part.partition("=")
                if not eq or name not in ("user", "groups") or name in fields:
                    raise ValueError(f"{where}: {_FILE_FORMAT}")
                fields[name] = value
            token = parts[0]
            if fields:
                if "user" not in fields:
                    raise ValueError(f"{where}: groups= needs user=")
                groups = tuple(g for g in fields.get("groups", "").split(",") if g)
                try:
                    identity = Identity(fields["user"], groups)
                except ValueError as exc:
                    raise ValueError(f"{where}: {exc}") from None
                if identities.get(token, identity) != identity:
                    raise ValueError(f"{where}: a second, different identity for a token")
                identities[token] = identity
            grants.setdefault(token, []).extend(keys)
    if not grants:
        raise ValueError(f"{path}: no user tokens")
    return UserTokens(grants, identities=identities)


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

    def lookup(self, token: str) -> UserGrant | None:
        """As :meth:`UserTokens.lookup`, with the file as it is now."""
        if self._stat() != self._key:
            self.reload()
        return self.tokens.lookup(token)

    def authorize(self, token: str, client_key: str) -> bool | None:
        """As :meth:`UserTokens.authorize`, with the file as it is now."""
        grant = self.lookup(token)
        return None if grant is None else grant.allows(client_key)


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
    HTTPS. The front door owns no background task. ``impersonation_cache_ttl``:
    how long an answer of the cluster to an impersonation check is reused
    (``kubectl --as``; see the module docstring).
    """

    def __init__(
        self,
        server: Server,
        users: UserTokens | UserTokensFile,
        *,
        limits: ProxyLimits = DEFAULT_PROXY_LIMITS,
        ssl_context: ssl.SSLContext | None = None,
        impersonation_cache_ttl: float = 5.0,
    ) -> None:
        self.server = server
        self.users = users
        self.limits = limits
        self._ssl_context = ssl_context
        self._forwarder = HTTPForwarder(limits)
        #: Recent answers of the cluster to impersonation checks (``0``: none kept).
        self.reviews = ReviewCache(impersonation_cache_ttl)
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
        await self._accept(tcp, client)

    async def _accept(self, stream: trio.abc.Stream, client: str | None) -> None:
        """TLS first, if configured: its handshake must end within
        ``header_timeout`` of the connection (as Go's ``ReadHeaderTimeout``),
        so a ClientHello dribbled byte by byte holds no connection longer."""
        if self._ssl_context is not None:
            tls = trio.SSLStream(stream, self._ssl_context, server_side=True,
                                 https_compatible=True)
            timeout = self.limits.header_timeout
            with trio.move_on_after(timeout) as scope:
                try:
                    await tls.do_handshake()
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    log.debug("front door: TLS handshake with %s failed: %s", client or "?", exc)
                    await trio.aclose_forcefully(stream)
                    return
            if scope.cancelled_caught:
                log.info("front door: no TLS handshake from %s within %g s, closed",
                         client or "?", timeout)
                await trio.aclose_forcefully(stream)
                return
            stream = tls
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
            identity, wanted = self._authorize(request, key, cluster=True)
            return self._to_agent(request, key, PROXY_PROTO, PROXY_ADDRESS, b"/" + rest + suffix,
                                  host=b"revdial.proxy", identity=identity, wanted=wanted)
        if path.startswith(_CLIENT_PREFIX):
            parts = path[len(_CLIENT_PREFIX):].split(b"/", 3)
            if len(parts) < 3 or not all(parts[:3]):
                raise _Answer(404, "not found: use /client/{client_key}/http/{host[:port]}/{path}")
            key = unquote(parts[0].decode("latin-1"))
            self._authorize(request, key, cluster=False)
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

    def _authorize(
        self, request: ProxyRequest, client_key: str, *, cluster: bool
    ) -> tuple[Identity | None, ImpersonationRequest | None]:
        """The identity the request runs as upstream, and the impersonation it
        asks for (to check with the cluster); raises the 400/401/403 answers."""
        token = _bearer(request)
        if token is None:
            raise _unauthorized("unauthorized: a bearer token is required")
        grant = self.users.lookup(token)
        if grant is None:
            raise _unauthorized("unauthorized: unknown token")
        if not grant.allows(client_key):
            raise _Answer(403, f"forbidden: this token may not reach {client_key!r}")
        try:
            wanted = parse_impersonation(request.headers)
        except ValueError as exc:
            log.info("front door: request from %s with bad Impersonate-* headers: %s -> 400",
                     request.client or "?", exc)
            raise _Answer(400, f"bad request: {exc}") from None
        if wanted is not None and (grant.identity is None or not cluster):
            log.info("front door: request from %s with Impersonate-* headers %s -> 403",
                     request.client or "?", "on a /client/ route" if not cluster else
                     "and a token mapped to no user")
            raise _Answer(403, "forbidden: impersonation (kubectl --as, --as-group) needs a "
                               "token mapped to a user (user= in the user-token file)"
                          if cluster else "forbidden: Impersonate-* headers are for "
                               "/k8s/clusters/ routes only")
        return grant.identity, wanted

    async def _check_impersonation(
        self, client_key: str, identity: Identity, wanted: ImpersonationRequest,
        client: str | None,
    ) -> None:
        """Ask the cluster (SubjectAccessReviews through the agent's proxy)
        whether ``identity`` may impersonate what ``wanted`` asks; raises the
        403 (denied), 502 (no answer) or 504 (too slow) answer.

        Cancellation closes the tunnel stream it opened; so does every return.
        """
        groups = (*identity.groups, "system:authenticated")
        stream: trio.abc.Stream | None = None
        timeout = self.limits.connect_timeout
        try:
            with trio.move_on_after(timeout):
                for attrs in attributes(wanted):
                    key = (client_key, identity.user, groups, attrs)
                    answer = self.reviews.get(key)
                    if answer is None:
                        if stream is None:
                            stream = await self.server.dial(
                                client_key, PROXY_PROTO, PROXY_ADDRESS, connect_timeout=timeout)
                        answer = await review(stream, b"revdial.proxy",
                                              review_body(identity.user, groups, attrs))
                        self.reviews.put(key, *answer)
                    allowed, reason = answer
                    if not allowed:
                        log.info("front door: %r may not impersonate %s %r on %r (request "
                                 "from %s) -> 403", identity.user, attrs.resource,
                                 attrs.name[:100], client_key, client or "?")
                        status = forbidden_status(identity.user, attrs, reason)
                        raise _Answer(403, json.dumps(status), content_type="application/json")
                log.debug("front door: %r impersonates %r on %r", identity.user,
                          wanted.user[:100], client_key)
                return
            log.warning("front door: impersonation check on %r took over %g s -> 504",
                        client_key, timeout)
            raise _Answer(504, f"the impersonation check with cluster {client_key!r} took "
                               f"longer than {timeout:g} s")
        except DialError as exc:
            raise self._dial_answer(exc, client_key, "the cluster proxy", True) from None
        except (ReviewError, TunnelError, trio.BrokenResourceError,
                trio.ClosedResourceError) as exc:
            log.warning("front door: impersonation check on %r failed: %s -> 502",
                        client_key, _describe(exc))
            raise _Answer(502, f"cannot check impersonation with cluster {client_key!r}: "
                               f"{_describe(exc)} (may the agent's service account create "
                               "subjectaccessreviews?)") from None
        finally:
            if stream is not None:
                await trio.aclose_forcefully(stream)

    def _to_agent(
        self,
        request: ProxyRequest,
        client_key: str,
        proto: str,
        address: str,
        target: bytes,
        *,
        host: bytes,
        identity: Identity | None = None,
        wanted: ImpersonationRequest | None = None,
    ) -> Route:
        headers = with_forwarded(
            upstream_headers(request.headers, host, identity, wanted),
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

        check = None
        if wanted is not None and identity is not None:
            checked_identity, checked = identity, wanted

            async def check() -> None:
                await self._check_impersonation(client_key, checked_identity, checked,
                                                request.client)

        return Route(key=(client_key, proto, address), connect=connect, target=target,
                     headers=headers, classify=classify, check=check)

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


def upstream_headers(
    headers: Iterable[tuple[bytes, bytes]],
    host: bytes,
    identity: Identity | None,
    impersonation: ImpersonationRequest | None = None,
) -> list[tuple[bytes, bytes]]:
    """The user's (lower-cased, end-to-end) headers as sent on to the agent.

    ``Host`` is replaced; ``Authorization`` and every ``Impersonate-*`` header
    are dropped -- the agent authenticates upstream with its own token, and a
    user's impersonation headers would borrow that identity's rights -- and
    ``identity``, when given, is set as ``Impersonate-User`` plus one
    ``Impersonate-Group`` per group, so the cluster's RBAC applies to the user.
    ``impersonation`` (the user's own ``kubectl --as``, once the cluster
    allowed it) is sent instead of ``identity``.
    """
    out = [(b"host", host)]
    out += [(n, v) for n, v in headers
            if n not in (b"authorization", b"host") and not n.startswith(b"impersonate-")]
    if impersonation is not None:
        out += impersonation.headers
    elif identity is not None:
        out.append((b"impersonate-user", identity.user.encode("ascii")))
        out += [(b"impersonate-group", g.encode("ascii")) for g in identity.groups]
    return out


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
