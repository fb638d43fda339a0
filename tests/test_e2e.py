"""End to end on loopback: a real server, real agents, real target sockets.

Tests taking the ``tunnel`` (or ``extensions``) fixture run twice: with a
revdial agent (extension v1: confirmed dials, half-close) and with a plain
one that speaks only base remotedialer, as a Go agent does.

Every test is bounded by ``trio.fail_after`` and waits on conditions
(``server.wait_client``, events, EOF), never on guessed durations; the
polling helpers ``wait_until`` and ``wait_stalled`` are for state that
changes because of socket events (see their docstrings).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import ssl
import struct
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection

import revdial
from conftest import (
    CLIENT_KEY,
    TOKEN,
    KiB,
    MiB,
    Targets,
    Tunnel,
    agent_headers,
    download_and_check,
    echo_handler,
    echo_roundtrip,
    free_port,
    open_raw_websocket,
    pattern,
    pattern_digest,
    raw_headers,
    receive_exactly,
    run_agent,
    spawn_agent,
    upload_and_check,
    wait_until,
    ws_url,
)
from revdial._cli import Forward, _serve_forward

BIG = 100 * MiB


async def assert_session_works(tunnel: Tunnel) -> None:
    """A fresh echo stream succeeds and the server still holds exactly one session."""
    stream = await tunnel.dial(tunnel.targets.echo)
    async with stream:
        await echo_roundtrip(stream, b"still alive?")
    assert tunnel.server.statistics().sessions == 1


async def failed_dial(tunnel: Tunnel, port: int) -> revdial.DialError:
    """Dial ``port`` through the tunnel, expecting failure; return the error.

    With extension v1 ``dial()`` itself raises it; with a plain agent the
    stream is returned at once and its first receive raises it. Either way
    no stream is left behind.
    """
    if tunnel.extensions:
        with pytest.raises(revdial.DialError) as info:
            await tunnel.dial(port)
    else:
        stream = await tunnel.dial(port)
        with pytest.raises(revdial.DialError) as info:
            await stream.receive_some()
        await stream.aclose()
    assert tunnel.server.statistics().streams == 0
    return info.value


async def wait_stalled(value: Callable[[], int], *, quiet: float = 0.25) -> int:
    """Wait until ``value()`` has not changed for ``quiet`` seconds *and* 20
    polls in a row; return it.

    "The sender stopped making progress" can only be observed over time: the
    bytes move through kernel socket buffers, so no trio event marks the end.
    Counting polls too keeps one long scheduling hiccup from passing for a
    stall. The caller bounds it with ``fail_after``.
    """
    last = value()
    since = trio.current_time()
    polls = 0
    while polls < 20 or trio.current_time() - since < quiet:
        await trio.sleep(0.01)
        polls += 1
        now = value()
        if now != last:
            last = now
            since = trio.current_time()
            polls = 0
    return last


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in leaves(e)]
    return [exc]


async def handshake_status(port: int, headers: list[tuple[bytes, bytes]],
                           path: str = "/connect") -> int:
    """Open a bare WebSocket expecting a refusal; return the HTTP status."""
    # trio-websocket raises the rejection from its reader task, i.e. in a group.
    with pytest.raises((ConnectionRejected, BaseExceptionGroup)) as info:
        async with open_raw_websocket(port, headers, path):
            pass
    rejected = [e for e in leaves(info.value) if isinstance(e, ConnectionRejected)]
    assert len(rejected) == 1, info.value
    status: int = rejected[0].status_code
    return status


async def receive_until_closed(ws: WebSocketConnection) -> None:
    while True:
        await ws.get_message()


# --- data path through server.dial ----------------------------------------------


async def test_echo_roundtrip(tunnel: Tunnel) -> None:
    with trio.fail_after(10):
        stream = await tunnel.dial(tunnel.targets.echo)
        assert tunnel.server.statistics().streams == 1
        for size in (1, 1000, 300 * KiB):
            payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            await echo_roundtrip(stream, payload)
        await stream.aclose()
        assert tunnel.server.statistics().streams == 0


async def test_upload_100mib_checksum(tunnel: Tunnel) -> None:
    """Server -> agent target: the target's SHA-256 of what it got matches."""
    with trio.fail_after(30):
        async with await tunnel.dial(tunnel.targets.sha) as stream:
            await upload_and_check(stream, BIG, seed=1)


async def test_download_100mib_checksum(tunnel: Tunnel) -> None:
    """Agent target -> server: all bytes arrive, in order, then a clean EOF."""
    with trio.fail_after(30):
        async with await tunnel.dial(tunnel.targets.download) as stream:
            await download_and_check(stream, BIG, seed=2)


async def test_100_concurrent_streams_no_crosstalk(tunnel: Tunnel) -> None:
    n = 100
    with trio.fail_after(30):
        streams = [await tunnel.dial(tunnel.targets.echo) for _ in range(n)]
        assert tunnel.server.statistics().streams == n
        received: dict[int, bytes] = {}

        async def exchange(i: int) -> None:
            # A distinct, index-tagged 16 KiB pattern per stream, sent in
            # 1000-byte pieces while the other 99 streams do the same.
            mine = b"".join(struct.pack(">HH", i, j) + bytes([i]) * 60 for j in range(256))
            stream = streams[i]

            async def send() -> None:
                for k in range(0, len(mine), 1000):
                    await stream.send_all(mine[k : k + 1000])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                received[i] = await receive_exactly(stream, len(mine))

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(exchange, i)
        assert sorted(received) == list(range(n))
        for i, data in received.items():
            assert data == b"".join(
                struct.pack(">HH", i, j) + bytes([i]) * 60 for j in range(256)
            ), f"stream {i} got someone else's bytes"
        for stream in streams:
            await stream.aclose()
        assert tunnel.server.statistics().streams == 0


async def test_half_close(tunnel: Tunnel) -> None:
    """EOF-delimited protocols need half-close: only extension v1 has it."""
    data = b"".join(pattern(10, 3 * MiB))
    with trio.fail_after(10):
        stream = await tunnel.dial(tunnel.targets.sha_eof)
        async with stream:
            assert stream.supports_half_close is tunnel.extensions
            await stream.send_all(data)
            if not tunnel.extensions:
                with pytest.raises(revdial.HalfCloseUnsupportedError):
                    await stream.send_eof()
                return
            await stream.send_eof()
            assert await receive_exactly(stream, 32) == hashlib.sha256(data).digest()
            assert await stream.receive_some() == b""


# --- the same through a --forward (the CLI's own code path) -----------------------


async def start_forward(nursery: trio.Nursery, tunnel: Tunnel, target_port: int) -> int:
    """Run the CLI's ``--forward`` handler in-process; return its local port."""
    port = free_port()
    fwd = Forward("127.0.0.1", port, tunnel.key, f"127.0.0.1:{target_port}")
    await nursery.start(_serve_forward, tunnel.server, fwd, tunnel.server.limits.read_size)
    return port


async def test_forward_echo(tunnel: Tunnel) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start_forward(nursery, tunnel, tunnel.targets.echo)
            async with await trio.open_tcp_stream("127.0.0.1", port) as client:
                await echo_roundtrip(client, b"hello through the forward")
                await echo_roundtrip(client, bytes(range(256)) * 1024)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("direction", ["upload", "download"])
async def test_forward_100mib_checksum(tunnel: Tunnel, direction: str) -> None:
    targets = tunnel.targets
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            if direction == "upload":
                port = await start_forward(nursery, tunnel, targets.sha)
                async with await trio.open_tcp_stream("127.0.0.1", port) as client:
                    await upload_and_check(client, BIG, seed=3)
            else:
                port = await start_forward(nursery, tunnel, targets.download)
                async with await trio.open_tcp_stream("127.0.0.1", port) as client:
                    await download_and_check(client, BIG, seed=4)
            nursery.cancel_scope.cancel()


async def test_forward_half_close(tunnel: Tunnel) -> None:
    """A TCP client's shutdown(SHUT_WR) crosses the tunnel only with extension v1;
    with a plain agent it closes the whole connection, as remotedialer does."""
    data = b"".join(pattern(11, 2 * MiB))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start_forward(nursery, tunnel, tunnel.targets.sha_eof)
            async with await trio.open_tcp_stream("127.0.0.1", port) as client:
                await client.send_all(data)
                await client.send_eof()
                reply = b""
                while chunk := await client.receive_some():
                    reply += chunk
            if tunnel.extensions:
                assert reply == hashlib.sha256(data).digest()
            else:
                assert reply == b""
            nursery.cancel_scope.cancel()


async def test_forward_to_refused_target_closes_only_that_client(
    tunnel: Tunnel, caplog: pytest.LogCaptureFixture
) -> None:
    """Early data: the client's bytes go out before the agent's dial fails; the
    client then sees its connection closed, and the session carries on."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bad = await start_forward(nursery, tunnel, tunnel.targets.closed)
            good = await start_forward(nursery, tunnel, tunnel.targets.echo)
            async with await trio.open_tcp_stream("127.0.0.1", bad) as client:
                await client.send_all(b"nobody will read this")
                with contextlib.suppress(trio.BrokenResourceError):
                    assert await client.receive_some() == b""
            async with await trio.open_tcp_stream("127.0.0.1", good) as client:
                await echo_roundtrip(client, b"still fine")
            nursery.cancel_scope.cancel()
    assert tunnel.server.statistics().streams == 0
    refusal = [r for r in caplog.records if "connection refused" in r.getMessage()]
    assert refusal, "the forward logs why the connection was closed"


# --- dial failures leave the session intact ------------------------------------


async def test_dial_refused_by_allow_policy(tunnel: Tunnel) -> None:
    # The target listens, so only the agent's policy can refuse it.
    forbidden = tunnel.targets.forbidden
    with trio.fail_after(10):
        (session,) = tunnel.server.sessions(CLIENT_KEY)
        error = await failed_dial(tunnel, forbidden)
        assert type(error) is revdial.DialRefusedError
        assert error.target == f"tcp/127.0.0.1:{forbidden}"
        assert error.client_key == CLIENT_KEY
        await assert_session_works(tunnel)
        assert tunnel.server.sessions(CLIENT_KEY) == [session]


async def test_dial_unreachable_target(tunnel: Tunnel) -> None:
    # Allowed by the agent, but nothing listens there.
    closed = tunnel.targets.closed
    with trio.fail_after(10):
        (session,) = tunnel.server.sessions(CLIENT_KEY)
        error = await failed_dial(tunnel, closed)
        assert isinstance(error, revdial.DialUnreachableError)
        assert isinstance(error, revdial.DialConnectionRefusedError)
        assert error.reason == f"dial tcp 127.0.0.1:{closed}: connect: connection refused"
        await assert_session_works(tunnel)
        assert tunnel.server.sessions(CLIENT_KEY) == [session]


async def test_dial_unknown_client(tunnel: Tunnel) -> None:
    with trio.fail_after(1), pytest.raises(revdial.NoSuchClientError) as info:
        await tunnel.server.dial("nobody", "tcp", f"127.0.0.1:{tunnel.targets.echo}")
    assert info.value.client_key == "nobody"
    with trio.fail_after(10):
        await assert_session_works(tunnel)


async def hanging_dialer(proto: str, address: str) -> trio.abc.Stream:
    await trio.sleep_forever()


async def test_dial_timeout(server: revdial.Server) -> None:
    """Extension v1: the agent's dial timeout reaches dial() as DialTimeoutError."""
    limits = revdial.Limits(dial_timeout=0.2)
    async with run_agent(server, ["127.0.0.1:9"], dialer=hanging_dialer, limits=limits):
        with trio.fail_after(10):
            with pytest.raises(revdial.DialTimeoutError) as info:
                await server.dial(CLIENT_KEY, "tcp", "127.0.0.1:9")
            assert info.value.reason == "dial tcp 127.0.0.1:9: i/o timeout"
            assert server.statistics().streams == 0
            await assert_session_works_for(server, CLIENT_KEY)


async def assert_session_works_for(server: revdial.Server, key: str) -> None:
    """The session answers: even a refused dial is an answer."""
    with pytest.raises(revdial.DialRefusedError):
        await server.dial(key, "tcp", "127.0.0.1:1")


async def test_cancelled_dial_leaves_no_stream(server: revdial.Server) -> None:
    """Extension v1: dial() waits for the agent's confirmation; cancelling that
    wait removes the stream on both sides (the agent's dial still hangs)."""
    dialing = trio.Event()

    async def dialer(proto: str, address: str) -> trio.abc.Stream:
        dialing.set()
        return await hanging_dialer(proto, address)

    async with run_agent(server, ["127.0.0.1:9"], dialer=dialer) as agent:
        assert agent.session is not None
        agent_session = agent.session
        with trio.fail_after(10):
            with trio.CancelScope() as scope:

                async def cancel_when_dialing() -> None:
                    await dialing.wait()
                    assert agent_session.statistics().streams == 1
                    scope.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel_when_dialing)
                    await server.dial(CLIENT_KEY, "tcp", "127.0.0.1:9")
                    raise AssertionError("dial() returned for a hanging target")
            assert scope.cancelled_caught
            assert server.statistics().streams == 0
            await wait_until(lambda: agent_session.statistics().streams == 0)
            await assert_session_works_for(server, CLIENT_KEY)


# --- the agent dies ---------------------------------------------------------------


async def test_agent_killed_mid_transfer(
    server: revdial.Server, targets: Targets, extensions: bool
) -> None:
    errors: dict[str, BaseException] = {}
    downloading = trio.Event()
    uploading = trio.Event()

    async def download(stream: revdial.TunnelStream) -> None:
        await stream.send_all(struct.pack(">QQ", 1 << 40, 5))
        got = 0
        try:
            while data := await stream.receive_some():
                got += len(data)
                if got >= 4 * MiB:
                    downloading.set()
            errors["download"] = AssertionError("clean EOF from a dead agent")
        except revdial.SessionLostError as exc:
            errors["download"] = exc

    async def upload(stream: revdial.TunnelStream) -> None:
        sent = 0
        try:
            await stream.send_all(struct.pack(">Q", 1 << 40))
            while True:
                for chunk in pattern(6, 64 * MiB):
                    await stream.send_all(chunk)
                    sent += len(chunk)
                    if sent >= 4 * MiB:
                        uploading.set()
        except revdial.SessionLostError as exc:
            errors["upload"] = exc

    async with trio.open_nursery() as nursery:
        # The agent runs under a cancel scope of its own: cancelling it is its death.
        _, kill_agent = await spawn_agent(nursery, server, targets.allow,
                                          extensions=extensions)
        with trio.fail_after(10):
            down = await server.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.download}")
            up = await server.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.sha}")
            nursery.start_soon(download, down)
            nursery.start_soon(upload, up)
            await downloading.wait()
            await uploading.wait()
        kill_agent.cancel()  # the agent dies: its socket is closed at once
        with trio.fail_after(5):
            await wait_until(lambda: len(errors) == 2)
    assert isinstance(errors["download"], revdial.SessionLostError), errors
    assert isinstance(errors["upload"], revdial.SessionLostError), errors
    await wait_until(lambda: not server.clients())
    stats = server.statistics()
    assert (stats.sessions, stats.streams, stats.buffered_bytes) == (0, 0, 0)
    with pytest.raises(revdial.NoSuchClientError):
        await server.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.echo}")


# --- flow control: a slow reader ---------------------------------------------


async def test_slow_reader_is_paused_and_bounded(tunnel: Tunnel) -> None:
    targets = tunnel.targets
    limits = revdial.Limits()
    total, seed = 64 * MiB, 7
    with trio.fail_after(30):
        pattern_digest(seed, total)  # precompute outside the traced window
        tracemalloc.start()
        try:
            flood = await tunnel.dial(targets.download)
            await flood.send_all(struct.pack(">QQ", total, seed))
            await wait_until(lambda: targets.written.get(seed, 0) > 0)
            # (a) nobody reads, so the agent must be paused: the target stalls.
            written = await wait_stalled(lambda: targets.written[seed])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert written < 32 * MiB, f"target wrote {written} bytes into a paused stream"
        # (b) memory: what the server holds for the stream, and everything traced.
        buffered = tunnel.server.statistics().buffered_bytes
        assert limits.stream_high_water < buffered <= limits.stream_max_buffer
        assert peak < 48 * MiB, f"traced memory peaked at {peak / MiB:.1f} MiB"
        # (c) no head-of-line blocking: another stream on the session works.
        (session,) = tunnel.server.sessions(CLIENT_KEY)
        other = await tunnel.dial(targets.echo)
        assert other.session is session is flood.session
        async with other:
            await echo_roundtrip(other, bytes(range(256)) * 4096)  # 1 MiB
        assert targets.written[seed] == written  # the flood stayed paused meanwhile
        # Finally read it all: nothing lost, reordered or duplicated.
        h = hashlib.sha256()
        got = 0
        async with flood:
            while data := await flood.receive_some():
                h.update(data)
                got += len(data)
        assert got == total
        assert h.digest() == pattern_digest(seed, total)


# --- cancellation -------------------------------------------------------------------


async def test_cancellation_leaves_no_streams(
    server: revdial.Server, targets: Targets, extensions: bool
) -> None:
    async with run_agent(server, targets.allow, extensions=extensions) as agent:
        with trio.fail_after(20):
            assert agent.session is not None
            agent_session = agent.session

            # 1. A receive_some cancelled while it waits loses nothing.
            echo = await server.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.echo}")
            await echo_roundtrip(echo, b"warm up")
            scope = trio.CancelScope()

            async def receive_cancelled() -> None:
                with scope:
                    await echo.receive_some()
                    raise AssertionError("receive_some returned with nothing sent")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive_cancelled)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
            assert scope.cancelled_caught
            await echo_roundtrip(echo, b"nothing lost")

            # 2. An upload cancelled mid-way (inside send_all).
            up = await server.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.sha}")
            up_scope = trio.CancelScope()
            up_progress = trio.Event()

            async def upload() -> None:
                sent = 0
                with up_scope:
                    await up.send_all(struct.pack(">Q", 1 << 40))
                    while True:
                        for chunk in pattern(8, 64 * MiB):
                            await up.send_all(chunk)
                            sent += len(chunk)
                            if sent >= 8 * MiB:
                                up_progress.set()

            # 3. A download cancelled mid-way (inside receive_some).
            down = await server.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.download}")
            down_scope = trio.CancelScope()
            down_progress = trio.Event()

            async def download() -> None:
                got = 0
                with down_scope:
                    await down.send_all(struct.pack(">QQ", 1 << 40, 9))
                    while True:
                        got += len(await down.receive_some())
                        if got >= 8 * MiB:
                            down_progress.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload)
                nursery.start_soon(download)
                await up_progress.wait()
                up_scope.cancel()
                await down_progress.wait()
                down_scope.cancel()
            assert up_scope.cancelled_caught
            assert down_scope.cancelled_caught
            assert server.statistics().streams == 3
            assert agent_session.statistics().streams == 3
            for stream in (echo, up, down):
                await stream.aclose()
            assert server.statistics().streams == 0
            # The Error frames have to travel to the agent: wait for its table.
            await wait_until(lambda: agent_session.statistics().streams == 0)
            assert server.statistics().buffered_bytes == 0
            assert agent_session.statistics().buffered_bytes == 0
            assert agent.session is agent_session
            # And the session is fine.
            again = await server.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.echo}")
            async with again:
                await echo_roundtrip(again, b"after cancellations")


# --- protocol errors ------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        pytest.param("a text message", "text", id="text"),
        pytest.param(b"\x80", "varint", id="garbage"),
        # message id 1, conn 2, type Data, then a legacy deadline cut inside its varint
        pytest.param(b"\x02\x04\x02\xb0", "varint", id="truncated-varint"),
        pytest.param(b"", "varint", id="empty"),
    ],
)
async def test_protocol_error_closes_only_that_session(
    tunnel: Tunnel, caplog: pytest.LogCaptureFixture, message: str | bytes, expected: str
) -> None:
    caplog.set_level(logging.WARNING, logger="revdial")
    server = tunnel.server
    with trio.fail_after(10):
        async with open_raw_websocket(server.port, raw_headers("raw")) as ws:
            await wait_until(lambda: "raw" in server.clients())
            assert server.statistics().sessions == 2
            await ws.send_message(message)
            with pytest.raises(ConnectionClosed):
                await receive_until_closed(ws)
        await wait_until(lambda: "raw" not in server.clients())
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.name == "revdial" and r.levelno >= logging.WARNING
        ]
        assert any("raw" in w and expected in w.lower() for w in warnings), warnings
        await assert_session_works(tunnel)


# --- authentication ---------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(raw_headers(token="wrong-token"), id="wrong-token"),
        pytest.param([(b"Authorization", f"Bearer {TOKEN}".encode())], id="no-tunnel-id"),
        pytest.param([(b"X-Tunnel-ID", CLIENT_KEY.encode())], id="no-token"),
    ],
)
async def test_handshake_rejected_401(
    server: revdial.Server, headers: list[tuple[bytes, bytes]]
) -> None:
    with trio.fail_after(10):
        assert await handshake_status(server.port, headers) == 401
        assert server.statistics().sessions == 0


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(agent_headers(token="wrong-token"), id="wrong-token"),
        pytest.param({"Authorization": f"Bearer {TOKEN}"}, id="no-tunnel-id"),
    ],
)
async def test_agent_run_once_rejected_401(
    server: revdial.Server, headers: dict[str, str]
) -> None:
    agent = revdial.Agent(ws_url(server), headers=headers, allow=[])
    with trio.fail_after(10), pytest.raises(revdial.HandshakeError) as info:
        await agent.run_once()
    assert info.value.status == 401
    assert "failed authentication" in info.value.body
    assert server.statistics().sessions == 0
    assert agent.session is None


async def test_handshake_wrong_path_404(server: revdial.Server) -> None:
    with trio.fail_after(10):
        assert await handshake_status(server.port, raw_headers(), "/elsewhere") == 404
        agent = revdial.Agent(ws_url(server, path="/elsewhere"), headers=agent_headers())
        with pytest.raises(revdial.HandshakeError) as info:
            await agent.run_once()
        assert info.value.status == 404
        assert server.statistics().sessions == 0


async def test_plain_http_get_400(server: revdial.Server) -> None:
    with trio.fail_after(10):
        async with await trio.open_tcp_stream("127.0.0.1", server.port) as sock:
            await sock.send_all(
                b"GET /connect HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                + b"".join(k + b": " + v + b"\r\n" for k, v in raw_headers())
                + b"\r\n"
            )
            response = b""
            while b"\r\n" not in response:
                data = await sock.receive_some()
                assert data, f"EOF before a status line: {response!r}"
                response += data
        assert response.startswith(b"HTTP/1.1 400 "), response
        assert server.statistics().sessions == 0


# --- TLS ------------------------------------------------------------------------------


def _server_ssl(ca: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


async def test_tls_pinned_ca(tmp_path: Path, echo_server: int) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    checksum = hashlib.sha256(ca_file.read_bytes()).hexdigest()
    client_ctx = revdial.make_ssl_context(ca_file=str(ca_file), ca_checksum=checksum)
    async with revdial.open_server(
        revdial.token_authorizer(token=TOKEN), ssl_context=_server_ssl(ca)
    ) as server:
        url = ws_url(server, scheme="wss")
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                await nursery.start(
                    partial(
                        revdial.connect,
                        url,
                        headers=agent_headers(),
                        allow=[f"127.0.0.1:{echo_server}"],
                        ssl_context=client_ctx,
                    )
                )
                await server.wait_client(CLIENT_KEY)
                stream = await server.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{echo_server}")
                async with stream:
                    await echo_roundtrip(stream, b"over wss" * 10000)
            nursery.cancel_scope.cancel()


def test_tls_wrong_checksum(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    wrong = hashlib.sha256(b"some other file").hexdigest()
    with pytest.raises(ValueError, match="checksum"):
        revdial.make_ssl_context(ca_file=str(ca_file), ca_checksum=wrong)
    # The right checksum is accepted, in any case.
    right = hashlib.sha256(ca_file.read_bytes()).hexdigest().upper()
    ctx = revdial.make_ssl_context(ca_file=str(ca_file), ca_checksum=right)
    assert isinstance(ctx, ssl.SSLContext)


async def _untrusted_ca_error(tmp_path: Path) -> revdial.HandshakeError:
    other_ca_file = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca_file))
    async with revdial.open_server(
        revdial.token_authorizer(token=TOKEN), ssl_context=_server_ssl(trustme.CA())
    ) as server:
        agent = revdial.Agent(
            ws_url(server, scheme="wss"),
            headers=agent_headers(),
            ssl_context=revdial.make_ssl_context(ca_file=str(other_ca_file)),
        )
        with trio.fail_after(10), pytest.raises(revdial.HandshakeError) as info:
            await agent.run_once()
        assert server.statistics().sessions == 0
    return info.value


async def test_tls_untrusted_ca(tmp_path: Path) -> None:
    error = await _untrusted_ca_error(tmp_path)
    assert error.status is None  # no HTTP answer: TLS failed first
    assert "certificate verify failed" in str(error).lower(), error


# --- unix socket targets ---------------------------------------------------------


async def test_unix_socket_target(tmp_path: Path, server: revdial.Server,
                                  extensions: bool) -> None:
    path = str(tmp_path / "echo.sock")
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen()
    listener = trio.SocketListener(sock)

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await echo_handler(stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, [listener])
        async with run_agent(server, [f"unix:{path}"], extensions=extensions):
            with trio.fail_after(10):
                stream = await server.dial(CLIENT_KEY, "unix", path)
                async with stream:
                    await echo_roundtrip(stream, b"over a unix socket")
                    await echo_roundtrip(stream, b"u" * (512 * KiB))
        nursery.cancel_scope.cancel()


# --- several sessions for one client key -------------------------------------------


async def test_two_sessions_oldest_first(server: revdial.Server, echo_server: int) -> None:
    target = f"127.0.0.1:{echo_server}"
    async with trio.open_nursery() as nursery:
        first, kill_first = await spawn_agent(nursery, server, [target])
        second, _ = await spawn_agent(nursery, server, [target], sessions=2)
        old, new = server.sessions(CLIENT_KEY)
        assert (server.statistics().sessions, server.statistics().clients) == (2, 1)
        assert first.session is not None
        assert second.session is not None
        with trio.fail_after(10):
            stream = await server.dial(CLIENT_KEY, "tcp", target)
            assert stream.session is old
            async with stream:
                await echo_roundtrip(stream, b"via the oldest")
                assert first.session.statistics().streams == 1
                assert second.session.statistics().streams == 0

            kill_first.cancel()  # the oldest agent dies
            await wait_until(lambda: server.sessions(CLIENT_KEY) == [new])
            stream = await server.dial(CLIENT_KEY, "tcp", target)
            assert stream.session is new
            async with stream:
                await echo_roundtrip(stream, b"via the survivor")
                assert second.session.statistics().streams == 1
            assert server.statistics().sessions == 1
        nursery.cancel_scope.cancel()
