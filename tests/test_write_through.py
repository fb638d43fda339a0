"""A small frame is written by the task that makes it, when nothing is queued.

``_DirectWriter`` serializes the frame with trio-websocket's wsproto object and
writes it with one non-blocking ``os.write`` on the WebSocket's socket, instead
of waking the session's writer task (a scheduler round later, together with
every other frame of the round: the two ends of a tunnel then took turns under
many small requests). These tests pin when it is used (a plain socket or TLS
over one, nothing queued, the writer not holding frames), that whatever the
socket does not take goes out through the writer before anything else, byte
for byte and in order, and that a broken socket still ends the session with a
clear error. Over TLS each such frame is a TLS record of its own, so the
receiving side takes every complete record already received in one receive
(``ActivityStream``): tested at the end.

Real socket pairs (the direct path needs a descriptor); no timing.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
import trustme

from conftest import receive_exactly
from revdial import Limits, Session, SessionLostError, TunnelStream
from revdial import _session as session_module
from revdial._frames import MessageType, decode
from revdial._session import TLS_TESTED_TRIO_VERSIONS, ActivityStream, _DirectWriter
from revdial._state import Role
from revdial.testing import echo_handler, websocket_handshake
from session_pairs import open_pair

KiB = 1024
LIMITS = Limits(ping_timeout=3600.0, ping_interval=3000.0)


async def _echo(stream: TunnelStream, proto: str, address: str) -> None:
    stream.session.dial_succeeded(stream)
    await echo_handler(stream)


_CA = trustme.CA()
_CERT = _CA.issue_cert("revdial.test")


def _tls_pair(
    a: trio.socket.SocketType, b: trio.socket.SocketType
) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _CERT.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    _CA.configure_trust(client_ctx)
    return (trio.SSLStream(trio.SocketStream(a), server_ctx, server_side=True),
            trio.SSLStream(trio.SocketStream(b), client_ctx, server_hostname="revdial.test"))


@pytest.fixture(params=["ws", "wss"])
def tls(request: pytest.FixtureRequest) -> bool:
    """Each test runs over a plain socket pair and over TLS on one."""
    return bool(request.param == "wss")


@asynccontextmanager
async def socket_sessions(
    tls: bool = False, limits: Limits = LIMITS
) -> AsyncIterator[tuple[Session, Session]]:
    """A server session and an echoing agent session over a unix socket pair
    (``tls``: with TLS over it, as ``wss://``)."""
    a, b = trio.socket.socketpair()
    server_raw, client_raw = (
        _tls_pair(a, b) if tls else (trio.SocketStream(a), trio.SocketStream(b))
    )
    server_transport = ActivityStream(server_raw)
    client_transport = ActivityStream(client_raw)
    async with trio.open_nursery() as nursery:
        server_ws, client_ws = await websocket_handshake(
            nursery, client_transport, server_transport, limits, limits
        )
        # The revdial extension (half-close, dial confirmations) on both sides.
        server = Session(server_ws, server_transport, Role.SERVER, client_key="c1",
                         limits=limits, extensions=1)
        client = Session(client_ws, client_transport, Role.CLIENT, client_key="client",
                         limits=limits, on_connect=_echo, extensions=1)
        await nursery.start(server.run)
        await nursery.start(client.run)
        try:
            yield server, client
        finally:
            nursery.cancel_scope.cancel()
    # A session that ended by itself leaves its transport to its owner (the
    # server closes it; trio-websocket does not).
    await trio.aclose_forcefully(server_transport)
    await trio.aclose_forcefully(client_transport)


class _Writes:
    """Stands in for ``os`` in the session module: counts direct writes and
    makes the next ones take only ``take`` bytes (0: EAGAIN) or fail."""

    def __init__(self) -> None:
        self.calls = 0
        self.take: int | None = None  # None: write all
        self.fail: OSError | None = None

    def write(self, fd: int, data: bytes) -> int:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        if self.take is None:
            return os.write(fd, data)
        if self.take == 0:
            raise BlockingIOError
        return os.write(fd, data[: self.take])

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> _Writes:
    shim = _Writes()
    monkeypatch.setattr(session_module, "os", shim)
    return shim


@pytest.fixture
def writer_starts(monkeypatch: pytest.MonkeyPatch) -> list[Session]:
    """The sessions whose writer task was started, once per start."""
    started: list[Session] = []
    original: Callable[[Session], None] = Session._start_writer

    def start(self: Session) -> None:
        if not self._writer_running:
            started.append(self)
        original(self)

    monkeypatch.setattr(Session, "_start_writer", start)
    return started


async def test_the_tls_path_is_active_with_the_installed_trio() -> None:
    assert trio.__version__.startswith(TLS_TESTED_TRIO_VERSIONS), (
        f"trio {trio.__version__} is not a release _DirectWriter's TLS path was tested with: "
        "check SSLStream._retry / send_all, then extend TLS_TESTED_TRIO_VERSIONS"
    )
    async with socket_sessions(tls=True) as (server, client):
        assert server._direct is not None
        assert client._direct is not None
        assert server._direct._tls is not None


async def test_installed_on_a_plain_or_tls_socket_only(monkeypatch: pytest.MonkeyPatch) -> None:
    async with socket_sessions() as (server, client):
        assert server._direct is not None
        assert client._direct is not None
        assert server._direct._tls is None
    # Memory streams (and the tests' recording wrapper): the writer task writes.
    async with open_pair(limits=LIMITS, record=False) as p:
        assert p.server._direct is None
        assert _DirectWriter.install(p.server.ws, p.server._transport) is None
    async with open_pair(limits=LIMITS) as p:
        assert p.server._direct is None
    # TLS with a trio release whose SSLStream internals were not checked.
    monkeypatch.setattr(session_module, "TLS_TESTED_TRIO_VERSIONS", ("0.0.",))
    async with socket_sessions(tls=True) as (server, client):
        assert server._direct is None
        assert client._direct is None
        stream = server.open_stream("tcp", "echo:1")
        await _echo_once(stream, b"through the writer")


async def test_small_messages_need_no_writer_task(
    writes: _Writes, writer_starts: list[Session], tls: bool
) -> None:
    async with socket_sessions(tls) as (server, client):
        # The agent's first ping (its keepalive task, through trio-websocket)
        # holds the transport for a moment: the frames made then queue.
        await _echo_once(server.open_stream("tcp", "echo:0"), b"warm-up")
        writer_starts.clear()
        before = writes.calls
        stream = server.open_stream("tcp", "echo:1")  # its Connect: a direct write
        for i in range(50):
            message = b"message %d" % i
            await stream.send_all(message)
            assert await receive_exactly(stream, len(message)) == message
        await stream.send_eof()
        assert await stream.receive_some() == b""
        # Connect, its confirmation, 50 messages each way, EOF both ways: every
        # frame went out from the task that made it; no writer task started.
        assert writer_starts == []
        assert writes.calls - before >= 104
        assert server.bytes_sent == client.bytes_sent == len(b"warm-up") + sum(
            len(b"message %d" % i) for i in range(50))


async def _echo_once(stream: TunnelStream, message: bytes) -> None:
    await stream.send_all(message)
    assert await receive_exactly(stream, len(message)) == message
    await stream.send_eof()
    assert await stream.receive_some() == b""


@pytest.mark.parametrize("take", [0, 1, 7])
async def test_what_the_socket_does_not_take_goes_first_through_the_writer(
    writes: _Writes, monkeypatch: pytest.MonkeyPatch, take: int, tls: bool
) -> None:
    """A short write (``take`` bytes, 0: EAGAIN) leaves the rest to the writer;
    frames made meanwhile queue behind it, and every stream's bytes arrive
    whole and in order."""
    flushes: list[_DirectWriter] = []
    original = _DirectWriter.flush

    async def flush(self: _DirectWriter) -> None:
        flushes.append(self)
        await original(self)

    monkeypatch.setattr(_DirectWriter, "flush", flush)
    async with socket_sessions(tls) as (server, _), trio.open_nursery() as nursery:
        streams = [server.open_stream("tcp", f"echo:{i}") for i in range(8)]
        await trio.testing.wait_all_tasks_blocked()
        writes.take = take
        payloads = [b"".join(b"%d:%d;" % (i, n) for n in range(400)) for i in range(8)]
        got: dict[int, bytes] = {}

        async def exchange(i: int) -> None:
            stream = streams[i]
            for n in range(0, len(payloads[i]), 100):
                await stream.send_all(payloads[i][n:n + 100])
            await stream.send_eof()
            got[i] = await receive_exactly(stream, len(payloads[i]))

        for i in range(8):
            nursery.start_soon(exchange, i)
        await trio.testing.wait_all_tasks_blocked()
        writes.take = None
    assert got == dict(enumerate(payloads))
    # The rests of the short writes were the writer's job.
    assert flushes


async def test_nothing_is_written_into_the_middle_of_a_short_write(
    writes: _Writes, monkeypatch: pytest.MonkeyPatch, tls: bool
) -> None:
    """trio-websocket writes on its own too (a ping, a pong, a close) under
    its lock, which a direct write does not take. The rest of a frame the
    socket took only part of must still go out before such a write."""
    release = trio.Event()
    original = _DirectWriter.flush

    async def late_flush(self: _DirectWriter) -> None:
        await release.wait()
        await original(self)

    monkeypatch.setattr(_DirectWriter, "flush", late_flush)
    async with socket_sessions(tls) as (server, client):
        stream = server.open_stream("tcp", "echo:1")
        await _echo_once(stream, b"warm-up")
        stream = server.open_stream("tcp", "echo:2")
        await trio.testing.wait_all_tasks_blocked()
        writes.take = 5
        await stream.send_all(b"a frame cut after five bytes")
        writes.take = None
        assert server._direct_pending  # the writer waits in late_flush
        with trio.fail_after(5):
            await server.ws.ping(b"in between")  # written under trio-websocket's lock
            release.set()
            assert await receive_exactly(stream, 28) == b"a frame cut after five bytes"
        assert client.end_reason is None
        assert server.end_reason is None


async def test_pause_and_resume_are_written_at_once_too(
    monkeypatch: pytest.MonkeyPatch, tls: bool
) -> None:
    """Urgent control frames (here the server's Pause and Resume for a stream
    its reader lets fill up) take the direct path like Data."""
    seen: dict[int, trio.Event] = {MessageType.PAUSE: trio.Event(),
                                   MessageType.RESUME: trio.Event()}
    servers: list[Session] = []
    original = Session._write_through

    def record(self: Session, frames: list[bytes]) -> None:
        for frame in frames:
            mtype = decode(frame).type
            if self in servers and mtype in seen:
                seen[mtype].set()
        original(self, frames)

    monkeypatch.setattr(Session, "_write_through", record)
    limits = Limits(ping_timeout=3600.0, ping_interval=3000.0,
                    stream_high_water=8 * KiB, stream_low_water=2 * KiB)
    async with socket_sessions(tls, limits) as (server, _):
        servers.append(server)
        stream = server.open_stream("tcp", "echo:1")
        payload = os.urandom(32 * KiB)
        with trio.fail_after(10):
            await stream.send_all(payload)  # echoed back, not read yet
            await seen[MessageType.PAUSE].wait()
            assert await receive_exactly(stream, len(payload)) == payload
            await seen[MessageType.RESUME].wait()


async def test_a_broken_socket_ends_the_session_not_a_hang(writes: _Writes, tls: bool) -> None:
    async with socket_sessions(tls) as (server, client):
        stream = server.open_stream("tcp", "echo:1")
        await stream.send_all(b"hello")
        assert await receive_exactly(stream, 5) == b"hello"
        writes.fail = BrokenPipeError(32, "Broken pipe")
        # The direct write fails: its frame goes to the writer, which meets the
        # broken transport (made real here) and ends the session.
        await client._transport.inner.aclose()
        with trio.fail_after(5), pytest.raises(SessionLostError):
            await _send_until_it_fails(stream)
        await server.ended.wait()
        assert server._direct is None


async def _send_until_it_fails(stream: TunnelStream) -> None:
    while True:
        await stream.send_all(b"more")
        await stream.receive_some()


async def test_bulk_and_small_streams_share_the_socket_in_order(
    writes: _Writes, tls: bool
) -> None:
    """Bulk frames (never written directly) and small ones (written directly
    whenever nothing is queued) on the same session: no stream's bytes are
    reordered or lost."""
    total = 2 * 1024 * KiB
    bulk_data = os.urandom(total)
    async with socket_sessions(tls) as (server, _), trio.open_nursery() as nursery:
        bulk = server.open_stream("tcp", "echo:bulk")
        digest: list[bytes] = []

        async def read_bulk() -> None:
            digest.append(hashlib.sha256(await receive_exactly(bulk, total)).digest())

        async def write_bulk() -> None:
            await bulk.send_all(bulk_data)
            await bulk.send_eof()

        nursery.start_soon(read_bulk)
        nursery.start_soon(write_bulk)
        for i in range(20):
            chat = server.open_stream("tcp", f"echo:{i}")
            for n in range(10):
                message = b"chat %d/%d" % (i, n)
                await chat.send_all(message)
                assert await receive_exactly(chat, len(message)) == message
            await chat.aclose()
    assert digest == [hashlib.sha256(bulk_data).digest()]
    assert writes.calls > 0


class _Chaos:
    """``os`` for the session module: direct writes that, at random (seeded),
    would block, take a random part, or take everything."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.short = 0

    def write(self, fd: int, data: bytes) -> int:
        r = self.rng.random()
        if r < 0.3:
            raise BlockingIOError
        if r < 0.6 and len(data) > 1:
            self.short += 1
            return os.write(fd, data[: self.rng.randrange(1, len(data))])
        return os.write(fd, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_chaotic_short_writes_keep_every_byte(
    monkeypatch: pytest.MonkeyPatch, tls: bool, seed: int
) -> None:
    """Direct writes that block or stop anywhere, small socket buffers, bulk
    and small streams at once, and the agent pinging every 5 ms (so that
    trio-websocket's pongs fall between a short write and its rest): every
    stream's bytes arrive whole and in order, and no session fails. (Found
    a pong written into the middle of a frame before ActivityStream.pending.)"""
    chaos = _Chaos(seed)
    monkeypatch.setattr(session_module, "os", chaos)
    real_pair = trio.socket.socketpair

    def small_buffers(*args: Any, **kwargs: Any) -> Any:
        pair = real_pair(*args, **kwargs)
        for sock in pair:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        return pair

    monkeypatch.setattr(trio.socket, "socketpair", small_buffers)
    limits = Limits(ping_interval=0.005, ping_timeout=3600.0)
    total = 512 * KiB
    data = os.urandom(total)
    digests: list[bytes] = []
    with trio.fail_after(30):
        async with socket_sessions(tls, limits) as (server, client), \
                trio.open_nursery() as nursery:

            async def bulk(i: int) -> None:
                stream = server.open_stream("tcp", f"echo:bulk{i}")
                async with trio.open_nursery() as inner:
                    async def read() -> None:
                        digests.append(
                            hashlib.sha256(await receive_exactly(stream, total)).digest())
                    inner.start_soon(read)
                    await stream.send_all(data)
                    await stream.send_eof()

            async def chat(i: int) -> None:
                stream = server.open_stream("tcp", f"echo:{i}")
                for n in range(60):
                    message = b"chat %d/%d;" % (i, n)
                    await stream.send_all(message)
                    assert await receive_exactly(stream, len(message)) == message
                await stream.aclose()

            for i in range(2):
                nursery.start_soon(bulk, i)
            for i in range(10):
                nursery.start_soon(chat, i)
        assert server.end_reason is None
        assert client.end_reason is None
    assert digests == [hashlib.sha256(data).digest()] * 2
    assert chaos.short > 0


# --- the receiving side over TLS: complete records already received, in one receive ---


@asynccontextmanager
async def tls_streams() -> AsyncIterator[tuple[trio.SSLStream[Any], ActivityStream]]:
    """A TLS connection over a unix socket pair: (the sending end, the
    receiving end under an ActivityStream), handshake done."""
    a, b = trio.socket.socketpair()
    server, client = _tls_pair(a, b)
    assert isinstance(server, trio.SSLStream)
    assert isinstance(client, trio.SSLStream)
    async with server, client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
        await server.send_all(b"!")  # TLS 1.3: the session tickets go with it
        receiver = ActivityStream(client)
        assert await receiver.receive_some(10) == b"!"
        yield server, receiver


async def _records(sender: trio.SSLStream[Any], messages: list[bytes]) -> None:
    """Each message as a TLS record of its own (one ``send_all`` each)."""
    for message in messages:
        await sender.send_all(message)


async def test_one_receive_takes_every_complete_record() -> None:
    async with tls_streams() as (sender, receiver):
        messages = [b"record %02d;" % i for i in range(20)]
        await _records(sender, messages)
        with trio.fail_after(5):
            got = await receiver.receive_some(64 * KiB)
        # trio's SSLStream alone hands out one record per receive_some.
        assert got == b"".join(messages)


async def test_at_most_max_bytes_and_nothing_lost() -> None:
    async with tls_streams() as (sender, receiver):
        messages = [bytes([65 + i]) * 100 for i in range(10)]
        await _records(sender, messages)
        got = b""
        with trio.fail_after(5):
            while len(got) < 1000:
                chunk = await receiver.receive_some(250)
                assert 0 < len(chunk) <= 250
                got += chunk
        assert got == b"".join(messages)


async def test_an_incomplete_record_waits_for_its_rest() -> None:
    """Records cut anywhere by the transport: whole ones come out, the rest
    of a cut one comes with the next receive."""
    async with tls_streams() as (sender, receiver):
        tls = receiver.inner
        assert isinstance(tls, trio.SSLStream)
        transport = tls.transport_stream
        assert isinstance(transport, trio.SocketStream)
        messages = [b"message %d;" % i for i in range(30)]
        # Encrypt without sending, then deliver the ciphertext in odd pieces.
        wire = b""
        sending: Any = sender
        for message in messages:
            sending._ssl_object.write(message)
            wire += sending._outgoing.read()
        raw = sender.transport_stream
        assert isinstance(raw, trio.SocketStream)
        got = b""
        with trio.fail_after(5):
            for start in range(0, len(wire), 97):
                await raw.send_all(wire[start:start + 97])
                got += await receiver.receive_some(64 * KiB)
            while len(got) < sum(map(len, messages)):
                got += await receiver.receive_some(64 * KiB)
        assert got == b"".join(messages)


async def test_a_close_after_data_is_still_an_eof() -> None:
    async with tls_streams() as (sender, receiver):
        await _records(sender, [b"last ", b"words"])
        await sender.aclose()
        with trio.fail_after(5):
            assert await receiver.receive_some(1024) == b"last words"
            assert await receiver.receive_some(1024) == b""


async def test_no_coalescing_with_an_untested_trio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_module, "TLS_TESTED_TRIO_VERSIONS", ("0.0.",))
    async with tls_streams() as (sender, receiver):
        await _records(sender, [b"one;", b"two;", b"three;"])
        got: list[bytes | bytearray] = []
        with trio.fail_after(5):
            while sum(len(chunk) for chunk in got) < 14:
                got.append(await receiver.receive_some(1024))
        assert b"".join(got) == b"one;two;three;"
        assert len(got) == 3  # trio's own: a record per receive
