"""The ``revdial`` command: ``server``, ``agent``, ``status``, ``kubeconfig`` and ``demo``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ._agent import Agent, AllowPolicy, make_ssl_context, split_host_port
from ._errors import DialError, RevdialError, TunnelError, exception_leaves
from ._frontdoor import FrontDoor, UserTokensFile, make_kubeconfig
from ._limits import DEFAULT_LIMITS
from ._logs import configure_logging
from ._metrics import DEFAULT_CLIENT_SERIES
from ._monitor import Monitor
from ._peers import DnsPeers
from ._peerstate import valid_peer_id
from ._proxy import PROXY_TARGET, ReverseProxy, make_upstream_ssl_context
from ._server import Authorizer, HandshakeRequest, Server, token_authorizer
from ._splice import abort, splice

__all__ = ["Forward", "main", "parse_forward", "read_tokens_file"]

log = logging.getLogger("revdial")

TOKEN_ENV = "REVDIAL_TOKEN"
USER_TOKEN_ENV = "REVDIAL_USER_TOKEN"
PEER_TOKEN_ENV = "REVDIAL_PEER_TOKEN"


@dataclass(frozen=True, slots=True)
class Forward:
    """``--forward LISTEN_HOST:PORT=CLIENT_KEY/TARGET_HOST:PORT``."""

    listen_host: str
    listen_port: int
    client_key: str
    target: str  # HOST:PORT as the agent will dial it

    def __str__(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port} -> {self.client_key}/tcp/{self.target}"


def parse_forward(spec: str) -> Forward:
    listen, sep, rest = spec.partition("=")
    key, sep2, target = rest.partition("/")
    if not sep or not sep2 or not key or not target:
        raise argparse.ArgumentTypeError(
            f"--forward {spec!r}: expected LISTEN_HOST:PORT=CLIENT_KEY/TARGET_HOST:PORT"
        )
    try:
        host, port = split_host_port(listen)
        split_host_port(target)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--forward {spec!r}: {exc}") from None
    return Forward(host, port, key, target)


def parse_peer(spec: str) -> tuple[str, str]:
    """``--peer ID=URL`` -> ``(id, url)``."""
    peer_id, sep, url = spec.partition("=")
    if not sep or not valid_peer_id(peer_id) or not url.startswith(("ws://", "wss://")):
        raise argparse.ArgumentTypeError(
            f"--peer {spec!r}: expected ID=ws://HOST:PORT/PATH (or wss://); the ID is 1-80 "
            "printable bytes without '/' or '::'"
        )
    return peer_id, url


def _peer_id(text: str) -> str:
    if not valid_peer_id(text):
        raise argparse.ArgumentTypeError("must be 1-80 printable bytes without '/' or '::'")
    return text


def _peers_dns(text: str) -> tuple[str, int]:
    try:
        return split_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--peers-dns: {exc}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _listen_address(text: str) -> tuple[str, int]:
    try:
        return split_host_port(text, allow_zero=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a finite number >= 0")
    return value


def _idle_stream_timeout_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--idle-stream-timeout", type=_non_negative_seconds, metavar="SECONDS",
                        default=DEFAULT_LIMITS.idle_stream_timeout,
                        help=f"reset {what} with no data either way for this long "
                        "(default: 0, never)")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def read_tokens_file(path: str) -> dict[str, str]:
    """``KEY TOKEN`` per line; blank lines and ``#`` comments ignored."""
    tokens: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:  # never echo the line: it holds a secret
                raise ValueError(f"{path}:{lineno}: expected 'KEY TOKEN'")
            tokens[parts[0]] = parts[1]
    if not tokens:
        raise ValueError(f"{path}: no tokens")
    return tokens


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="revdial",
        description="Reverse tunnels over WebSocket, wire-compatible with Rancher's remotedialer.",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="logging level (default: info)",
    )
    parser.add_argument(
        "--log-format", default="text", choices=["text", "json"],
        help="text lines for people, or one JSON object per line (default: text)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    srv = sub.add_parser(
        "server",
        help="accept agents and forward local ports through them",
        description="Accept agents at ws://HOST:PORT/connect and forward local ports "
        "through their tunnels. Agents authenticate with 'X-Tunnel-ID: KEY' and "
        "'Authorization: Bearer TOKEN'.",
    )
    srv.add_argument("--listen", required=True, type=_listen_address, metavar="HOST:PORT",
                     help="where agents connect (IPv6 in brackets)")
    auth = srv.add_mutually_exclusive_group()
    auth.add_argument("--token", metavar="TOKEN",
                      help=f"accept any client key with this token (or set ${TOKEN_ENV})")
    auth.add_argument("--tokens", metavar="FILE", help="file of 'KEY TOKEN' lines")
    auth.add_argument("--insecure-no-auth", action="store_true",
                      help="accept any agent that sends X-Tunnel-ID, without a token")
    srv.add_argument("--forward", action="append", default=[], type=parse_forward,
                     metavar="LISTEN_HOST:PORT=CLIENT_KEY/TARGET_HOST:PORT",
                     help="listen locally and pipe each connection to TARGET through "
                     "CLIENT_KEY's tunnel (repeatable)")
    srv.add_argument("--tls-cert", metavar="FILE", help="serve wss:// with this certificate chain")
    srv.add_argument("--tls-key", metavar="FILE", help="private key for --tls-cert")
    srv.add_argument("--path", default="/connect", help="WebSocket path (default: /connect)")
    srv.add_argument("--http-listen", type=_listen_address, metavar="HOST:PORT",
                     help="serve the HTTP front door here: /k8s/clusters/KEY/... and "
                     "/client/KEY/http/HOST[:PORT]/... (HTTPS with --tls-cert/--tls-key)")
    srv.add_argument("--user-tokens", metavar="FILE",
                     help="front-door users: lines of 'TOKEN CLIENT_KEY[,KEY...] "
                     "[user=NAME] [groups=G1,G2]' ('*' for every client key)")
    srv.add_argument("--max-sessions", type=_positive_int, metavar="N",
                     default=DEFAULT_LIMITS.max_sessions,
                     help="agent sessions at once; more are refused with 503 "
                     f"(default: {DEFAULT_LIMITS.max_sessions})")
    srv.add_argument("--max-sessions-per-client", type=_positive_int, metavar="N",
                     default=DEFAULT_LIMITS.max_sessions_per_client,
                     help="sessions one client key may hold at once; more are refused "
                     f"with 503 (default: {DEFAULT_LIMITS.max_sessions_per_client})")
    _idle_stream_timeout_option(srv, "a --forward connection")
    srv.add_argument("--metrics-listen", type=_listen_address, metavar="HOST:PORT",
                     help="serve /metrics (Prometheus), /healthz, /readyz and /clients over "
                     "plain HTTP here (off by default; it lists connected clients, so keep "
                     "it on loopback or a private network)")
    peering = srv.add_argument_group(
        "peering (high availability)",
        "Replicas peered with each other reach an agent connected to any of them "
        "(remotedialer-compatible; see README, 'Run it highly available').",
    )
    peering.add_argument("--peer-id", type=_peer_id, metavar="ID",
                         help="this replica's peer id (unique; e.g. its pod IP:PORT)")
    peer_secret = peering.add_mutually_exclusive_group()
    peer_secret.add_argument("--peer-token", metavar="TOKEN",
                             help=f"token shared by all replicas (or set ${PEER_TOKEN_ENV}, "
                             "or --peer-token-file); distinct from the agents' token")
    peer_secret.add_argument("--peer-token-file", metavar="FILE",
                             help="read the peer token from this file")
    peering.add_argument("--peer", action="append", default=[], type=parse_peer,
                         metavar="ID=URL",
                         help="a peer replica and its agent URL, ws://HOST:PORT/connect "
                         "(repeatable)")
    peering.add_argument("--peers-dns", type=_peers_dns, metavar="NAME:PORT",
                         help="discover peers by resolving NAME (e.g. a Kubernetes headless "
                         "Service) every --peers-dns-interval; each address A becomes peer "
                         "A:PORT at ws[s]://A:PORT/PATH")
    peering.add_argument("--peers-dns-interval", type=_positive_float, default=10.0,
                         metavar="SECONDS", help="re-resolve --peers-dns this often (default: 10)")
    peering.add_argument("--peer-ca", metavar="FILE",
                         help="verify wss:// peers against this CA (the name is not checked: "
                         "peers are dialled by address); default: not verified, as remotedialer")
    srv.add_argument("--metrics-clients", type=_non_negative_int, default=DEFAULT_CLIENT_SERIES,
                     metavar="N",
                     help="per-client-key metric series for at most the first N keys "
                     f"connected (default: {DEFAULT_CLIENT_SERIES}; 0: none)")

    sts = sub.add_parser(
        "status",
        help="show the clients connected to a server (from its --metrics-listen)",
        description="Print the sessions connected to a revdial server, read from its "
        "metrics listener's /clients.",
    )
    sts.add_argument("--server", required=True, metavar="URL",
                     help="the server's --metrics-listen address, e.g. http://127.0.0.1:9090")
    sts.add_argument("--json", action="store_true", help="print the JSON as received")
    sts.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                     help="give up after this long (default: 5)")

    agt = sub.add_parser(
        "agent",
        help="connect to a server and dial allowed targets for it",
        description="Keep a tunnel to SERVER up (reconnecting with backoff) and dial the "
        "targets the server asks for, if --allow permits them.",
    )
    agt.add_argument("--server", required=True, action="append", metavar="URL",
                     help="ws://HOST:PORT/connect or wss://...; repeat it for peered "
                     "replicas: the agent uses one and fails over to the next")
    agt.add_argument("--id", required=True, metavar="KEY", help="client key (X-Tunnel-ID)")
    agt.add_argument("--token", metavar="TOKEN",
                     help=f"bearer token (or set ${TOKEN_ENV}, which keeps it out of ps)")
    agt.add_argument("--allow", action="append", default=[], metavar="HOST:PORT",
                     help="a target the server may dial: HOST:PORT, * for any host or port, "
                     "or unix:PATH (repeatable; nothing is allowed by default)")
    agt.add_argument("--allow-all", action="store_true",
                     help="let the server dial anything this host can reach")
    agt.add_argument("--max-pending-dials", type=_positive_int, metavar="N",
                     default=DEFAULT_LIMITS.max_pending_dials,
                     help="dials in progress at once; more Connects are refused at once "
                     f"(default: {DEFAULT_LIMITS.max_pending_dials})")
    _idle_stream_timeout_option(agt, "a dialled connection")
    agt.add_argument("--ca-file", metavar="FILE", help="trust only this CA for wss://")
    agt.add_argument("--ca-checksum", metavar="SHA256",
                     help="refuse to start unless --ca-file has this SHA-256 checksum")
    agt.add_argument("--upstream", metavar="URL",
                     help="serve an HTTP reverse proxy to this API server (https://HOST:PORT) "
                     "on the reserved tunnel target tcp/revdial.proxy:0")
    up_tls = agt.add_mutually_exclusive_group()
    up_tls.add_argument("--upstream-ca", metavar="FILE",
                        help="trust only this CA for the --upstream certificate")
    up_tls.add_argument("--upstream-insecure", action="store_true",
                        help="do not verify the --upstream certificate")
    agt.add_argument("--upstream-token-file", metavar="FILE",
                     help="send 'Authorization: Bearer' with this file's token to the upstream "
                     "(replacing the caller's; re-read when the file changes)")

    kcfg = sub.add_parser(
        "kubeconfig",
        help="print a kubeconfig for a cluster behind a server's front door",
        description="Print a kubeconfig whose server is URL/k8s/clusters/KEY, "
        "authenticating with a front-door user token.",
    )
    kcfg.add_argument("--server", required=True, metavar="URL",
                      help="the front door, e.g. https://revdial.example:8443")
    kcfg.add_argument("--cluster", required=True, metavar="KEY", help="the agent's client key")
    kcfg.add_argument("--token", metavar="TOKEN",
                      help=f"front-door user token (or set ${USER_TOKEN_ENV})")
    kcfg.add_argument("--name", metavar="NAME", help="cluster/context name (default: KEY)")
    kcfg_tls = kcfg.add_mutually_exclusive_group()
    kcfg_tls.add_argument("--certificate-authority", metavar="FILE",
                          help="CA (PEM) of an https:// front door, embedded in the kubeconfig")
    kcfg_tls.add_argument("--insecure-skip-tls-verify", action="store_true",
                          help="do not verify an https:// front door's certificate")
    kcfg_tls.add_argument("--insecure-http", action="store_true",
                          help="allow an http:// front door (kubectl will not send the token "
                          "over plain HTTP, so only other clients can use the result)")

    demo = sub.add_parser(
        "demo",
        help="run a server, an agent and a forward on loopback and show them working",
    )
    demo.add_argument("--keep-running", action="store_true",
                      help="stay up after the walk-through so you can try it by hand")
    demo.add_argument("--no-proxy", action="store_true",
                      help="skip the HTTP part (stand-in API server, proxy and front door)")
    return parser


async def _run_until_signal(body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` until it returns or SIGINT/SIGTERM arrives (then cleanly)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    log.info("received %s, shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            async def run_body() -> None:
                await body()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            nursery.start_soon(run_body)


def _server_authorizer(args: argparse.Namespace) -> Authorizer:
    token = args.token
    if not (token or args.tokens or args.insecure_no_auth):
        token = os.environ.get(TOKEN_ENV)
    if args.tokens:
        return token_authorizer(tokens=read_tokens_file(args.tokens))
    if token:
        return token_authorizer(token=token)
    if args.insecure_no_auth:
        log.warning("--insecure-no-auth: any agent that names itself may connect")

        def any_key(request: HandshakeRequest) -> str | None:
            return request.headers.get("x-tunnel-id", "").strip() or None

        return any_key
    raise SystemExit(
        "revdial server: refusing to start without authentication: give --token, "
        f"--tokens FILE or ${TOKEN_ENV} (or --insecure-no-auth to accept any agent)"
    )


async def _serve_forward(server: Server, fwd: Forward, read_size: int,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    async def handle(local: trio.SocketStream) -> None:
        try:
            # Early data: the client's first bytes follow the Connect (one round
            # trip less); a failed dial surfaces from the splice.
            tunnel = await server.dial(fwd.client_key, "tcp", fwd.target, wait=False)
        except DialError as exc:
            log.warning("forward %s: %s", fwd, exc)
            await abort(local)
            return
        try:
            # A failure of the tunnel resets the client's connection (never a
            # clean FIN that would pass a truncated transfer off as complete).
            await splice(tunnel, local, read_size=read_size,
                         idle_timeout=server.limits.idle_stream_timeout)
        except TunnelError as exc:  # a DialError too: the client may have sent data
            log.warning("forward %s: connection reset: %s", fwd, exc)
        except Exception:
            # One connection's failure must never stop the forward.
            log.exception("forward %s: unexpected error", fwd)

    listeners = await trio.open_tcp_listeners(fwd.listen_port, host=fwd.listen_host)
    log.info("forward %s", fwd)
    task_status.started()
    await trio.serve_listeners(handle, listeners)


def _server_ssl(args: argparse.Namespace) -> ssl.SSLContext | None:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("revdial server: --tls-cert and --tls-key go together")
    if not args.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.tls_cert, args.tls_key)
    return ctx


def _peer_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Server keyword arguments for peering (empty when it is off)."""
    token = args.peer_token
    if args.peer_token_file:
        try:
            with open(args.peer_token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise SystemExit(f"revdial server: --peer-token-file: {exc}") from None
        if not token:
            raise SystemExit(f"revdial server: {args.peer_token_file} is empty")
    if not token:
        token = os.environ.get(PEER_TOKEN_ENV)
    wants_peers = bool(args.peer or args.peers_dns)
    if not args.peer_id:
        if wants_peers:
            raise SystemExit("revdial server: --peer and --peers-dns need --peer-id")
        return {}
    if not token:
        raise SystemExit("revdial server: --peer-id needs a peer token: --peer-token, "
                         f"--peer-token-file or ${PEER_TOKEN_ENV}")
    settings: dict[str, Any] = {"peer_id": args.peer_id, "peer_token": token}
    if args.peer_ca:
        ctx = ssl.create_default_context(cafile=args.peer_ca)
        ctx.check_hostname = False
        settings["peer_ssl_context"] = ctx
    return settings


async def _cmd_server(args: argparse.Namespace) -> None:
    authorize = _server_authorizer(args)
    ssl_context = _server_ssl(args)
    limits = dataclasses.replace(
        DEFAULT_LIMITS,
        max_sessions=args.max_sessions,
        max_sessions_per_client=args.max_sessions_per_client,
        idle_stream_timeout=args.idle_stream_timeout,
    )
    try:
        peering = _peer_settings(args)
    except (OSError, ssl.SSLError) as exc:
        raise SystemExit(f"revdial server: --peer-ca: {exc}") from None
    server = Server(authorize, path=args.path, ssl_context=ssl_context, limits=limits,
                    **peering)
    for peer_id, url in args.peer:
        server.add_peer(peer_id, url)
    dns: DnsPeers | None = None
    if args.peers_dns is not None:
        dns_name, dns_port = args.peers_dns
        dns = DnsPeers(server, dns_name, dns_port, scheme="wss" if ssl_context else "ws",
                       interval=args.peers_dns_interval)
    front_door = _front_door(args, server, ssl_context)
    host, port = args.listen
    started = False
    async with trio.open_nursery() as nursery:
        if args.metrics_listen is not None:
            # First, so /readyz answers 503 until every listener below is up
            # (and, with --peers-dns, until the name resolved once).
            monitor = Monitor(server, ready=lambda: started and (dns is None or dns.resolved),
                              max_client_series=args.metrics_clients)
            await nursery.start(monitor.serve, *args.metrics_listen)
        await nursery.start(server.serve, host, port)
        if dns is not None:
            await nursery.start(dns.run)
        for fwd in args.forward:
            await nursery.start(_serve_forward, server, fwd, server.limits.read_size)
        if front_door is not None:
            await nursery.start(front_door.serve, *args.http_listen)
            if isinstance(front_door.users, UserTokensFile):
                nursery.start_soon(_reload_on_sighup, front_door.users)
        started = True


async def _reload_on_sighup(users: UserTokensFile) -> None:
    """``kill -HUP``: re-read ``--user-tokens`` now (changes are also seen per request)."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            log.info("received SIGHUP, re-reading %s", users.path)
            users.reload()


def _front_door(
    args: argparse.Namespace, server: Server, ssl_context: ssl.SSLContext | None
) -> FrontDoor | None:
    if args.http_listen is None:
        if args.user_tokens:
            raise SystemExit("revdial server: --user-tokens needs --http-listen")
        return None
    if not args.user_tokens:
        raise SystemExit("revdial server: refusing to serve --http-listen without "
                         "--user-tokens FILE (lines of 'TOKEN CLIENT_KEY[,KEY...] "
                         "[user=NAME] [groups=G1,G2]', '*' for every client key)")
    try:
        users = UserTokensFile(args.user_tokens)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SystemExit(f"revdial server: {exc}") from None
    return FrontDoor(server, users, ssl_context=ssl_context)


async def _cmd_agent(args: argparse.Namespace) -> None:
    token = args.token or os.environ.get(TOKEN_ENV)
    headers = {"X-Tunnel-ID": args.id}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if not args.allow and not args.allow_all and not args.upstream:
        log.warning("no --allow given: the server will not be able to dial anything")
    try:
        policy = AllowPolicy(args.allow, allow_all=args.allow_all)
        ssl_context = (
            make_ssl_context(args.ca_file, args.ca_checksum)
            if args.ca_file or args.ca_checksum
            else None
        )
        proxy = _reverse_proxy(args)
        services = {PROXY_TARGET: proxy} if proxy is not None else None
        limits = dataclasses.replace(
            DEFAULT_LIMITS,
            max_pending_dials=args.max_pending_dials,
            idle_stream_timeout=args.idle_stream_timeout,
        )
        agent = Agent(args.server, headers=headers, allow=policy, ssl_context=ssl_context,
                      services=services, limits=limits)
    except (ValueError, OSError, ssl.SSLError) as exc:
        raise SystemExit(f"revdial agent: {exc}") from None
    try:
        await agent.run()
    finally:
        if proxy is not None:
            with trio.CancelScope(shield=True):
                await proxy.aclose()


def _reverse_proxy(args: argparse.Namespace) -> ReverseProxy | None:
    if not args.upstream:
        if args.upstream_ca or args.upstream_insecure or args.upstream_token_file:
            raise ValueError("--upstream-ca, --upstream-insecure and --upstream-token-file "
                             "need --upstream")
        return None
    if args.upstream_insecure:
        log.warning("--upstream-insecure: the upstream's certificate is not verified")
    proxy = ReverseProxy(
        args.upstream,
        ssl_context=make_upstream_ssl_context(args.upstream_ca, insecure=args.upstream_insecure),
        token_file=args.upstream_token_file,
    )
    log.info("serving an HTTP proxy to %s on %s", args.upstream, PROXY_TARGET)
    return proxy


def _cmd_kubeconfig(args: argparse.Namespace) -> int:
    import base64

    token = args.token or os.environ.get(USER_TOKEN_ENV)
    if not token:
        raise SystemExit(f"revdial kubeconfig: give --token or set ${USER_TOKEN_ENV}")
    if not args.server.startswith(("http://", "https://")):
        raise SystemExit("revdial kubeconfig: --server must be http://... or https://...")
    if args.server.startswith("http://") and not args.insecure_http:
        raise SystemExit(
            "revdial kubeconfig: refusing an http:// front door: kubectl (client-go) sends a "
            "bearer token only over TLS, so every request would get 401. Serve the front door "
            "over HTTPS (revdial server --tls-cert/--tls-key) and give --server https://... "
            "with --certificate-authority FILE, or pass --insecure-http for clients that "
            "send tokens over plain HTTP"
        )
    ca_data = None
    if args.certificate_authority:
        try:
            with open(args.certificate_authority, "rb") as f:
                ca_data = base64.b64encode(f.read()).decode("ascii")
        except OSError as exc:
            raise SystemExit(f"revdial kubeconfig: {exc}") from None
    sys.stdout.write(make_kubeconfig(
        args.server, args.cluster, token, name=args.name,
        certificate_authority_data=ca_data,
        insecure_skip_tls_verify=args.insecure_skip_tls_verify,
    ))
    return 0


STATUS_COLUMNS = (
    ("CLIENT", "client_key"),
    ("SESSION", "session_id"),
    ("REMOTE", "remote"),
    ("CONNECTED SINCE", "connected_since"),
    ("AGE", "age_seconds"),
    ("STREAMS", "streams"),
    ("BYTES IN", "bytes_in"),
    ("BYTES OUT", "bytes_out"),
    ("EXT", "extension"),
)


def _fetch_clients(url: str, timeout: float) -> bytes:
    """GET ``URL/clients``; SystemExit with a one-line reason on any failure."""
    import urllib.error
    import urllib.request

    if not url.startswith(("http://", "https://")):
        raise SystemExit("revdial status: --server must be http://HOST:PORT (the server's "
                         "--metrics-listen address)")
    target = url.split("?", 1)[0].rstrip("/") + "/clients"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:
            body: bytes = response.read(16 * 1024 * 1024)
            return body
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"revdial status: {target} answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SystemExit(f"revdial status: cannot reach {target}: {reason}") from None


def _format_age(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


def _cmd_status(args: argparse.Namespace) -> int:
    body = _fetch_clients(args.server, args.timeout)
    try:
        report = json.loads(body)
        sessions = report["clients"]
        if not isinstance(sessions, list):
            raise TypeError("clients is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"revdial status: unexpected answer from {args.server}: {exc}") from None
    if args.json:
        sys.stdout.write(json.dumps(report, indent=1) + "\n")
        return 0
    peers = report.get("peers")
    if not sessions:
        sys.stdout.write("no clients connected\n")
        _write_peers(peers)
        return 0
    rows = [[title for title, _ in STATUS_COLUMNS]]
    for entry in sessions:
        row = [str(entry.get(key, "")) for _, key in STATUS_COLUMNS]
        row[4] = _format_age(entry.get("age_seconds"))
        row[8] = f"v{entry['extension']}" if entry.get("extension") else "-"
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(STATUS_COLUMNS))]
    numeric = {1, 5, 6, 7}
    for r in rows:
        cells = [c.rjust(w) if i in numeric else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        sys.stdout.write("  ".join(cells).rstrip() + "\n")
    _write_peers(peers)
    return 0


def _write_peers(peers: object) -> None:
    """The peering part of ``revdial status`` (servers with --peer-id only)."""
    if not isinstance(peers, dict):
        return
    for link in peers.get("links", []):
        sys.stdout.write(f"peer {link.get('peer_id')} at {link.get('url')}: "
                         f"link {link.get('state')}\n")
    for entry in peers.get("incoming", []):
        keys = entry.get("announced_clients", [])
        sys.stdout.write(f"peer {entry.get('peer_id')} from {entry.get('remote')}: "
                         f"announces {len(keys)} clients"
                         + (f" ({', '.join(keys[:10])}{', ...' if len(keys) > 10 else ''})"
                            if keys else "") + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    # Commands without an event loop (no logging setup needed).
    simple = {"kubeconfig": _cmd_kubeconfig, "status": _cmd_status}
    if args.command in simple:
        try:
            return simple[args.command](args)
        except SystemExit as exc:
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
                return 1
            raise
    configure_logging(args.log_level, args.log_format)
    commands: dict[str, Callable[[argparse.Namespace], Awaitable[None]]] = {
        "server": _cmd_server,
        "agent": _cmd_agent,
    }
    if args.command == "demo":
        from ._demo import run_demo

        commands["demo"] = run_demo
    try:
        trio.run(_run_until_signal, lambda: commands[args.command](args))
    except BaseException as exc:
        # Errors leave trio's nurseries wrapped in exception groups: report
        # the single cause in one line, as a command-line tool should.
        leaves = exception_leaves(exc)
        first = leaves[0] if len(leaves) == 1 else None
        if isinstance(first, SystemExit):
            if isinstance(first.code, str):
                print(first.code, file=sys.stderr)
                return 1
            return first.code if isinstance(first.code, int) else 1
        if isinstance(first, RevdialError | OSError | ValueError):
            print(f"revdial {args.command}: {first}", file=sys.stderr)
            return 1
        if isinstance(first, KeyboardInterrupt):
            return 130
        raise
    return 0
