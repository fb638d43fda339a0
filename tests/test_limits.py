"""Limits of issue 12 not covered elsewhere: sessions per client key, message
size, streams per session, the idle-stream timeout, and their validation.

(Elsewhere: ``max_sessions`` and ``handshake_timeout`` in test_fleet.py and
test_slowloris.py, ``max_pending_dials`` in test_connect_flood.py, the send
queue bound -- ``outbox_bytes``, ``max_control_frames`` -- against a peer
that never reads in test_session.py, stream and session buffers in
test_state.py and test_session.py.) Memory streams and a MockClock.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import socket
from collections.abc import Callable
from typing import Any, cast

import pytest
import trio
import trio.testing
import trio_websocket

import revdial
import revdial._splice as splice_module
from revdial._cli import _build_parser as build_parser
from revdial._limits import DEFAULT_LIMITS
from revdial.testing import FakeNetwork
from session_pairs import open_pair


async def _slow_authorize(request: revdial.HandshakeRequest) -> str | None:
    await trio.sleep(1)  # the handshakes overlap: reservations must count
    return request.headers.get("x-tunnel-id")


async def _connect(
    server: revdial.Server, nursery: trio.Nursery, key: str
) -> trio_websocket.WebSocketConnection | tuple[int, bytes | None]:
    """A raw agent over memory: its connection, or the rejection's (status, body)."""
    server_end, client_end = trio.testing.memory_stream_pair()
    nursery.start_soon(server._serve_stream, server_end, f"peer-of-{key}")

    async def client(*, task_status: trio.TaskStatus[Any]) -> None:
        rejected: list[Any] = []
        try:
            async with trio.open_nursery() as own:  # hosts the client's reader
                ws = await trio_websocket.wrap_client_stream(
                    own, cast(Any, client_end), "server", "/connect",
                    extra_headers=[(b"X-Tunnel-ID", key.encode())],
                )
                task_status.started(ws)
        except* trio_websocket.ConnectionRejected as group:
            rejected.extend(group.exceptions)
        if rejected:
            task_status.started((rejected[0].status_code, rejected[0].body))

    result: trio_websocket.WebSocketConnection | tuple[int, bytes | None] = (
        await nursery.start(client))
    return result


async def test_sessions_per_client_key_are_bounded(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="revdial")
    limits = revdial.Limits(max_sessions_per_client=2)
    server = revdial.Server(_slow_authorize, limits=limits)
    async with trio.open_nursery() as nursery:
        results: dict[int, Any] = {}

        async def connect(i: int, key: str) -> None:
            results[i] = await _connect(server, nursery, key)

        async with trio.open_nursery() as handshakes:  # three at once for key "a"
            for i in range(3):
                handshakes.start_soon(connect, i, "a")
        rejected = [r for r in results.values() if isinstance(r, tuple)]
        assert rejected == [(503, b"too many sessions for this client key\n")]
        assert len(server.sessions("a")) == 2
        # Other client keys are not affected.
        other = await _connect(server, nursery, "b")
        assert isinstance(other, trio_websocket.WebSocketConnection)
        # One of a's sessions ends: a may connect again.
        first = next(r for r in results.values() if not isinstance(r, tuple))
        await first.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert len(server.sessions("a")) == 1
        again = await _connect(server, nursery, "a")
        assert isinstance(again, trio_websocket.WebSocketConnection)
        assert len(server.sessions("a")) == 2
        assert server.counters().handshakes_rejected == {503: 1}
        nursery.cancel_scope.cancel()
    assert server._reserved == {}  # no reservation leaked
    assert "client 'a' already has 2 sessions (max_sessions_per_client) -> 503" in caplog.text


async def test_a_message_over_max_message_size_ends_only_its_session(
    autojump_clock: trio.abc.Clock,
) -> None:
    limits = revdial.Limits(max_message_size=64 * 1024)

    async def authorize(request: revdial.HandshakeRequest) -> str | None:
        return request.headers.get("x-tunnel-id")

    server = revdial.Server(authorize, limits=limits)
    async with trio.open_nursery() as nursery:
        hostile = await _connect(server, nursery, "hostile")
        good = await _connect(server, nursery, "good")
        assert isinstance(hostile, trio_websocket.WebSocketConnection)
        assert isinstance(good, trio_websocket.WebSocketConnection)
        await server.wait_client("hostile")
        await hostile.send_message(bytes(64 * 1024 + 1))  # one byte over
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await hostile.get_message()
        assert info.value.reason is not None
        assert info.value.reason.code == 1009  # MESSAGE_TOO_BIG
        await trio.testing.wait_all_tasks_blocked()
        assert server.clients() == ["good"]
        assert not good.closed
        nursery.cancel_scope.cancel()


async def test_streams_per_session_are_bounded_on_both_sides(
    autojump_clock: trio.abc.Clock,
) -> None:
    net = FakeNetwork()
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        net.listen("10.0.0.1:80", revdial.testing.echo_handler)
        agent_limits = dataclasses.replace(DEFAULT_LIMITS, max_streams=2)
        handler = revdial.make_connect_handler(allow=["10.0.0.1:80"], dialer=net.dial,
                                               limits=agent_limits)
        async with open_pair(server_limits=DEFAULT_LIMITS, client_limits=agent_limits,
                             extensions=1, on_connect=handler) as p:
            streams = [await p.server.dial(p.server.open_stream("tcp", "10.0.0.1:80"),
                                           connect_timeout=5) for _ in range(2)]
            # The agent refuses a third stream with a clear reason; the session goes on.
            with pytest.raises(revdial.DialError) as info:
                await p.server.dial(p.server.open_stream("tcp", "10.0.0.1:80"),
                                    connect_timeout=5)
            assert info.value.reason == "revdial: too many streams (2)"
            assert p.client.is_open
            await streams[0].send_all(b"still works")
            assert await streams[0].receive_some() == b"still works"
        async with open_pair(limits=agent_limits) as p:
            for _ in range(2):
                p.server.open_stream("tcp", "10.0.0.1:80")
            # Our own side: opening a third raises at once, nothing is sent.
            with pytest.raises(revdial.TunnelError, match="stream limit"):
                p.server.open_stream("tcp", "10.0.0.1:80")
        nursery.cancel_scope.cancel()


async def test_idle_stream_timeout_resets_a_quiet_connection(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="revdial")
    net = FakeNetwork()
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        net.listen("10.0.0.1:80", revdial.testing.echo_handler)
        limits = dataclasses.replace(DEFAULT_LIMITS, idle_stream_timeout=60.0,
                                     ping_timeout=3600.0)
        handler = revdial.make_connect_handler(allow=["10.0.0.1:80"], dialer=net.dial,
                                               limits=limits)
        async with open_pair(limits=limits, extensions=1, on_connect=handler) as p:
            stream = await p.server.dial(p.server.open_stream("tcp", "10.0.0.1:80"),
                                         connect_timeout=5)
            # Traffic every 50 s keeps it open: the clock restarts with each byte.
            for _ in range(3):
                await trio.sleep(50)
                await stream.send_all(b"x")
                assert await stream.receive_some() == b"x"
            quiet_since = trio.current_time()
            with pytest.raises(revdial.StreamResetError) as info:
                await stream.receive_some()
            assert trio.current_time() - quiet_since == 60.0
            assert info.value.reason == "revdial: idle for 60 s"
            assert p.client.is_open  # only that stream
            await trio.testing.wait_all_tasks_blocked()
            assert p.client.statistics().streams == 0
        nursery.cancel_scope.cancel()
    assert "no data either way for 60 s, reset" in caplog.text


@pytest.mark.parametrize("field", ["max_sessions", "max_sessions_per_client", "max_streams",
                                   "max_pending_dials", "max_message_size",
                                   "max_concurrent_handshakes"])
def test_counts_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        revdial.Limits(**{field: 0})


def test_idle_stream_timeout_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="idle_stream_timeout"):
        revdial.Limits(idle_stream_timeout=-1)


def test_cli_limit_flags() -> None:
    parser = build_parser()
    args = parser.parse_args(["server", "--listen", "127.0.0.1:1", "--max-sessions", "9",
                              "--max-sessions-per-client", "3", "--idle-stream-timeout", "300"])
    assert (args.max_sessions, args.max_sessions_per_client, args.idle_stream_timeout) == (
        9, 3, 300.0)
    args = parser.parse_args(["agent", "--server", "ws://h:1/connect", "--id", "k",
                              "--max-pending-dials", "16", "--idle-stream-timeout", "0"])
    assert (args.max_pending_dials, args.idle_stream_timeout) == (16, 0.0)
    defaults = parser.parse_args(["server", "--listen", "127.0.0.1:1"])
    assert defaults.max_sessions_per_client == DEFAULT_LIMITS.max_sessions_per_client == 32
    assert defaults.idle_stream_timeout == DEFAULT_LIMITS.idle_stream_timeout == 0.0
    for bad in (["--max-sessions", "0"], ["--idle-stream-timeout", "-1"],
                ["--idle-stream-timeout", "nan"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["server", "--listen", "127.0.0.1:1", *bad])


async def test_idle_stream_timeout_counts_direct_socket_io(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a plain socket the splice's bytes can bypass its loops (the session's
    reader writes them, ``direct_reads`` reads them): they count as activity
    too. A unix socketpair, whose transfers the kernel completes at once."""
    direct_writes: list[int] = []
    real = splice_module.direct_writer

    def counting(local: trio.abc.Stream) -> Callable[[bytes], int] | None:
        sink = real(local)
        assert sink is not None

        def write(data: bytes) -> int:
            direct_writes.append(len(data))
            return sink(data)

        return write

    monkeypatch.setattr(splice_module, "direct_writer", counting)
    a, b = socket.socketpair()
    local = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    peer = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    async with open_pair(extensions=1) as p, peer, trio.open_nursery() as nursery:
        ours, agent = await p.open()
        nursery.start_soon(functools.partial(revdial.splice, ours, local, read_size=65536,
                                             idle_timeout=60.0))
        for _ in range(3):  # only tunnel -> socket, every 50 s
            await trio.sleep(50)
            await agent.send_all(b"x")
            assert await peer.receive_some() == b"x"
        for _ in range(3):  # only socket -> tunnel, every 50 s
            await trio.sleep(50)
            await peer.send_all(b"y")
            assert await agent.receive_some() == b"y"
        quiet_since = trio.current_time()
        with pytest.raises(revdial.StreamResetError, match="idle for 60 s"):
            await agent.receive_some()
        assert trio.current_time() - quiet_since == 60.0
        # Aborted (a unix socket has no reset: its peer reads EOF; TCP gets an RST).
        assert await peer.receive_some() == b""
    assert direct_writes == [1, 1, 1]
