"""The agent's h11 reverse proxy, on memory streams.

The downstream (what the server sends through the tunnel) is one end of a
memory stream pair; the upstream connections the proxy opens are memory
stream pairs too (``ReverseProxy(connect=...)``), served by a scripted h11
server in the test. Timeouts run under ``MockClock(autojump_threshold=0)``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import revdial
from conftest import open_tcp_pair, read_until_reset, receive_until, serve_target
from revdial._proxy import (
    _BODY_AS_IS,
    _BODY_CHUNKED,
    _BODY_NONE,
    PROXY_ADDRESS,
    PROXY_TARGET,
    ProxyLimits,
    ReverseProxy,
    TokenFile,
    _Answer,
    _request_head,
    _response_head,
    end_to_end_headers,
)
from revdial._standin import HTTPConnection

KiB = 1024
MiB = 1024 * KiB
UPSTREAM = "https://api.example:6443"

Handler = Callable[["Upstream", trio.abc.Stream], Awaitable[None]]


@dataclass
class Seen:
    """A request as the upstream received it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def get(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name]


@dataclass
class Upstream:
    """The proxy's upstream: every connection it opens is served by ``handler``."""

    handler: Handler
    requests: list[Seen] = field(default_factory=list)
    connections: int = 0
    closed: int = 0
    refuse: bool = False
    hang: bool = False

    async def serve_h11(
        self,
        stream: trio.abc.Stream,
        respond: Callable[[Seen, h11.Connection], list[h11.Event]],
        *,
        close_after: bool = False,
    ) -> None:
        """A keep-alive h11 server answering each request with ``respond(seen)``."""
        conn = h11.Connection(h11.SERVER)
        while True:
            seen: Seen | None = None
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some()))
                elif isinstance(event, h11.Request):
                    seen = Seen(
                        event.method.decode(),
                        event.target.decode(),
                        [(n.decode(), v.decode()) for n, v in event.headers],
                    )
                elif isinstance(event, h11.Data):
                    assert seen is not None
                    seen.body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return  # closed
            assert seen is not None
            self.requests.append(seen)
            for ev in respond(seen, conn):
                await stream.send_all(conn.send(ev) or b"")
            if close_after or conn.our_state is not h11.DONE:
                await stream.aclose()
                return
            conn.start_next_cycle()


def ok(body: bytes = b"ok", headers: list[tuple[str, str]] | None = None) -> list[h11.Event]:
    hdrs = headers if headers is not None else [("content-length", str(len(body)))]
    return [h11.Response(status_code=200, headers=hdrs), h11.Data(data=body), h11.EndOfMessage()]


@asynccontextmanager
async def open_proxy(
    handler: Handler,
    *,
    limits: ProxyLimits | None = None,
    token_file: Path | None = None,
    forwarded_for: str | None = "192.0.2.1",
    lockstep: bool = False,
) -> AsyncIterator[tuple[ReverseProxy, Upstream, trio.Nursery]]:
    upstream = Upstream(handler)
    async with trio.open_nursery() as nursery:

        async def connect() -> trio.abc.Stream:
            if upstream.refuse:
                raise OSError(errno.ECONNREFUSED, "Connection refused")
            if upstream.hang:
                await trio.sleep_forever()
            pair = trio.testing.lockstep_stream_pair if lockstep else (
                trio.testing.memory_stream_pair
            )
            ours, theirs = pair()
            upstream.connections += 1

            async def serve() -> None:
                try:
                    await handler(upstream, theirs)
                except (trio.BrokenResourceError, trio.ClosedResourceError,
                        h11.RemoteProtocolError):
                    pass  # the proxy closed the connection
                finally:
                    upstream.closed += 1
                    await theirs.aclose()

            nursery.start_soon(serve)
            return ours

        proxy = ReverseProxy(
            UPSTREAM,
            connect=connect,
            token_file=token_file,
            forwarded_for=forwarded_for,
            limits=limits or ProxyLimits(),
        )
        yield proxy, upstream, nursery
        nursery.cancel_scope.cancel()


def downstream(nursery: trio.Nursery, proxy: ReverseProxy, *, lockstep: bool = False
               ) -> trio.abc.Stream:
    """A new downstream connection (as a tunnel stream would be) served by the proxy."""
    pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    client, server_side = pair()
    nursery.start_soon(proxy, server_side)
    return client


async def read_all(stream: trio.abc.Stream) -> bytes:
    buf = bytearray()
    while data := await stream.receive_some():
        buf += data
    return bytes(buf)


async def raw_exchange(nursery: trio.Nursery, proxy: ReverseProxy, data: bytes) -> bytes:
    """Send raw bytes, read until the proxy closes the connection."""
    client = downstream(nursery, proxy)
    await client.send_all(data)
    return await read_all(client)


async def read_request(conn: h11.Connection, stream: trio.abc.Stream) -> None:
    """Read one request (head and body) into ``conn``."""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some()))


async def echo_handler(up: Upstream, stream: trio.abc.Stream) -> None:
    await up.serve_h11(stream, lambda seen, conn: ok(seen.body or b"ok"))


# --- header rewriting -----------------------------------------------------------------


async def test_request_headers_are_rewritten() -> None:
    with trio.fail_after(10):
        async with open_proxy(echo_handler) as (proxy, up, nursery):
            conn = HTTPConnection(downstream(nursery, proxy), host="front.example")
            resp = await conn.request("GET", "/api/v1/pods?watch=1", headers=[
                ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "secret"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Trailer", "X-Checksum"),
                ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
                ("Proxy-Connection", "keep-alive"),
                ("Upgrade", "h2c"),
                ("X-Forwarded-For", "198.51.100.7"),
                ("Accept", "application/json"),
            ])
            assert resp.status == 200
    (seen,) = up.requests
    assert seen.target == "/api/v1/pods?watch=1"
    names = [n for n, _ in seen.headers]
    for hop in ("connection", "x-hop", "keep-alive", "te", "trailer", "proxy-authorization",
                "proxy-connection", "upgrade", "transfer-encoding"):
        assert hop not in names
    assert seen.get("host") == ["api.example:6443"]
    assert seen.get("accept") == ["application/json"]
    assert seen.get("x-forwarded-for") == ["198.51.100.7, 192.0.2.1"]
    assert seen.get("x-forwarded-proto") == ["http"]
    assert seen.get("x-forwarded-host") == ["front.example"]


async def test_forwarded_headers_from_the_front_door_are_kept() -> None:
    with trio.fail_after(10):
        async with open_proxy(echo_handler, forwarded_for=None) as (proxy, up, nursery):
            conn = HTTPConnection(downstream(nursery, proxy), host="revdial.proxy")
            await conn.request("GET", "/", headers=[
                ("X-Forwarded-For", "203.0.113.9"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "rancher.example"),
            ])
    (seen,) = up.requests
    assert seen.get("x-forwarded-for") == ["203.0.113.9"]
    assert seen.get("x-forwarded-proto") == ["https"]
    assert seen.get("x-forwarded-host") == ["rancher.example"]


async def test_token_file_replaces_authorization_and_is_reread(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first-token\n")
    with trio.fail_after(10):
        async with open_proxy(echo_handler, token_file=token) as (proxy, up, nursery):
            conn = HTTPConnection(downstream(nursery, proxy))
            await conn.request("GET", "/a", headers=[("Authorization", "Bearer user-token"),
                                                     ("authorization", "Basic dXNlcg==")])
            # Rotated as Kubernetes does: a new file swapped in atomically.
            new = tmp_path / "token.new"
            new.write_text("second-token-rotated\n")
            os.replace(new, token)
            await conn.request("GET", "/b", headers=[("Authorization", "Bearer user-token")])
            # Rewritten in place.
            token.write_text("third\n")
            await conn.request("GET", "/c")
    assert [s.get("authorization") for s in up.requests] == [
        ["Bearer first-token"], ["Bearer second-token-rotated"], ["Bearer third"]
    ]


def test_token_file_keeps_last_token_when_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("tok\n")
    tf = TokenFile(path)
    path.unlink()
    assert tf.current() == "tok"
    with pytest.raises(ValueError, match="empty or unreadable"):
        TokenFile(tmp_path / "missing")


async def test_without_token_file_the_callers_authorization_passes() -> None:
    with trio.fail_after(10):
        async with open_proxy(echo_handler) as (proxy, up, nursery):
            conn = HTTPConnection(downstream(nursery, proxy))
            await conn.request("GET", "/", headers=[("Authorization", "Bearer x")])
    assert up.requests[0].get("authorization") == ["Bearer x"]


def test_end_to_end_headers_drops_what_connection_names() -> None:
    raw = [(b"Connection", b"close, X-A"), (b"X-A", b"1"), (b"X-B", b"2"),
           (b"Content-Length", b"3"), (b"Keep-Alive", b"x")]
    assert end_to_end_headers(raw) == [(b"x-b", b"2")]
    assert end_to_end_headers(raw, keep_content_length=True) == [
        (b"x-b", b"2"), (b"content-length", b"3")]


def test_reserved_address_can_never_be_dialled() -> None:
    from revdial._agent import AllowPolicy, split_host_port

    assert PROXY_TARGET == "tcp/revdial.proxy:0"
    with pytest.raises(ValueError, match="port"):
        split_host_port(PROXY_ADDRESS)
    assert not AllowPolicy(["*:*"])("tcp", PROXY_ADDRESS)


# --- response framing ------------------------------------------------------------------


async def test_response_hop_by_hop_removed_and_reframed() -> None:
    def respond(seen: Seen, conn: h11.Connection) -> list[h11.Event]:
        return [
            h11.Response(status_code=200, headers=[
                ("Transfer-Encoding", "chunked"), ("Connection", "X-Resp-Hop"),
                ("X-Resp-Hop", "1"), ("Keep-Alive", "timeout=9"), ("Trailer", "X-T"),
                ("X-Kept", "yes"),
            ]),
            h11.Data(data=b"hello "),
            h11.Data(data=b"world"),
            h11.EndOfMessage(),
        ]

    async def handler(up: Upstream, stream: trio.abc.Stream) -> None:
        await up.serve_h11(stream, respond)

    with trio.fail_after(10):
        async with open_proxy(handler) as (proxy, _, nursery):
            conn = HTTPConnection(downstream(nursery, proxy))
            resp = await conn.request("GET", "/")
            assert resp.body == b"hello world"
            assert resp.header("x-kept") == "yes"
            assert resp.header("transfer-encoding") == "chunked"
            for hop in ("x-resp-hop", "keep-alive", "trailer", "connection"):
                assert resp.header(hop) is None
            # An HTTP/1.0 client gets the same body, delimited by close.
            raw = await raw_exchange(nursery, proxy, b"GET / HTTP/1.0\r\n\r\n")
            head, _, body = raw.partition(b"\r\n\r\n")
            assert b"transfer-encoding" not in head.lower()
            assert body == b"hello world"


async def test_content_length_bodies_both_ways() -> None:
    with trio.fail_after(10):
        async with open_proxy(echo_handler) as (proxy, up, nursery):
            conn = HTTPConnection(downstream(nursery, proxy))
            resp = await conn.request("PUT", "/cm", body=b"x" * 100_000)
            assert resp.status == 200
            assert resp.body == b"x" * 100_000
            assert resp.header("content-length") == "100000"
            resp = await conn.request("POST", "/empty", body=b"")
    assert up.requests[0].get("content-length") == ["100000"]
    assert up.requests[0].body == b"x" * 100_000
    assert up.requests[1].get("content-length") == ["0"]


async def test_chunked_request_body_is_streamed_chunked() -> None:
    async def body() -> AsyncIterator[bytes]:
        for i in range(5):
            yield b"part-%d;" % i

    with trio.fail_after(10):
        async with open_proxy(echo_handler) as (proxy, up, nursery):
            conn = HTTPConnection(downstream(nursery, proxy))
            resp = await conn.request("POST", "/upload", body=body())
            assert resp.status == 200
    (seen,) = up.requests
    assert seen.get("transfer-encoding") == ["chunked"]
    assert seen.get("content-length") == []
    assert seen.body == b"part-0;part-1;part-2;part-3;part-4;"


async def test_head_request_and_no_body_statuses() -> None:
    def respond(seen: Seen, conn: h11.Connection) -> list[h11.Event]:
        if seen.method == "HEAD":
            return [h11.Response(status_code=200, headers=[("content-length", "1234")]),
                    h11.EndOfMessage()]
        return [h11.Response(status_code=304, headers=[]), h11.EndOfMessage()]

    async def handler(up: Upstream, stream: trio.abc.Stream) -> None:
        await up.serve_h11(stream, respond)

    with trio.fail_after(10):
        async with open_proxy(handler) as (proxy, _, nursery):
            conn = HTTPConnection(downstream(nursery, proxy))
            resp = await conn.request("HEAD", "/big")
            assert (resp.status, resp.header("content-length"), resp.body) == (200, "1234", b"")
            resp = await conn.request("GET", "/cached")
            assert (resp.status, resp.body) == (304, b"")
            assert conn.reusable


async def test_expect_100_continue_is_forwarded() -> None:
    async def handler(up: Upstream, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some()))
            elif isinstance(event, h11.Request):
                assert conn.they_are_waiting_for_100_continue
                interim = h11.InformationalResponse(status_code=100, headers=[])
                await stream.send_all(conn.send(interim) or b"")
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        for ev in ok(body):
            await stream.send_all(conn.send(ev) or b"")

    with trio.fail_after(10):
        async with open_proxy(handler) as (proxy, _, nursery):
            client = downstream(nursery, proxy)
            await client.send_all(b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                                  b"Content-Length: 4\r\n\r\n")
            interim = await receive_until(client, b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100 ")
            await client.send_all(b"data")
            rest = await receive_until(client, b"data")
            assert rest.startswith(b"HTTP/1.1 200 ")
            assert rest.endswith(b"data")


# --- streaming ------------------------------------------------------------------------


async def test_chunked_response_is_forwarded_as_it_arrives() -> None:
    """A watch: each event reaches the client while the upstream waits for more."""
    release = [trio.Event() for _ in range(3)]

    async def handler(up: Upstream, stream: trio.abc.Stream) -> None:
        async def respond() -> None:
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                ("content-type", "application/json")])) or b"")
            for i, event in enumerate(release):
                await stream.send_all(conn.send(h11.Data(data=b'{"n": %d}\n' % i)) or b"")
                await event.wait()
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")

        conn = h11.Connection(h11.SERVER)
        await read_request(conn, stream)
        await respond()

    with trio.fail_after(10):
        async with open_proxy(handler) as (proxy, _, nursery):
            conn = HTTPConnection(downstream(nursery, proxy))
            async with conn.stream_request("GET", "/watch") as (resp, chunks):
                assert resp.header("transfer-encoding") == "chunked"
                got = []
                async for chunk in chunks:
                    got.append(chunk)
                    assert chunk == b'{"n": %d}\n' % (len(got) - 1)
                    release[len(got) - 1].set()  # the upstream sends more only now
            assert len(got) == 3


async def test_request_body_is_streamed_before_it_ends() -> None:
    first_piece = trio.Event()

    async def handler(up: Upstream, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some()))
            elif isinstance(event, h11.Data):
                size += len(event.data)
                first_piece.set()
            elif isinstance(event, h11.EndOfMessage):
                break
        for ev in ok(str(size).encode()):
            await stream.send_all(conn.send(ev) or b"")

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        await first_piece.wait()  # the upstream has it before we send the rest
        yield b"b" * 1000

    with trio.fail_after(10):
        async with open_proxy(handler) as (proxy, _, nursery):
            conn = HTTPConnection(downstream(nursery, proxy))
            resp = await conn.request("POST", "/", body=body())
            assert resp.body == b"2000"


async def test_large_bodies_pass_with_flat_memory() -> None:
    """32 MiB up and 32 MiB down through lockstep (unbuffered) streams."""
    total = 32 * MiB
    block = os.urandom(64 * KiB)

    async def handler(up: Upstream, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        h = hashlib.sha256()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(256 * KiB)))
            elif isinstance(event, h11.Data):
                h.update(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
            ("x-sha256", h.hexdigest()), ("content-length", str(total))])))
        for _ in range(total // len(block)):
            await stream.send_all(conn.send(h11.Data(data=block)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")

    async def body() -> AsyncIterator[bytes]:
        for _ in range(total // len(block)):
            yield block

    expected = hashlib.sha256(block * (total // len(block))).hexdigest()
    with trio.fail_after(30):
        async with open_proxy(handler, lockstep=True) as (proxy, _, nursery):
            conn = HTTPConnection(downstream(nursery, proxy, lockstep=True))
            tracemalloc.start()
            try:
                async with conn.stream_request("POST", "/", body=body(),
                                               content_length=total) as (resp, chunks):
                    h = hashlib.sha256()
                    size = 0
                    async for chunk in chunks:
                        h.update(chunk)
                        size += len(chunk)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
    assert resp.header("x-sha256") == expected
    assert size == total
    assert h.hexdigest() == expected
    assert peak < 4 * MiB, f"peak {peak / MiB:.1f} MiB for 32 MiB each way through the proxy"


# --- upgrade -------------------------------------------------------------------------


async def test_upgrade_then_raw_bytes_both_ways() -> None:
    upstream_saw_eof = trio.Event()

    async def handler(up: Upstream, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some()))
            elif isinstance(event, h11.Request):
                up.requests.append(Seen(event.method.decode(), event.target.decode(),
                                        [(n.decode(), v.decode()) for n, v in event.headers]))
            elif isinstance(event, h11.EndOfMessage):
                break
        reply = conn.send(h11.InformationalResponse(status_code=101, headers=[
            ("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"), ("X-Stream-Protocol-Version",
                                                                  "v4.channel.k8s.io")]))
        await stream.send_all(reply + b"server-hello")  # first bytes in the same segment
        early, _ = conn.trailing_data
        while len(early) < len(b"client-early"):
            early += await stream.receive_some()
        assert early == b"client-early"
        while data := await stream.receive_some():
            await stream.send_all(b"echo:" + data)
        upstream_saw_eof.set()

    with trio.fail_after(10):
        async with open_proxy(handler) as (proxy, up, nursery):
            client = downstream(nursery, proxy)
            # The client's first bytes may follow the request at once.
            await client.send_all(
                b"POST /api/v1/namespaces/default/pods/p/exec?command=sh HTTP/1.1\r\n"
                b"Host: front\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                b"X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\nclient-early"
            )
            buf = b""
            while b"server-hello" not in buf:
                buf += await client.receive_some()
            head, _, rest = buf.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            lowered = head.lower()
            assert b"upgrade: spdy/3.1" in lowered
            assert b"connection: upgrade" in lowered
            assert b"x-stream-protocol-version: v4.channel.k8s.io" in lowered
            assert rest == b"server-hello"
            await client.send_all(b"ping")
            assert await client.receive_some() == b"echo:ping"
            await client.aclose()
            await upstream_saw_eof.wait()
    (seen,) = up.requests
    assert seen.get("upgrade") == ["SPDY/3.1"]
    assert seen.get("connection") == ["upgrade"]
    assert seen.get("x-stream-protocol-version") == ["v4.channel.k8s.io"]


async def test_upgrade_keeps_bytes_read_ahead_before_the_101() -> None:
    """Bytes the reader took while the 101 was awaited go upstream first, in order."""
    request_seen = trio.Event()
    may_answer = trio.Event()

    async def handler(up: Upstream, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        await read_request(conn, stream)
        request_seen.set()
        await may_answer.wait()
        await stream.send_all(conn.send(h11.InformationalResponse(status_code=101, headers=[
            ("Connection", "Upgrade"), ("Upgrade", "websocket")])) or b"")
        got, _ = conn.trailing_data
        while len(got) < len(b"client-late+more"):
            got += await stream.receive_some()
        assert got == b"client-late+more"
        await stream.send_all(b"done")

    with trio.fail_after(10):
        async with open_proxy(handler) as (proxy, _, nursery):
            client = downstream(nursery, proxy)
            await client.send_all(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                                  b"Upgrade: websocket\r\n\r\n")
            await request_seen.wait()
            await client.send_all(b"client-late")  # before the 101: the reader takes it
            await trio.testing.wait_all_tasks_blocked()
            may_answer.set()
            head = await receive_until(client, b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            await client.send_all(b"+more")  # after the 101: the splice takes it
            assert (await receive_until(client, b"done")).endswith(b"done")


async def test_upgrade_refused_by_upstream_is_a_normal_response() -> None:
    async def handler(up: Upstream, stream: trio.abc.Stream) -> None:
        await up.serve_h11(stream, lambda seen, conn: [
            h11.Response(status_code=403, headers=[("content-length", "6")]),
            h11.Data(data=b"denied"), h11.EndOfMessage()])

    with trio.fail_after(10):
        async with open_proxy(handler) as (proxy, _, nursery):
            raw = await raw_exchange(nursery, proxy, b"GET /ws HTTP/1.1\r\nHost: a\r\n"
                                     b"Connection: Upgrade, close\r\nUpgrade: websocket\r\n\r\n")
            assert raw.startswith(b"HTTP/1.1 403 ")
            assert raw.endswith(b"denied")


# --- errors --------------------------------------------------------------------------


async def never_called(up: Upstream, stream: trio.abc.Stream) -> None:
    raise AssertionError("the upstream must not be contacted")


def status_of(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:100]
    return int(raw[9:12])


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(b"GARBAGE\r\n\r\n", 400, id="not-http"),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, id="no-host"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n", 400, id="bad-name"),
        pytest.param(b"GET example.com HTTP/1.1\r\nHost: a\r\n\r\n", 400, id="bad-target"),
        pytest.param(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405, id="connect"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
                     id="unknown-coding"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"zz\r\nxx\r\n0\r\n\r\n", 400, id="bad-chunk"),
    ],
)
async def test_malformed_requests(request_bytes: bytes, status: int) -> None:
    async def handler(up: Upstream, stream: trio.abc.Stream) -> None:
        await up.serve_h11(stream, lambda seen, conn: ok())

    with trio.fail_after(10):
        async with open_proxy(handler) as (proxy, _, nursery):
            raw = await raw_exchange(nursery, proxy, request_bytes)
    assert status_of(raw) == status
    assert b"connection: close" in raw.lower()
    assert raw.endswith(b"\n")  # a short text body, then the connection closed


@pytest.mark.parametrize(
    "framing",
    [
        pytest.param(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", id="cl-te"),
        pytest.param(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", id="te-cl"),
        pytest.param(b"Content-Length: 5\r\nContent-Length: 5\r\n", id="duplicate-cl-same"),
        pytest.param(b"Content-Length: 5\r\nContent-Length: 6\r\n", id="duplicate-cl-differ"),
        pytest.param(b"Content-Length: 5, 5\r\n", id="cl-list"),
        pytest.param(b"content-length: 5\r\nTransfer-Encoding: identity, chunked\r\n",
                     id="cl-te-list"),
        pytest.param(b"X-A: b\r\n Transfer-Encoding: chunked\r\n", id="obs-fold"),
        pytest.param(b"X-A: b\r\n\tx\r\nContent-Length: 5\r\n", id="obs-fold-tab"),
        pytest.param(b"X-A: b\rTransfer-Encoding: chunked\r\n", id="bare-cr"),
    ],
)
async def test_request_smuggling_is_refused(framing: bytes) -> None:
    request = (b"POST /a HTTP/1.1\r\nHost: a\r\n" + framing + b"\r\n"
               b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
    with trio.fail_after(10):
        async with open_proxy(never_called) as (proxy, up, nursery):
            raw = await raw_exchange(nursery, proxy, request)
    assert status_of(raw) == 400
    assert up.connections == 0
    assert raw.count(b"HTTP/1.1") == 1  # nothing after the refusal was served


async def test_refused_head_request_gets_no_body() -> None:
    """Found by fuzz/fuzz_proxy.py: a HEAD refused before h11 parsed it got a body."""
    request = b"HEAD / HTTP/1.0\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"
    with trio.fail_after(10):
        async with open_proxy(never_called) as (proxy, up, nursery):
            raw = await raw_exchange(nursery, proxy, request)
    assert status_of(raw) == 400
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-length: " in head.lower()
    assert body == b""  # RFC 9110 9.3.2: a response to HEAD has no content
    assert up.connections == 0


async def test_headers_too_large_431() -> None:
    limits = ProxyLimits(max_header_bytes=8 * KiB)
    with trio.fail_after(10):
        async with open_proxy(never_called, limits=limits) as (proxy, up, nursery):
            raw = await raw_exchange(
                nursery, proxy, b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
            )
            assert status_of(raw) == 431
            head = await raw_exchange(  # found by fuzz/fuzz_proxy.py
                nursery, proxy, b"HEAD / HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
            )
            assert status_of(head) == 431
            assert head.endswith(b"\r\n\r\n")  # no body in an answer to HEAD
            # Also when the head never ends.
            client = downstream(nursery, proxy)
            await client.send_all(b"GET / HTTP/1.1\r\nX-Endless: " + b"b" * 20_000)
            assert status_of(await read_all(client)) == 431
    assert up.connections == 0


async def test_upstream_refused_502() -> None:
    with trio.fail_after(10):
        async with open_proxy(never_called) as (proxy, up, nursery):
            up.refuse = True
            raw = await raw_exchange(nursery, proxy, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status_of(raw) == 502
    assert b"unreachable" in raw
    assert b"onnection refused" in raw


async def test_upstream_connect_timeout_504(autojump_clock: trio.testing.MockClock) -> None:
    limits = ProxyLimits(connect_timeout=7)
    async with open_proxy(never_called, limits=limits) as (proxy, up, nursery):
        up.hang = True
        start = trio.current_time()
        raw = await raw_exchange(nursery, proxy, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert trio.current_time() - start == pytest.approx(7)
    assert status_of(raw) == 504


async def test_upstream_response_timeout_504(autojump_clock: trio.testing.MockClock) -> None:
    async def silent(up: Upstream, stream: trio.abc.Stream) -> None:
        await trio.sleep_forever()

    limits = ProxyLimits(response_timeout=42)
    async with open_proxy(silent, limits=limits) as (proxy, _, nursery):
        start = trio.current_time()
        raw = await raw_exchange(nursery, proxy, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert trio.current_time() - start == pytest.approx(42)
        assert proxy.statistics().active_requests == 0
    assert status_of(raw) == 504


@pytest.mark.parametrize("reply", [b"", b"NOT HTTP\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent"])
async def test_broken_upstream_502(reply: bytes) -> None:
    async def broken(up: Upstream, stream: trio.abc.Stream) -> None:
        await stream.receive_some()
        if reply:
            await stream.send_all(reply)

    with trio.fail_after(10):
        async with open_proxy(broken) as (proxy, _, nursery):
            raw = await raw_exchange(nursery, proxy, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status_of(raw) == 502


async def test_upstream_answering_before_the_body_ends() -> None:
    """A 413 sent before reading the upload reaches the client intact."""

    async def early(up: Upstream, stream: trio.abc.Stream) -> None:
        await receive_until(stream, b"\r\n\r\n")
        await stream.send_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n"
                              b"Connection: close\r\n\r\ntoo big\n")

    async def body() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"x" * (64 * KiB)

    with trio.fail_after(10):
        async with open_proxy(early) as (proxy, _, nursery):
            conn = HTTPConnection(downstream(nursery, proxy))
            resp = await conn.request("POST", "/upload", body=body())
    assert (resp.status, resp.body) == (413, b"too big\n")


async def test_upstream_failing_mid_response_aborts_downstream() -> None:
    async def truncating(up: Upstream, stream: trio.abc.Stream) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-this")

    with trio.fail_after(10):
        async with open_proxy(truncating) as (proxy, _, nursery):
            ours, client = await open_tcp_pair()
            nursery.start_soon(proxy, ours)
            async with client:
                await client.send_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                head = await receive_until(client, b"only-this")
                assert head.startswith(b"HTTP/1.1 200 ")
                # Short of Content-Length, and reset rather than closed.
                assert await read_until_reset(client) == b""
            assert proxy.statistics().aborted_responses == 1


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
async def test_upstream_reset_mid_body_aborts_downstream(version: bytes) -> None:
    """An upstream that resets mid-body: the client never sees an end of body.

    HTTP/1.1 gets a chunked body, which must not get its terminating chunk;
    HTTP/1.0 a close-delimited one, where only a reset (not a FIN) tells
    the client the body is short.
    """
    received = trio.Event()

    async def resetting(stream: trio.SocketStream) -> None:
        await receive_until(stream, b"\r\n\r\n")
        await stream.send_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        await stream.send_all(b"part of the body")
        await received.wait()
        await revdial.abort(stream)  # the upstream dies mid-body

    with trio.fail_after(10):
        async with serve_target(resetting) as port, trio.open_nursery() as nursery:
            proxy = ReverseProxy(f"http://127.0.0.1:{port}")
            ours, client = await open_tcp_pair()
            nursery.start_soon(proxy, ours)
            async with client:
                await client.send_all(b"GET /watch HTTP/" + version + b"\r\nHost: a\r\n\r\n")
                got = await receive_until(client, b"part of the body")
                chunked = b"transfer-encoding: chunked" in got.lower()
                assert chunked == (version == b"1.1")
                received.set()
                assert await read_until_reset(client) == b""
            stats = proxy.statistics()
            assert (stats.aborted_responses, stats.active_requests) == (1, 0)
            await proxy.aclose()


async def test_complete_close_delimited_body_still_closes_cleanly() -> None:
    async def complete(stream: trio.SocketStream) -> None:
        await receive_until(stream, b"\r\n\r\n")
        await stream.send_all(b"HTTP/1.0 200 OK\r\n\r\nthe whole body")

    with trio.fail_after(10):
        async with serve_target(complete) as port, trio.open_nursery() as nursery:
            proxy = ReverseProxy(f"http://127.0.0.1:{port}")
            ours, client = await open_tcp_pair()
            nursery.start_soon(proxy, ours)
            async with client:
                await client.send_all(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
                raw = await read_all(client)  # EOF, no reset
            assert raw.endswith(b"\r\n\r\nthe whole body")
            assert proxy.statistics().aborted_responses == 0


async def test_upgraded_connection_reset_upstream_resets_downstream() -> None:
    async def upgrading(stream: trio.SocketStream) -> None:
        await receive_until(stream, b"\r\n\r\n")
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\n"
                              b"Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\nhello")
        await receive_until(stream, b"ping")
        await revdial.abort(stream)

    with trio.fail_after(10):
        async with serve_target(upgrading) as port, trio.open_nursery() as nursery:
            proxy = ReverseProxy(f"http://127.0.0.1:{port}")
            ours, client = await open_tcp_pair()
            nursery.start_soon(proxy, ours)
            async with client:
                await client.send_all(b"POST /exec HTTP/1.1\r\nHost: a\r\n"
                                      b"Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n")
                assert (await receive_until(client, b"hello")).startswith(b"HTTP/1.1 101 ")
                await client.send_all(b"ping")
                assert await read_until_reset(client) == b""
            assert proxy.statistics().aborted_responses == 1


# --- keep-alive and the pool --------------------------------------------------------


async def test_upstream_connections_are_reused_across_requests_and_streams() -> None:
    with trio.fail_after(10):
        async with open_proxy(echo_handler) as (proxy, up, nursery):
            for _ in range(3):
                conn = HTTPConnection(downstream(nursery, proxy))
                for _ in range(3):
                    assert (await conn.request("GET", "/")).status == 200
                await conn.aclose()
            stats = proxy.statistics()
    assert up.connections == 1
    assert (stats.requests, stats.connections_opened, stats.idle_connections) == (9, 1, 1)


async def test_pool_is_bounded() -> None:
    gate = trio.Event()

    async def slow(up: Upstream, stream: trio.abc.Stream) -> None:
        async def wait_then_ok(seen: Seen, conn: h11.Connection) -> None:
            await gate.wait()

        conn = h11.Connection(h11.SERVER)
        while True:
            while not isinstance(event := conn.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    data = await stream.receive_some()
                    if not data:
                        return
                    conn.receive_data(bytes(data))
            await gate.wait()
            for ev in ok():
                await stream.send_all(conn.send(ev) or b"")
            conn.start_next_cycle()

    limits = ProxyLimits(max_idle_connections=2)
    with trio.fail_after(10):
        async with open_proxy(slow, limits=limits) as (proxy, up, nursery):
            results: list[int] = []

            async def one() -> None:
                conn = HTTPConnection(downstream(nursery, proxy))
                results.append((await conn.request("GET", "/")).status)

            async with trio.open_nursery() as inner:
                for _ in range(5):
                    inner.start_soon(one)
                await trio.testing.wait_all_tasks_blocked()
                assert proxy.statistics().active_requests == 5
                gate.set()
            assert results == [200] * 5
            await trio.testing.wait_all_tasks_blocked()
            stats = proxy.statistics()
            assert (stats.connections_opened, stats.idle_connections) == (5, 2)
            assert up.closed == 3
            await proxy.aclose()
            await trio.testing.wait_all_tasks_blocked()
            assert proxy.statistics().idle_connections == 0
            assert up.closed == 5


async def test_dead_pooled_connection_is_retried_for_requests_without_body() -> None:
    async def one_shot(up: Upstream, stream: trio.abc.Stream) -> None:
        # Answers one request, keeps the connection "alive" per HTTP, then
        # closes it -- as a server closing an idle keep-alive connection.
        await up.serve_h11(stream, lambda seen, conn: ok(), close_after=True)

    with trio.fail_after(10):
        async with open_proxy(one_shot) as (proxy, up, nursery):
            conn = HTTPConnection(downstream(nursery, proxy))
            assert (await conn.request("GET", "/1")).status == 200
            await trio.testing.wait_all_tasks_blocked()
            assert (await conn.request("DELETE", "/2")).status == 200
    assert up.connections == 2
    assert [s.target for s in up.requests] == ["/1", "/2"]


async def test_pooled_connections_expire(autojump_clock: trio.testing.MockClock) -> None:
    limits = ProxyLimits(pool_idle_timeout=30)
    async with open_proxy(echo_handler, limits=limits) as (proxy, up, nursery):
        conn = HTTPConnection(downstream(nursery, proxy))
        await conn.request("GET", "/")
        await trio.sleep(29)
        await conn.request("GET", "/")
        assert up.connections == 1
        await trio.sleep(31)
        await conn.request("GET", "/")
        assert up.connections == 2


async def test_idle_downstream_is_closed(autojump_clock: trio.testing.MockClock) -> None:
    limits = ProxyLimits(idle_timeout=90)
    async with open_proxy(echo_handler, limits=limits) as (proxy, _, nursery):
        client = downstream(nursery, proxy)
        start = trio.current_time()
        assert await read_all(client) == b""
        assert trio.current_time() - start == pytest.approx(90)


async def test_client_going_away_cancels_the_upstream_request() -> None:
    """A watch whose client disconnects must not stay open upstream."""
    upstream_closed = trio.Event()

    async def watch(up: Upstream, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        await read_request(conn, stream)
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[])) or b"")
        await stream.send_all(conn.send(h11.Data(data=b"event\n")) or b"")
        assert await stream.receive_some() == b""  # the proxy closed it
        upstream_closed.set()

    with trio.fail_after(10):
        async with open_proxy(watch) as (proxy, _, nursery):
            client = downstream(nursery, proxy)
            await client.send_all(b"GET /watch HTTP/1.1\r\nHost: a\r\n\r\n")
            await receive_until(client, b"event")
            await client.aclose()
            await upstream_closed.wait()
            await trio.testing.wait_all_tasks_blocked()
            stats = proxy.statistics()
            assert (stats.active_requests, stats.idle_connections) == (0, 0)


async def test_client_closing_after_its_request_body_cancels_the_exchange() -> None:
    """The reader reports EOF after a body too: the upstream is closed, not left waiting."""
    upstream_closed = trio.Event()

    async def silent(up: Upstream, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        await read_request(conn, stream)  # the whole body, then never answer
        assert await stream.receive_some() == b""  # closed in order, not aborted
        upstream_closed.set()

    with trio.fail_after(10):
        async with open_proxy(silent) as (proxy, up, nursery):
            client = downstream(nursery, proxy)
            await client.send_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
            await trio.testing.wait_all_tasks_blocked()
            assert proxy.statistics().active_requests == 1
            await client.aclose()
            await upstream_closed.wait()
            await trio.testing.wait_all_tasks_blocked()
            stats = proxy.statistics()
            assert (stats.active_requests, stats.idle_connections, up.closed) == (0, 0, 1)


def _tasks_under(task: trio.lowlevel.Task) -> int:
    return 1 + sum(_tasks_under(child) for nursery in task.child_nurseries
                   for child in nursery.child_tasks)


async def test_no_task_per_request() -> None:
    """A kept-alive connection has one reader task; a request adds no task.

    (Spawning and cancelling a task per request to watch the client for EOF
    cost a fifth of the front door's CPU per small request.)
    """
    gate = trio.Event()

    async def gated(up: Upstream, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            await read_request(conn, stream)
            if conn.our_state is h11.SEND_RESPONSE and not gate.is_set():
                await gate.wait()
            for event in ok():
                await stream.send_all(conn.send(event) or b"")
            conn.start_next_cycle()

    request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    with trio.fail_after(10):
        async with open_proxy(gated) as (proxy, _, nursery):
            root = trio.lowlevel.current_root_task()
            assert root is not None
            client = downstream(nursery, proxy)
            await client.send_all(request)
            await trio.testing.wait_all_tasks_blocked()
            in_flight = _tasks_under(root)  # a request waits for its response
            assert proxy.statistics().active_requests == 1
            gate.set()
            await receive_until(client, b"ok")
            await trio.testing.wait_all_tasks_blocked()
            idle = _tasks_under(root)
            for _ in range(5):
                await client.send_all(request)
                await receive_until(client, b"ok")
            await trio.testing.wait_all_tasks_blocked()
            assert in_flight == idle == _tasks_under(root)


async def test_read_ahead_is_bounded_while_a_response_is_pending() -> None:
    """A client pushing bytes while its request waits is held at a bound."""
    limits = ProxyLimits(max_header_bytes=1024, read_size=4096)
    release = trio.Event()

    async def slow(up: Upstream, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        await read_request(conn, stream)
        await release.wait()
        for event in ok():
            await stream.send_all(conn.send(event) or b"")

    chunk = b"x" * 512
    with trio.fail_after(10):
        async with open_proxy(slow, limits=limits) as (proxy, _, nursery):
            client = downstream(nursery, proxy, lockstep=True)
            await client.send_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            sent = 0

            async def push(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
                nonlocal sent
                with trio.CancelScope() as scope:
                    task_status.started(scope)
                    while True:
                        await client.send_all(chunk)
                        sent += len(chunk)

            pusher = await nursery.start(push)
            await trio.testing.wait_all_tasks_blocked()
            # Read ahead: more than one head's worth, at most that plus one read.
            assert limits.max_header_bytes < sent <= limits.max_header_bytes + limits.read_size
            assert proxy.statistics().active_requests == 1
            pusher.cancel()
            release.set()
            head = await receive_until(client, b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")


async def test_cancellation_leaves_statistics_at_zero() -> None:
    async def silent(up: Upstream, stream: trio.abc.Stream) -> None:
        while await stream.receive_some():  # never answers; returns once closed
            pass

    with trio.fail_after(10):
        async with open_proxy(silent) as (proxy, up, _):
            client, server_side = trio.testing.memory_stream_pair()
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as inner:
                    inner.start_soon(proxy, server_side)
                    await client.send_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                    await trio.testing.wait_all_tasks_blocked()
                    assert proxy.statistics().active_requests == 1
                    scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            stats = proxy.statistics()
            assert (stats.active_requests, stats.idle_connections) == (0, 0)
            assert up.closed == 1
            assert await read_all(client) == b""


# --- how the bytes arrive -------------------------------------------------------------

PIPELINED = (
    b"POST /one HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
    b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n"
    b"POST /three HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"2\r\nxy\r\n0\r\n\r\n"
)


@pytest.mark.parametrize("mode", ["whole", "byte-by-byte"])
async def test_requests_whole_byte_by_byte_and_pipelined(mode: str) -> None:
    with trio.fail_after(20):
        async with open_proxy(echo_handler) as (proxy, up, nursery):
            client = downstream(nursery, proxy)
            if mode == "whole":
                await client.send_all(PIPELINED)
            else:
                for i in range(len(PIPELINED)):
                    await client.send_all(PIPELINED[i:i + 1])
            conn = h11.Connection(h11.CLIENT)
            # Parse the three answers with a client that "sent" the same requests.
            conn.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
            conn.send(h11.EndOfMessage())
            bodies: list[bytes] = []
            body = b""
            while len(bodies) < 3:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await client.receive_some()))
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    bodies.append(body)
                    body = b""
                    conn.start_next_cycle()
                    if len(bodies) < 3:
                        conn.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
                        conn.send(h11.EndOfMessage())
    assert bodies == [b"abc", b"ok", b"xy"]
    assert [s.target for s in up.requests] == ["/one", "/two", "/three"]


async def test_trailers_pass_both_ways() -> None:
    """Chunked bodies keep their trailer fields, request and response."""
    seen_trailers: list[list[tuple[bytes, bytes]]] = []

    async def handler(up: Upstream, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some()))
            elif isinstance(event, h11.EndOfMessage):
                seen_trailers.append(list(event.headers.raw_items()))
                break
        await stream.send_all(
            conn.send(h11.Response(status_code=200, headers=[("transfer-encoding", "chunked"),
                                                             ("trailer", "x-checksum")]))
            + conn.send(h11.Data(data=b"body"))
            + conn.send(h11.EndOfMessage(headers=[("x-checksum", "sha256:abc"),
                                                  ("keep-alive", "timeout=5")])))

    request = (b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4\r\nbody\r\n0\r\nX-Request-Digest: d1\r\n\r\n")
    with trio.fail_after(10):
        async with open_proxy(handler) as (proxy, _, nursery):
            client = downstream(nursery, proxy)
            await client.send_all(request)
            conn = h11.Connection(h11.CLIENT)
            conn.send(h11.Request(method="POST", target="/upload", headers=[("host", "a")]))
            events: list[h11.Event] = []
            while not events or not isinstance(events[-1], h11.EndOfMessage):
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await client.receive_some()))
                else:
                    assert isinstance(event, h11.Event)
                    events.append(event)
    assert seen_trailers == [[(b"x-request-digest", b"d1")]]
    response, *_, eom = events
    assert isinstance(response, h11.Response)
    assert isinstance(eom, h11.EndOfMessage)
    # The trailer field passed; a hop-by-hop one never does (RFC 9110 7.6.1).
    assert list(eom.headers.raw_items()) == [(b"x-checksum", b"sha256:abc")]


# --- responses pass as received; request heads written by hand (issue 13) ------------

#: Deterministic, fast hypothesis runs (the fuzzers in ``fuzz/`` explore randomly).
FAST = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def raw_upstream(*replies: bytes) -> Handler:
    """An upstream answering the n-th request on a connection with ``replies[n]``, verbatim."""

    async def handler(up: Upstream, stream: trio.abc.Stream) -> None:
        for reply in replies:
            await receive_until(stream, b"\r\n\r\n")
            await stream.send_all(reply)
        await stream.receive_some()

    return handler


async def test_response_bytes_pass_unchanged_but_hop_by_hop_fields() -> None:
    """Field names keep their case and order, values and body their bytes."""
    reply = (b"HTTP/1.1 200 Fine Thanks\r\nX-Mixed-CASE: Some Value\r\nContent-Type: "
             b"application/json\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
             b"Keep-Alive: timeout=5\r\nContent-Length: 11\r\nSet-Cookie: a=1\r\n"
             b"set-cookie: b=2\r\n\r\n{\"a\": \"\xe9\"}!")
    expected = (b"HTTP/1.1 200 Fine Thanks\r\nX-Mixed-CASE: Some Value\r\nContent-Type: "
                b"application/json\r\nContent-Length: 11\r\nSet-Cookie: a=1\r\n"
                b"set-cookie: b=2\r\n\r\n{\"a\": \"\xe9\"}!")
    with trio.fail_after(10):
        async with open_proxy(raw_upstream(reply, reply)) as (proxy, up, nursery):
            client = downstream(nursery, proxy)
            for _ in range(2):  # kept alive, both sides
                await client.send_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                got = b""
                while len(got) < len(expected):
                    got += await client.receive_some()
                assert got == expected
            assert up.connections == 1


@pytest.mark.parametrize(
    ("request_line", "extra"),
    [(b"GET / HTTP/1.1\r\nConnection: close", b""), (b"GET / HTTP/1.0", b"")],
)
async def test_response_to_a_closing_client_says_connection_close(
    request_line: bytes, extra: bytes
) -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nDate: today\r\n\r\nok"
    with trio.fail_after(10):
        async with open_proxy(raw_upstream(reply)) as (proxy, _, nursery):
            raw = await raw_exchange(nursery, proxy, request_line + b"\r\nHost: a\r\n\r\n")
    assert raw == (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nDate: today\r\n"
                   b"Connection: close\r\n\r\nok")


async def test_later_http_version_is_kept_alive_as_h11_does() -> None:
    """``HTTP/2.0`` on a request line is 1.1 to h11 (the fuzzer found the mismatch)."""
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    with trio.fail_after(10):
        async with open_proxy(raw_upstream(reply, reply)) as (proxy, _, nursery):
            raw = await raw_exchange(nursery, proxy, b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"
                                     b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert raw == first + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


async def test_head_and_304_pass_without_body_and_the_connection_goes_on() -> None:
    replies = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nETag: \"x\"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",  # HEAD of a chunked GET
        b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlast",
    )
    requests = [b"HEAD", b"HEAD", b"GET", b"DELETE", b"GET"]
    with trio.fail_after(10):
        async with open_proxy(raw_upstream(*replies)) as (proxy, up, nursery):
            raw = await raw_exchange(nursery, proxy, b"".join(
                m + b" / HTTP/1.1\r\nHost: a\r\n" + (b"Connection: close\r\n" if i == 4 else b"")
                + b"\r\n" for i, m in enumerate(requests)))
    assert raw == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nETag: \"x\"\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nlast"
    )
    assert up.connections == 1


async def test_chunked_response_with_trailers_exact_bytes() -> None:
    reply = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
             b"5\r\nhello\r\n0\r\nX-Sum: 1\r\nKeep-Alive: x\r\n\r\n")
    with trio.fail_after(10):
        async with open_proxy(raw_upstream(reply, reply)) as (proxy, _, nursery):
            raw = await raw_exchange(nursery, proxy, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
                                     b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
    # HTTP/1.1: chunks as they came, the trailer without its hop-by-hop field;
    # HTTP/1.0: the body alone, delimited by the close, trailers dropped.
    assert raw == (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n0\r\nx-sum: 1\r\n\r\n"
                   b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello")


async def test_close_delimited_response_is_chunked_for_http11_and_kept_alive() -> None:
    async def handler(up: Upstream, stream: trio.abc.Stream) -> None:
        await receive_until(stream, b"\r\n\r\n")
        await stream.send_all(b"HTTP/1.0 200 OK\r\nX-A: b\r\n\r\nsome body")
        await stream.aclose()

    with trio.fail_after(10):
        async with open_proxy(handler) as (proxy, up, nursery):
            client = downstream(nursery, proxy)
            conn = HTTPConnection(client)
            resp = await conn.request("GET", "/")
            assert (resp.body, resp.header("transfer-encoding")) == (b"some body", "chunked")
            resp = await conn.request("GET", "/")  # the client's connection went on
            assert resp.body == b"some body"
            assert up.connections == 2


#: Bytes that splitting, folding and padding are made of, strung together.
PIECES = st.lists(st.sampled_from([b"a", b"/", b"\r", b"\n", b"\r\n", b" ", b"\t", b":",
                                   b"\x00", b"\x01", b"\x7f", b"\xe9", b"x-y", b"host"]),
                  min_size=1, max_size=8).map(b"".join)


async def test_bytes_after_a_response_never_answer_the_next_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An upstream that sends more than its response (in the same read): that
    connection is not pooled, so the extra bytes cannot answer another client."""
    targets: list[bytes] = []

    async def handler(up: Upstream, stream: trio.abc.Stream) -> None:
        with contextlib.suppress(AssertionError):  # the proxy closes the connection
            while True:
                head = await receive_until(stream, b"\r\n\r\n")
                targets.append(head.split(b" ")[1])
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                                      b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!")

    with trio.fail_after(10):
        async with open_proxy(handler) as (proxy, up, nursery):
            for target in (b"/1", b"/2"):  # two clients, one after the other
                raw = await raw_exchange(nursery, proxy, b"GET " + target + b" HTTP/1.1\r\n"
                                         b"Host: a\r\nConnection: close\r\n\r\n")
                assert raw.endswith(b"\r\n\r\nok"), raw
            assert (targets, up.connections) == ([b"/1", b"/2"], 2)
    assert "bytes after the response" in caplog.text


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
async def test_cancelled_in_the_middle_of_a_passed_response_resets_the_client(
    version: bytes,
) -> None:
    """A response written as received is mid-way until its last byte: a cancel resets."""
    sent = trio.Event()

    async def partial(up: Upstream, stream: trio.abc.Stream) -> None:
        await receive_until(stream, b"\r\n\r\n")
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nthe first part")
        sent.set()
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with open_proxy(partial) as (proxy, _, nursery):
            ours, client = await open_tcp_pair()
            serving = trio.CancelScope()

            async def serve() -> None:
                with serving:
                    await proxy(ours)

            nursery.start_soon(serve)
            async with client:
                await client.send_all(b"GET / HTTP/" + version + b"\r\nHost: a\r\n\r\n")
                assert (await receive_until(client, b"the first part")).startswith(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n")
                await sent.wait()
                serving.cancel()  # e.g. the agent shutting down
                assert await read_until_reset(client) == b""
            assert proxy.statistics().active_requests == 0


@FAST
@given(
    headers=st.lists(st.tuples(
        st.one_of(st.text("-!#$%&'*+.^_`|~09azAZ", min_size=1, max_size=8).map(str.encode),
                  PIECES),
        st.one_of(st.binary(max_size=12), PIECES),
    ), max_size=6),
    target=st.one_of(st.binary(min_size=1, max_size=12), PIECES),
    method=st.sampled_from([b"GET", b"POST", b"PUT", b"M-SEARCH"]),
)
def test_hand_written_request_head_is_what_h11_writes_or_refuses(
    headers: list[tuple[bytes, bytes]], target: bytes, method: bytes
) -> None:
    """Same bytes as h11 for what h11 accepts; a 400 for what it refuses."""
    headers = [(b"host", b"up.example"),
               *((n, v) for n, v in headers if n.lower() not in (b"content-length",
                                                                 b"transfer-encoding", b"host"))]
    try:
        expected: bytes | None = h11.Connection(h11.CLIENT).send(
            h11.Request(method=method, target=target, headers=headers))
    except h11.LocalProtocolError:
        expected = None
    status = 0
    try:
        wire: bytes | None = _request_head(method, target, headers)
    except _Answer as exc:
        status, wire = exc.status, None
    assert wire == expected
    assert status == (400 if expected is None else 0)


@pytest.mark.parametrize("bad", [
    (b"GET", b"/a b", [(b"host", b"a")]),
    (b"GET", b"/", [(b"host", b"a\r\nx-injected: 1")]),
    (b"GET", b"/", [(b"host", b"a"), (b"x", b"\x00")]),
    (b"GET", b"/", [(b"host", b"a"), (b"bad name", b"1")]),
    (b"GET", b"/", [(b"host", b"a"), (b"", b"1")]),
    (b"GET", b"/", [(b"x", b"1")]),  # no Host
])
def test_request_head_refuses_what_would_split_it(
    bad: tuple[bytes, bytes, list[tuple[bytes, bytes]]]
) -> None:
    with pytest.raises(_Answer) as info:
        _request_head(*bad)
    assert info.value.status == 400


@FAST
@given(
    fields=st.lists(st.tuples(
        st.sampled_from([b"X-A", b"content-type", b"Set-Cookie", b"Connection", b"Keep-Alive",
                         b"Transfer-Encoding", b"Content-Length", b"TE", b"Trailer",
                         b"Proxy-Authenticate", b"x-named", b"Upgrade"]),
        st.sampled_from([b"1", b"close", b"x-named", b"chunked", b"keep-alive, X-A", b"5"]),
    ), max_size=6),
    status=st.sampled_from([200, 201, 204, 304, 404, 500]),
    method=st.sampled_from([b"GET", b"HEAD", b"POST"]),
    version=st.sampled_from([b"1.0", b"1.1"]),
    close=st.booleans(),
)
def test_response_head_frames_as_h11_would(
    fields: list[tuple[bytes, bytes]], status: int, method: bytes, version: bytes, close: bool
) -> None:
    """Hop-by-hop fields and framing as h11's server side wrote them before (issue 13).

    The reference is the former path: ``end_to_end_headers`` (lower-casing
    names) and h11's writer; compared with names and values lower-cased.
    """
    fields = [(n, v) for n, v in fields if n.lower() not in (b"transfer-encoding",
                                                             b"content-length")]
    framing = [(b"Transfer-Encoding", b"chunked")] if status % 2 else [(b"Content-Length", b"5")]
    try:
        response = h11.Response(status_code=status, headers=fields + framing, reason=b"Why")
    except h11.LocalProtocolError:
        return
    server = h11.Connection(h11.SERVER)
    server.receive_data(method + b" / HTTP/" + version + b"\r\nHost: a\r\n"
                        + (b"Connection: close\r\n" if close else b"") + b"\r\n")
    request = server.next_event()
    assert isinstance(request, h11.Request)
    raw = list(response.headers.raw_items())
    chunked = any(n.lower() == b"transfer-encoding" for n, _ in raw)
    try:
        expected = server.send(h11.Response(
            status_code=status, reason=b"Why",
            headers=end_to_end_headers(raw, keep_content_length=not chunked)))
    except h11.LocalProtocolError:
        return
    assert expected is not None
    keep_alive = version == b"1.1" and not close
    head, mode = _response_head(response, method, http11=version == b"1.1",
                                keep_alive=keep_alive)
    assert head.lower() == expected.lower()
    framing_of_h11 = (
        "none" if method == b"HEAD" or status in (204, 304)
        else "chunked" if b"transfer-encoding: chunked" in expected.lower() else "as-is")
    assert {_BODY_NONE: "none", _BODY_CHUNKED: "chunked", _BODY_AS_IS: "as-is"}[mode] == (
        framing_of_h11)
