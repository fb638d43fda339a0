"""Shared fixtures and helpers for the loopback integration tests.

Everything here uses real sockets on 127.0.0.1 (the sans-I/O and session
tests use memory streams instead). The target services the agent dials speak
*length-delimited* protocols, because base remotedialer (a Go peer, or a
revdial peer without the extension) has no half-close: a local EOF closes
both directions of a tunnel stream, so "send, shut down writing, read the
answer" cannot work through it. Only ``sha_eof`` relies on half-close.

Targets (each a ``trio.serve_tcp`` server on 127.0.0.1, port 0):

* echo: echoes everything until EOF;
* sha: reads an 8-byte big-endian length N, then exactly N bytes, answers the
  32-byte SHA-256 digest of those bytes and closes;
* download: reads ``N, seed`` (two 8-byte big-endian integers), sends
  :func:`pattern` ``(seed, N)`` as fast as the connection accepts it, then
  closes; ``Targets.written[seed]`` counts the bytes written so far;
* sha_eof: reads until EOF, then answers the SHA-256 digest and closes --
  usable only where half-close exists (revdial extension v1);
* forbidden: a listening echo server the agent is *not* allowed to dial;
* closed: a port nothing listens on, which the agent *is* allowed to dial.

Helpers are imported by the test modules with ``from conftest import ...``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

import revdial

KiB = 1024
MiB = 1024 * KiB

TOKEN = "tok-7c1e9a40-not-in-logs"
CLIENT_KEY = "c1"
CHUNK = 1 * MiB

Handler = Callable[[trio.SocketStream], Awaitable[None]]


# --- helpers ------------------------------------------------------------------


#: Upper bound of every ``wait_until``: generous, it only matters when a test fails.
WAIT_LIMIT = 10.0


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate()`` is true, checking every 10 ms (at most ``WAIT_LIMIT`` s).

    Only for conditions that change because of *socket* events (a TCP close
    reaching the server, the peer's Error frame reaching its table, another
    process starting up): those arrive through the kernel, so neither a trio
    event nor ``trio.testing.wait_all_tasks_blocked`` can tell that one is
    still in flight. The sleep is a polling interval, never a guess at how
    long something takes.
    """
    with trio.fail_after(WAIT_LIMIT):
        while not predicate():  # noqa: ASYNC110 -- polling socket-driven state, see above
            await trio.sleep(0.01)


def agent_headers(client_key: str = CLIENT_KEY, token: str = TOKEN) -> dict[str, str]:
    return {"X-Tunnel-ID": client_key, "Authorization": f"Bearer {token}"}


def raw_headers(client_key: str = CLIENT_KEY, token: str = TOKEN) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in agent_headers(client_key, token).items()]


def free_port() -> int:
    """A port that was free a moment ago (bind port 0, note it, close)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@functools.cache
def _pattern_base(seed: int) -> bytes:
    return random.Random(seed).randbytes(CHUNK)


def pattern(seed: int, total: int) -> Iterator[bytes]:
    """``total`` deterministic pseudo-random bytes, in chunks of at most 1 MiB.

    Chunk ``i`` is a random 1 MiB block (fixed per seed) whose first 8 bytes
    are replaced by ``i``, so every chunk differs: lost, duplicated or
    reordered chunks change the checksum. Cheap enough for 100 MiB.
    """
    base = _pattern_base(seed)
    sent = 0
    index = 0
    while sent < total:
        n = min(CHUNK, total - sent)
        chunk = struct.pack(">Q", index) + base[8:]
        yield chunk[:n]
        sent += n
        index += 1


@functools.cache
def pattern_digest(seed: int, total: int) -> bytes:
    h = hashlib.sha256()
    for chunk in pattern(seed, total):
        h.update(chunk)
    return h.digest()


async def receive_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        if not data:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


async def open_tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of one loopback TCP connection: ``(accepted, connected)``."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listeners[0] as listener:
        port = listener.socket.getsockname()[1]
        connected = await trio.open_tcp_stream("127.0.0.1", port)
        accepted = await listener.accept()
    assert isinstance(accepted, trio.SocketStream)
    return accepted, connected


async def receive_until(stream: trio.abc.Stream, marker: bytes) -> bytes:
    """Read until ``marker`` has arrived (AssertionError on EOF before it)."""
    buf = b""
    while marker not in buf:
        data = await stream.receive_some()
        assert data, f"EOF before {marker!r}: {buf!r}"
        buf += data
    return buf


async def read_until_reset(stream: trio.abc.Stream) -> bytes:
    """Read until the connection fails; assert it was *reset*, never an EOF.

    Returns the bytes that arrived before the reset. A clean EOF (``b""``),
    which is what a completed transfer looks like, fails the test.
    """
    got = bytearray()
    with pytest.raises(trio.BrokenResourceError) as info:  # noqa: PT012 -- the loop is the call
        while data := await stream.receive_some(256 * KiB):
            got += data
        raise AssertionError(
            f"clean EOF after {len(got)} bytes: a failure passed for an orderly end"
        )
    assert isinstance(info.value.__cause__, ConnectionResetError), repr(info.value.__cause__)
    return bytes(got)


async def echo_roundtrip(stream: trio.abc.Stream, payload: bytes) -> None:
    """Send ``payload`` to an echo service and check it comes back intact."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, payload)
        assert await receive_exactly(stream, len(payload)) == payload


async def upload_and_check(stream: trio.abc.Stream, total: int, seed: int) -> None:
    """Send ``total`` pattern bytes to a *sha* target; check its digest reply."""
    await stream.send_all(struct.pack(">Q", total))
    for chunk in pattern(seed, total):
        await stream.send_all(chunk)
    reply = await receive_exactly(stream, 32)
    assert reply == pattern_digest(seed, total)


async def download_and_check(stream: trio.abc.Stream, total: int, seed: int) -> None:
    """Ask a *download* target for ``total`` bytes; read to EOF; check them."""
    await stream.send_all(struct.pack(">QQ", total, seed))
    h = hashlib.sha256()
    got = 0
    while data := await stream.receive_some(256 * KiB):
        h.update(data)
        got += len(data)
    assert got == total
    assert h.digest() == pattern_digest(seed, total)


# --- target services ------------------------------------------------------------


def _quiet(handler: Handler) -> Handler:
    """Peers vanishing (the tests kill agents on purpose) must not crash the server."""

    @functools.wraps(handler)
    async def wrapper(stream: trio.SocketStream) -> None:
        try:
            async with stream:
                await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
            pass

    return wrapper


@asynccontextmanager
async def serve_target(handler: Handler) -> AsyncIterator[int]:
    """Serve ``handler`` on 127.0.0.1 (port 0) for the block; yield the port."""
    async with trio.open_nursery() as nursery:
        listeners: list[trio.SocketListener] = await nursery.start(
            functools.partial(trio.serve_tcp, _quiet(handler), 0, host="127.0.0.1")
        )
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def echo_handler(stream: trio.SocketStream) -> None:
    while data := await stream.receive_some(256 * KiB):
        await stream.send_all(data)


async def sha_handler(stream: trio.SocketStream) -> None:
    (total,) = struct.unpack(">Q", await receive_exactly(stream, 8))
    h = hashlib.sha256()
    left = total
    while left:
        data = await stream.receive_some(min(left, 256 * KiB))
        if not data:
            return
        h.update(data)
        left -= len(data)
    await stream.send_all(h.digest())


async def sha_eof_handler(stream: trio.SocketStream) -> None:
    h = hashlib.sha256()
    while data := await stream.receive_some(256 * KiB):
        h.update(data)
    await stream.send_all(h.digest())


@dataclass
class Targets:
    echo: int
    sha: int
    sha_eof: int
    download: int
    forbidden: int
    #: A port nothing listens on (allowed, so dialling it is "unreachable").
    closed: int
    #: download seed -> bytes written to the connection so far.
    written: dict[int, int] = field(default_factory=dict)

    @property
    def allow(self) -> list[str]:
        ports = (self.echo, self.sha, self.sha_eof, self.download, self.closed)
        return [f"127.0.0.1:{p}" for p in ports]


@pytest.fixture(autouse=True)
def _keep_root_logging() -> Iterator[None]:
    """Tests that run the CLI's ``main()`` in-process configure the root logger
    (a handler on that test's captured stderr): put it back afterwards, so no
    later test logs to a closed stream or loses pytest's own handlers."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
async def echo_server() -> AsyncIterator[int]:
    """A TCP echo server on 127.0.0.1; yields its port."""
    async with serve_target(echo_handler) as port:
        yield port


@pytest.fixture
async def targets(echo_server: int) -> AsyncIterator[Targets]:
    written: dict[int, int] = {}

    async def download_handler(stream: trio.SocketStream) -> None:
        total, seed = struct.unpack(">QQ", await receive_exactly(stream, 16))
        written[seed] = 0
        for chunk in pattern(seed, total):
            await stream.send_all(chunk)
            written[seed] += len(chunk)

    async with (
        serve_target(sha_handler) as sha,
        serve_target(sha_eof_handler) as sha_eof,
        serve_target(download_handler) as download,
        serve_target(echo_handler) as forbidden,
    ):
        yield Targets(echo_server, sha, sha_eof, download, forbidden, free_port(), written)


# --- server and agents ----------------------------------------------------------


@dataclass
class Tunnel:
    """A server with agent ``c1`` connected, allowed to dial the targets."""

    server: revdial.Server
    targets: Targets
    #: Whether the agent speaks the revdial extension (False: like a Go agent).
    extensions: bool
    key: str = CLIENT_KEY

    @property
    def url(self) -> str:
        return ws_url(self.server)

    async def dial(self, port: int) -> revdial.TunnelStream:
        return await self.server.dial(self.key, "tcp", f"127.0.0.1:{port}")


def ws_url(server: revdial.Server, scheme: str = "ws", path: str = "/connect") -> str:
    return f"{scheme}://127.0.0.1:{server.port}{path}"


@pytest.fixture
async def server() -> AsyncIterator[revdial.Server]:
    async with revdial.open_server(revdial.token_authorizer(token=TOKEN)) as srv:
        yield srv


@pytest.fixture(params=[True, False], ids=["v1", "plain"])
def extensions(request: pytest.FixtureRequest) -> bool:
    """Run the test with a revdial agent (extension v1) and with a plain one.

    A plain agent speaks only the base remotedialer protocol, as a Go agent
    does: dials are not confirmed and there is no half-close.
    """
    value: bool = request.param
    return value


@pytest.fixture
async def tunnel(
    server: revdial.Server, targets: Targets, extensions: bool
) -> AsyncIterator[Tunnel]:
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            await nursery.start(
                functools.partial(
                    revdial.connect,
                    ws_url(server),
                    headers=agent_headers(),
                    allow=targets.allow,
                    extensions=extensions,
                )
            )
            await server.wait_client(CLIENT_KEY)
        (session,) = server.sessions(CLIENT_KEY)
        assert session.extensions == (1 if extensions else 0)
        yield Tunnel(server, targets, extensions)
        nursery.cancel_scope.cancel()


async def spawn_agent(
    nursery: trio.Nursery,
    server: revdial.Server,
    allow: object,
    *,
    client_key: str = CLIENT_KEY,
    sessions: int = 1,
    **kwargs: Any,
) -> tuple[revdial.Agent, trio.CancelScope]:
    """Start a :class:`revdial.Agent` in ``nursery``, under a cancel scope of its own.

    Returns once the server holds ``sessions`` sessions for ``client_key``
    (the new agent's included). Cancelling the returned scope kills the
    agent -- its socket is closed at once -- which is how the tests
    simulate an agent dying.
    """
    agent = revdial.Agent(
        ws_url(server), headers=agent_headers(client_key), allow=allow, **kwargs
    )
    scope = trio.CancelScope()

    async def run(*, task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await agent.run(task_status=task_status)

    with trio.fail_after(10):
        await nursery.start(run)
    await wait_until(lambda: len(server.sessions(client_key)) >= sessions)
    return agent, scope


@asynccontextmanager
async def run_agent(
    server: revdial.Server, allow: object, **kwargs: Any
) -> AsyncIterator[revdial.Agent]:
    """:func:`spawn_agent` for the duration of the block (cancelled on exit)."""
    async with trio.open_nursery() as nursery:
        agent, _ = await spawn_agent(nursery, server, allow, **kwargs)
        yield agent
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_raw_websocket(
    port: int, headers: list[tuple[bytes, bytes]], path: str = "/connect"
) -> AsyncIterator[WebSocketConnection]:
    """A bare trio-websocket client to the server on ``port``, for abuse.

    We own (and always close) the TCP stream: ``open_websocket_url`` leaves
    its socket open when the *server* closes the WebSocket (trio-websocket
    0.12.2), which pytest reports as an unclosed-socket ResourceWarning.
    """
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    async with tcp, trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery, tcp, f"127.0.0.1:{port}", path, extra_headers=headers
        )
        yield ws
        nursery.cancel_scope.cancel()
