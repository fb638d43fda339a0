"""Slow-loris: request heads dribbled byte by byte are cut off on time.

On the server's WebSocket listener (``Limits.handshake_timeout`` bounds the
whole upgrade), on the front door and on the agent's reverse proxy
(``ProxyLimits.header_timeout`` from a head's first byte to its end, after an
``idle_timeout`` wait for that first byte; on HTTPS the TLS handshake too,
from the connection). On the WebSocket listener a dribbling connection also
holds no handshake slot (``revdial._handshake``): 40 of them, or a dribbled
ClientHello with a single slot, delay no honest agent (that the slots still
bound concurrent upgrades is checked in ``tests/test_fleet.py``). Memory
streams and a MockClock:
the times asserted are exact, and no test waits on the wall clock.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any, cast

import pytest
import trio
import trio.testing
import trio_websocket
import trustme

import revdial
from revdial._handshake import ReplayStream, SlotGate, read_request_head
from revdial._proxy import ProxyLimits

HEAD = (b"GET /k8s/clusters/c1/version HTTP/1.1\r\nHost: fd\r\n"
        b"User-Agent: slow/1\r\nAccept: */*\r\n\r\n")
UPGRADE = (b"GET /connect HTTP/1.1\r\nHost: server\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\nX-Tunnel-ID: slow\r\n"
           b"Authorization: Bearer s3cret\r\n\r\n")


async def dribble(stream: trio.abc.SendStream, data: bytes, interval: float) -> None:
    """Send ``data`` one byte every ``interval`` seconds, until done or cut off."""
    try:
        for i in range(len(data)):
            await stream.send_all(data[i:i + 1])
            await trio.sleep(interval)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def read_until_closed(stream: trio.abc.ReceiveStream) -> tuple[bytes, float]:
    """Everything the peer sends until it closes, and when it closed."""
    buf = bytearray()
    try:
        while data := await stream.receive_some():
            buf += data
    except trio.BrokenResourceError:
        pass
    return bytes(buf), trio.current_time()


async def test_websocket_listener_cuts_a_dribbled_upgrade_at_the_handshake_timeout(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="revdial")
    server = revdial.Server(revdial.token_authorizer(token="s3cret"),
                            limits=revdial.Limits(handshake_timeout=10.0))
    server_end, client_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        nursery.start_soon(server._serve_stream, server_end, "slow-peer")
        nursery.start_soon(dribble, client_end, UPGRADE, 1.0)  # 240 bytes: 240 s
        answer, closed_at = await read_until_closed(client_end)
        nursery.cancel_scope.cancel()
    assert answer == b""  # no 101, no session: closed, as Go's server does
    assert closed_at - t0 == 10.0
    assert server.statistics().sessions == 0
    assert "slow-peer: no WebSocket handshake within 10 s" in caplog.text


async def test_websocket_listener_accepts_an_upgrade_sent_slowly_within_the_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The bound is the handshake's, not the pace: a slow link that makes it is served."""
    server = revdial.Server(revdial.token_authorizer(token="s3cret"),
                            limits=revdial.Limits(handshake_timeout=10.0))
    server_end, client_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._serve_stream, server_end, "slow-peer")
        await dribble(client_end, UPGRADE, 9.0 / len(UPGRADE))
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            buf += await client_end.receive_some()
        assert buf.startswith(b"HTTP/1.1 101 ")
        await server.wait_client("slow")
        nursery.cancel_scope.cancel()


async def _serve_front_door(nursery: trio.Nursery) -> trio.abc.Stream:
    server = revdial.Server(revdial.token_authorizer(token="agents"))  # no agent connects
    front_door = revdial.FrontDoor(server, revdial.UserTokens({"user-tok": "*"}),
                                   limits=ProxyLimits(header_timeout=10.0, idle_timeout=90.0))
    client, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(front_door.handle, server_side)
    return client


async def test_front_door_answers_408_to_a_dribbled_head(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="revdial")
    async with trio.open_nursery() as nursery:
        client = await _serve_front_door(nursery)
        await trio.sleep(60)  # the wait for a first byte is idle_timeout's (90 s)
        t0 = trio.current_time()
        nursery.start_soon(dribble, client, HEAD, 1.0)
        answer, closed_at = await read_until_closed(client)
        nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    assert answer.endswith(b"request head not received in time\n")
    assert closed_at - t0 == 10.0
    assert "request head not complete 10 s after its first byte -> 408" in caplog.text


async def test_front_door_serves_a_head_that_ends_in_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with trio.open_nursery() as nursery:
        client = await _serve_front_door(nursery)
        await trio.sleep(60)
        await dribble(client, HEAD, 9.5 / len(HEAD))  # slow, but within 10 s
        answer, _ = await read_until_closed(client)
        nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 401 "), answer  # parsed and routed: no bearer token


async def test_front_door_head_clock_starts_at_the_heads_first_byte(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Blank lines between requests (ignored, RFC 9112 2.2) do not start the
    clock; the head's own first byte does."""
    async with trio.open_nursery() as nursery:
        client = await _serve_front_door(nursery)
        await client.send_all(b"\r\n")
        await trio.sleep(30)
        t0 = trio.current_time()
        nursery.start_soon(dribble, client, HEAD, 2.0)
        answer, closed_at = await read_until_closed(client)
        nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert closed_at - t0 == 10.0


async def test_agent_proxy_answers_408_to_a_dribbled_head(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def never(*_: object) -> trio.abc.Stream:
        raise AssertionError("no request reaches the upstream")

    proxy = revdial.ReverseProxy("http://127.0.0.1:1", connect=never,
                                 limits=ProxyLimits(header_timeout=5.0))
    async with proxy, trio.open_nursery() as nursery:
        client, server_side = trio.testing.memory_stream_pair()
        nursery.start_soon(proxy, server_side)
        t0 = trio.current_time()
        nursery.start_soon(dribble, client, HEAD, 0.5)
        answer, closed_at = await read_until_closed(client)
        nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert closed_at - t0 == 5.0


def test_header_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeouts must be positive"):
        ProxyLimits(header_timeout=0)


def _tls_front_door() -> tuple[revdial.FrontDoor, ssl.SSLContext]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("front.example").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    server = revdial.Server(revdial.token_authorizer(token="agents"))
    front_door = revdial.FrontDoor(server, revdial.UserTokens({"user-tok": "*"}),
                                   limits=ProxyLimits(header_timeout=10.0),
                                   ssl_context=server_ctx)
    return front_door, client_ctx


def _client_hello() -> bytes:
    """The first flight of a real TLS client (a ClientHello), as bytes."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="front.example")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def test_https_front_door_cuts_a_dribbled_tls_handshake(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="revdial")
    front_door, _ = _tls_front_door()
    hello = _client_hello()
    async with trio.open_nursery() as nursery:
        client, server_side = trio.testing.memory_stream_pair()
        t0 = trio.current_time()
        nursery.start_soon(front_door._accept, server_side, "192.0.2.9")
        nursery.start_soon(dribble, client, hello, 1.0)  # hundreds of bytes: minutes
        answer, closed_at = await read_until_closed(client)
        nursery.cancel_scope.cancel()
    assert answer == b""  # not even a ServerHello: the ClientHello never ended
    assert closed_at - t0 == 10.0
    assert "no TLS handshake from 192.0.2.9 within 10 s, closed" in caplog.text


async def test_https_front_door_serves_a_tls_client(autojump_clock: trio.abc.Clock) -> None:
    front_door, client_ctx = _tls_front_door()
    async with trio.open_nursery() as nursery:
        client, server_side = trio.testing.memory_stream_pair()
        nursery.start_soon(front_door._accept, server_side, "192.0.2.9")
        tls = trio.SSLStream(client, client_ctx, server_hostname="front.example",
                             https_compatible=True)
        await tls.send_all(HEAD)
        answer = bytearray()
        while b"\r\n" not in answer:
            answer += await tls.receive_some()
        nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 401 ")  # served over TLS: no bearer token


# --- dribblers do not hold the WebSocket listener's handshake slots ---------------------


async def _honest_agent(
    nursery: trio.Nursery, client: trio.abc.Stream, key: str, host: str = "server"
) -> None:
    """A WebSocket client that sends its upgrade at once (as every real agent does)."""
    await trio_websocket.wrap_client_stream(
        nursery, cast(Any, client), host, "/connect",
        extra_headers=[(b"X-Tunnel-ID", key.encode()), (b"Authorization", b"Bearer s3cret")],
    )


async def test_dribbling_connections_hold_no_handshake_slot(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """40 slow-loris connections (more than the 32 slots) do not delay an honest
    agent by a single (virtual) second, and are still cut at the deadline."""
    caplog.set_level(logging.INFO, logger="revdial")
    limits = revdial.Limits(handshake_timeout=10.0, max_concurrent_handshakes=32)
    server = revdial.Server(revdial.token_authorizer(token="s3cret"), limits=limits)
    closed: list[float] = []
    all_closed = trio.Event()

    async def dribbler(i: int) -> None:
        server_end, client_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server._serve_stream, server_end, f"slow-{i}")
        nursery.start_soon(dribble, client_end, UPGRADE, 1.0)
        answer, closed_at = await read_until_closed(client_end)
        assert answer == b""
        closed.append(closed_at)
        if len(closed) == 40:
            all_closed.set()

    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        for i in range(40):
            nursery.start_soon(dribbler, i)
        await trio.sleep(1.5)  # every dribbler is connected and has sent bytes
        assert server._handshakes.borrowed_tokens == 0
        server_end, client_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server._serve_stream, server_end, "honest")
        await _honest_agent(nursery, client_end, "honest")
        await server.wait_client("honest")
        assert trio.current_time() == t0 + 1.5  # no wait for a slot
        await all_closed.wait()
        nursery.cancel_scope.cancel()
    assert closed == [t0 + 10.0] * 40
    assert server.statistics().sessions == 0  # the honest one ended with the test
    messages = [r.getMessage() for r in caplog.records]
    assert sum("no WebSocket handshake within 10 s" in m for m in messages) == 40
    assert not any("waiting 10 s for a handshake slot" in m for m in messages)


def _tls_server(slots: int) -> tuple[revdial.Server, ssl.SSLContext]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("front.example").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    limits = revdial.Limits(handshake_timeout=10.0, max_concurrent_handshakes=slots)
    server = revdial.Server(revdial.token_authorizer(token="s3cret"), limits=limits,
                            ssl_context=server_ctx)
    return server, client_ctx


async def test_a_dribbled_client_hello_holds_no_handshake_slot(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """With TLS and a single slot: a ClientHello dribbled byte by byte does not
    keep an honest wss:// agent waiting, and is cut at the deadline."""
    caplog.set_level(logging.INFO, logger="revdial")
    server, client_ctx = _tls_server(slots=1)
    hello = _client_hello()
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        slow_server, slow_client = trio.testing.memory_stream_pair()
        nursery.start_soon(server._serve_stream, slow_server, "slow-tls")
        nursery.start_soon(dribble, slow_client, hello, 1.0)  # hundreds of bytes: minutes
        await trio.sleep(2.5)
        server_end, client_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server._serve_stream, server_end, "honest")
        tls = trio.SSLStream(client_end, client_ctx, server_hostname="front.example")
        await _honest_agent(nursery, tls, "honest", "front.example")
        await server.wait_client("honest")
        assert trio.current_time() == t0 + 2.5
        answer, closed_at = await read_until_closed(slow_client)
        nursery.cancel_scope.cancel()
    assert answer == b""  # no ServerHello: the ClientHello never ended
    assert closed_at == t0 + 10.0
    assert "slow-tls: no WebSocket handshake within 10 s" in caplog.text


async def test_slot_gate_holds_a_slot_only_while_there_is_work() -> None:
    """The TLS layer's view: a slot while it has received bytes to work on,
    none while it waits for the peer; none at all once opened."""
    slots = trio.CapacityLimiter(1)
    ours, theirs = trio.testing.memory_stream_pair()
    gate = SlotGate(ours, slots)
    async with trio.open_nursery() as nursery:
        received: list[bytes] = []

        async def receive() -> None:
            received.append(bytes(await gate.receive_some()))

        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        assert (slots.borrowed_tokens, gate.holding) == (0, False)  # waiting: no slot
        # Someone else works meanwhile: the bytes that arrive wait for the slot.
        await slots.acquire()
        await theirs.send_all(b"hello")
        await trio.testing.wait_all_tasks_blocked()
        assert received == []
        slots.release()
        await trio.testing.wait_all_tasks_blocked()
        assert (received, gate.holding, slots.borrowed_tokens) == ([b"hello"], True, 1)
        nursery.start_soon(receive)  # the next wait gives it back
        await trio.testing.wait_all_tasks_blocked()
        assert (gate.holding, slots.borrowed_tokens) == (False, 0)
        await theirs.send_all(b"more")
        await trio.testing.wait_all_tasks_blocked()
        assert gate.holding
        gate.open()
        assert (gate.holding, slots.borrowed_tokens) == (False, 0)
        await slots.acquire()  # all slots taken: an open gate does not care
        nursery.start_soon(receive)
        await theirs.send_all(b"after")
        await trio.testing.wait_all_tasks_blocked()
        assert received == [b"hello", b"more", b"after"]
        slots.release()
    await gate.aclose()
    assert slots.borrowed_tokens == 0


async def test_read_request_head_stops_at_the_end_of_the_head() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    await theirs.send_all(UPGRADE[:10])
    await theirs.send_all(UPGRADE[10:] + b"trailing")
    assert await read_request_head(ours, 65536) == UPGRADE + b"trailing"
    # Malformed or oversized: what was read, for wsproto to answer as always.
    ours, theirs = trio.testing.memory_stream_pair()
    await theirs.send_all(b"NOT HTTP\r\n\r\n")
    assert await read_request_head(ours, 65536) == b"NOT HTTP\r\n\r\n"
    ours, theirs = trio.testing.memory_stream_pair()
    big = b"GET / HTTP/1.1\r\nX: " + b"a" * 40_000
    await theirs.send_all(big)
    assert await read_request_head(ours, 8192) == big[:24 * 1024]  # h11's 16 KiB + a read
    ours, theirs = trio.testing.memory_stream_pair()
    await theirs.send_all(b"GET / HT")
    await theirs.aclose()
    assert await read_request_head(ours, 65536) == b"GET / HT"  # end of stream
    replay = ReplayStream(ours, b"abcdef")
    assert await replay.receive_some(4) == b"abcd"
    assert await replay.receive_some() == b"ef"
