"""The revdial exception hierarchy.

Pure Python, no trio import: the sans-I/O core (``_frames``, ``_state``) raises
these too. Errors are organised by cause and translated from trio-websocket,
wsproto and socket errors at exactly one boundary (the session driver), so no
foreign exception reaches a user.

Stream operations additionally use trio's own vocabulary where it fits:
``trio.ClosedResourceError`` (you closed it) and ``trio.BusyResourceError``
(two tasks at once). Everything the *peer or the network* does to a stream is
a :class:`TunnelError`.
"""

from __future__ import annotations

__all__ = [
    "DialConnectionRefusedError",
    "DialError",
    "DialRefusedError",
    "DialSessionLostError",
    "DialTimeoutError",
    "DialUnreachableError",
    "FrameError",
    "HalfCloseUnsupportedError",
    "HandshakeError",
    "NoSuchClientError",
    "ProtocolError",
    "RevdialError",
    "SessionLostError",
    "StreamResetError",
    "TunnelError",
]


class RevdialError(Exception):
    """Base class of every error revdial raises on purpose."""


class ProtocolError(RevdialError):
    """The peer broke the remotedialer protocol; the session it arrived on ends.

    ``go_error`` is the text the Go reference gives for the same input where
    one exists (for example ``"unexpected EOF"``), so behaviour can be checked
    against the recorded vectors.
    """

    def __init__(self, message: str, *, go_error: str | None = None) -> None:
        super().__init__(message)
        self.go_error = go_error


class FrameError(ProtocolError):
    """A WebSocket message is not a well-formed remotedialer frame."""


class HandshakeError(RevdialError):
    """The agent's WebSocket handshake failed or was refused by the server.

    ``status`` is the HTTP status the server answered (``None`` when the
    connection failed before any answer); ``body`` its short text body.
    """

    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class TunnelError(RevdialError):
    """Something the peer or the network did to a tunnel stream."""


class StreamResetError(TunnelError):
    """The peer closed the stream with an error instead of an orderly EOF.

    ``reason`` is the peer's text (at most 100 bytes reach us from a Go peer).
    """

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class SessionLostError(TunnelError):
    """The WebSocket session carrying the stream ended."""


class DialError(TunnelError):
    """A dial through the tunnel failed.

    Raised by ``Server.dial()`` when the failure is known at once, and
    otherwise (base remotedialer protocol: the dial "succeeds" before the agent
    has connected) by the stream's first ``receive_some()`` or ``send_all()``.
    ``reason`` is the agent's text, ``target`` the ``proto/address`` dialled.
    """

    def __init__(
        self, message: str, *, reason: str = "", client_key: str = "", target: str = ""
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.client_key = client_key
        self.target = target


class DialRefusedError(DialError):
    """The agent's allow policy refused the target."""


class DialUnreachableError(DialError):
    """The agent tried and could not connect (refused, unreachable, DNS)."""


class DialConnectionRefusedError(DialUnreachableError):
    """The target host actively refused the connection (nothing listens)."""


class DialTimeoutError(DialUnreachableError):
    """The agent's (or our) dial timeout expired before the target answered."""


class NoSuchClientError(DialError):
    """No session is connected for that client key."""


class DialSessionLostError(DialError, SessionLostError):
    """The session ended before the dial produced any result."""


class HalfCloseUnsupportedError(TunnelError):
    """``send_eof()`` on a session without the revdial extension (a Go peer):
    remotedialer cannot express half-close. Close the stream instead."""


def exception_leaves(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside ``exc`` (itself if it is not a group)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in exception_leaves(e)]
    return [exc]
