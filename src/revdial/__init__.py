"""revdial: reverse tunnels for Python on trio, wire-compatible with Rancher's remotedialer.

An *agent* behind NAT opens one outbound WebSocket to a *server*; the server
then dials TCP (and unix-socket) connections back through it, many streams
multiplexed on the one socket.
"""

from ._agent import (
    Agent,
    AllowPolicy,
    Dialer,
    StreamHandler,
    connect,
    default_dialer,
    make_connect_handler,
    make_ssl_context,
)
from ._errors import (
    DialConnectionRefusedError,
    DialError,
    DialRefusedError,
    DialSessionLostError,
    DialTimeoutError,
    DialUnreachableError,
    FrameError,
    HalfCloseUnsupportedError,
    HandshakeError,
    NoSuchClientError,
    ProtocolError,
    RevdialError,
    SessionLostError,
    StreamResetError,
    TunnelError,
)
from ._frontdoor import (
    FrontDoor,
    Identity,
    UserGrant,
    UserTokens,
    UserTokensFile,
    make_kubeconfig,
    read_user_tokens,
)
from ._limits import DEFAULT_LIMITS, Limits
from ._monitor import Monitor
from ._peers import DnsPeers, Resolver, system_resolver
from ._proxy import (
    DEFAULT_PROXY_LIMITS,
    PROXY_ADDRESS,
    PROXY_PROTO,
    PROXY_TARGET,
    ProxyLimits,
    ProxyStatistics,
    ReverseProxy,
)
from ._server import (
    Authorizer,
    HandshakeRequest,
    PeerStatistics,
    Server,
    ServerCounters,
    ServerStatistics,
    open_server,
    token_authorizer,
)
from ._session import Session, SessionStatistics
from ._splice import ABORT_REASON, abort, splice
from ._stats import DialStats, SessionCounters
from ._stream import TunnelStream

__version__ = "0.1.0.dev0"

__all__ = [
    "ABORT_REASON",
    "DEFAULT_LIMITS",
    "DEFAULT_PROXY_LIMITS",
    "PROXY_ADDRESS",
    "PROXY_PROTO",
    "PROXY_TARGET",
    "Agent",
    "AllowPolicy",
    "Authorizer",
    "DialConnectionRefusedError",
    "DialError",
    "DialRefusedError",
    "DialSessionLostError",
    "DialTimeoutError",
    "DialUnreachableError",
    "DialStats",
    "Dialer",
    "DnsPeers",
    "FrameError",
    "FrontDoor",
    "HalfCloseUnsupportedError",
    "HandshakeError",
    "HandshakeRequest",
    "Identity",
    "Limits",
    "Monitor",
    "NoSuchClientError",
    "PeerStatistics",
    "ProtocolError",
    "ProxyLimits",
    "ProxyStatistics",
    "Resolver",
    "ReverseProxy",
    "RevdialError",
    "Server",
    "ServerCounters",
    "ServerStatistics",
    "Session",
    "SessionCounters",
    "SessionLostError",
    "SessionStatistics",
    "StreamHandler",
    "StreamResetError",
    "TunnelError",
    "TunnelStream",
    "UserGrant",
    "UserTokens",
    "UserTokensFile",
    "abort",
    "connect",
    "default_dialer",
    "make_connect_handler",
    "make_kubeconfig",
    "make_ssl_context",
    "open_server",
    "read_user_tokens",
    "splice",
    "system_resolver",
    "token_authorizer",
]
