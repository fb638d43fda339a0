"""A broken tunnel never looks like a finished transfer (issue #15).

Only an orderly end -- the peer's EOF or half-close -- reaches a local socket
as a FIN; every failure (session lost, stream reset by the peer, keepalive
timeout, cancellation) resets it, and a local socket's failure reaches the
peer as a stream reset, never as ``EOF``. The local sockets here are real
loopback TCP connections (a reset is a kernel event); the sessions are
memory-stream pairs (``session_pairs.open_pair``), under
``MockClock(autojump_threshold=0)`` where time matters. The same faults
through real ``revdial server``/``revdial agent`` processes are in
``test_cli.py``; the HTTP paths in ``test_frontdoor.py`` and ``test_proxy.py``.
"""

from __future__ import annotations

import logging
import socket
import ssl

import pytest
import trio
import trio.testing
import trustme

import revdial
from conftest import (
    KiB,
    open_tcp_pair,
    read_until_reset,
    receive_exactly,
    receive_until,
    serve_target,
)
from revdial._limits import DEFAULT_LIMITS
from session_pairs import SMALL_LIMITS, data_frame, open_pair, open_raw_client

PING_TIMEOUT = DEFAULT_LIMITS.ping_timeout
READ = 64 * KiB


# --- abort() -------------------------------------------------------------------


async def test_abort_resets_a_socket() -> None:
    with trio.fail_after(10):
        ours, theirs = await open_tcp_pair()
        async with theirs:
            await ours.send_all(b"before")
            assert await receive_exactly(theirs, 6) == b"before"
            await revdial.abort(ours)
            await revdial.abort(ours)  # idempotent
            assert await read_until_reset(theirs) == b""


async def test_abort_resets_the_socket_under_tls() -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    with trio.fail_after(10):
        ours_tcp, theirs_tcp = await open_tcp_pair()
        ours = trio.SSLStream(ours_tcp, server_ctx, server_side=True)
        theirs = trio.SSLStream(theirs_tcp, client_ctx, server_hostname="127.0.0.1")
        async with theirs, trio.open_nursery() as nursery:
            nursery.start_soon(ours.do_handshake)
            await theirs.do_handshake()
            await revdial.abort(ours)
            # No close_notify, no FIN: the TLS peer's read fails with the reset.
            with pytest.raises(trio.BrokenResourceError) as info:
                await theirs.receive_some()
            causes = []
            exc: BaseException | None = info.value
            while exc is not None:
                causes.append(exc)
                exc = exc.__cause__ or exc.__context__
            assert any(isinstance(c, ConnectionResetError) for c in causes), causes


async def test_abort_resets_a_tunnel_stream() -> None:
    async with open_pair(extensions=1) as p:
        with trio.fail_after(10):
            for reason, expected in [
                (None, revdial.ABORT_REASON),
                ("EOF", revdial.ABORT_REASON),  # "EOF" would be an orderly close
                ("target reset the connection", "target reset the connection"),
            ]:
                ours, agent = await p.open()
                await ours.send_all(b"x")
                assert await agent.receive_some() == b"x"
                await revdial.abort(ours, reason)
                with pytest.raises(revdial.StreamResetError) as info:
                    await agent.receive_some()
                assert info.value.reason == expected
                await revdial.abort(ours)  # idempotent


async def test_abort_closes_other_streams_even_when_cancelled() -> None:
    a, b = trio.testing.memory_stream_pair()
    with trio.CancelScope() as scope:
        scope.cancel()
        await revdial.abort(a)
    assert await b.receive_some() == b""
    with pytest.raises(trio.ClosedResourceError):
        await a.send_all(b"x")


# --- splice(): failures reset, orderly ends close ---------------------------------


@pytest.mark.parametrize("extensions", [1, 0], ids=["v1", "plain"])
async def test_peer_reset_resets_the_local_socket(extensions: int) -> None:
    async with open_pair(extensions=extensions) as p:
        with trio.fail_after(10):
            ours, agent = await p.open()
            local, client = await open_tcp_pair()
            async with client, trio.open_nursery() as nursery:

                async def run() -> None:
                    with pytest.raises(revdial.StreamResetError):
                        await revdial.splice(ours, local, read_size=READ)

                nursery.start_soon(run)
                await agent.send_all(b"a" * 100_000)
                agent.close_nowait("the target reset the connection")
                # Data sent before the reset may arrive; then the reset, never EOF.
                assert len(await read_until_reset(client)) <= 100_000


@pytest.mark.parametrize("extensions", [1, 0], ids=["v1", "plain"])
async def test_orderly_end_closes_cleanly_with_every_byte(extensions: int) -> None:
    async with open_pair(extensions=extensions) as p:
        with trio.fail_after(10):
            ours, agent = await p.open()
            local, client = await open_tcp_pair()
            data = bytes(range(256)) * 4096  # 1 MiB
            async with client, trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: revdial.splice(ours, local, read_size=READ)  # returns: no error
                )

                async def send_and_close() -> None:
                    await agent.send_all(data)
                    await agent.aclose()  # orderly: Error "EOF"

                nursery.start_soon(send_and_close)
                got = bytearray()
                while chunk := await client.receive_some(READ):  # EOF, no reset
                    got += chunk
                assert bytes(got) == data


async def test_local_reset_resets_the_tunnel_stream() -> None:
    async with open_pair(extensions=1) as p:
        with trio.fail_after(10):
            ours, agent = await p.open()
            local, client = await open_tcp_pair()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: revdial.splice(ours, local, read_size=READ))
                await client.send_all(b"partial upload")
                assert await receive_exactly(agent, 14) == b"partial upload"
                await revdial.abort(client)  # the forward's client resets
                with pytest.raises(revdial.StreamResetError) as info:
                    await agent.receive_some()
                assert "local connection failed" in info.value.reason


async def test_local_half_close_keeps_the_other_direction() -> None:
    async with open_pair(extensions=1) as p:
        with trio.fail_after(10):
            ours, agent = await p.open()
            local, client = await open_tcp_pair()
            async with client, trio.open_nursery() as nursery:
                nursery.start_soon(lambda: revdial.splice(ours, local, read_size=READ))
                await client.send_all(b"question")
                await client.send_eof()
                assert await receive_exactly(agent, 8) == b"question"
                assert await agent.receive_some() == b""  # the half-close, not a reset
                await agent.send_all(b"answer")
                await agent.aclose()
                assert await receive_exactly(client, 6) == b"answer"
                assert await client.receive_some() == b""


async def test_cancelled_splice_resets_both_sides() -> None:
    async with open_pair(extensions=1) as p:
        with trio.fail_after(10):
            ours, agent = await p.open()
            local, client = await open_tcp_pair()
            async with client, trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def run() -> None:
                    with scope:
                        await revdial.splice(ours, local, read_size=READ)

                nursery.start_soon(run)
                await agent.send_all(b"half a file")
                assert await receive_exactly(client, 11) == b"half a file"
                scope.cancel()
                assert await read_until_reset(client) == b""
                with pytest.raises(revdial.StreamResetError) as info:
                    await agent.receive_some()
                assert info.value.reason == revdial.ABORT_REASON


async def test_stream_reset_for_overrun_resets_the_local_socket() -> None:
    """A peer that ignores Pause gets its stream reset (a limit): the local
    socket behind it is reset too, not closed as if the transfer were done."""
    async with open_raw_client(limits=SMALL_LIMITS) as (server, peer):
        with trio.fail_after(10):
            stream = server.open_stream("tcp", "x:1")
            cid = (await peer.receive()).conn_id
            local, client = await open_tcp_pair()
            # Small socket buffers: the splice blocks writing to ``local`` while
            # the client does not read, so the stream's buffer fills up.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KiB)
            local.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * KiB)
            async with client, trio.open_nursery() as nursery:

                async def run() -> None:
                    with pytest.raises(revdial.StreamResetError, match="overran"):
                        await revdial.splice(stream, local, read_size=READ)

                nursery.start_soon(run)
                frame = bytes(16 * KiB)
                while server.statistics().streams:  # until the overrun reset
                    await peer.send(data_frame(cid, frame))
                    await trio.testing.wait_all_tasks_blocked()
                await read_until_reset(client)


# --- keepalive timeout (MockClock) ------------------------------------------------


async def test_server_keepalive_timeout_resets_the_forward_client(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_pair(extensions=1) as p:
        ours, agent = await p.open()
        local, client = await open_tcp_pair()
        lost_at: list[float] = []
        async with client, trio.open_nursery() as nursery:

            async def run() -> None:
                with pytest.raises(revdial.SessionLostError, match="keepalive"):
                    await revdial.splice(ours, local, read_size=READ)
                lost_at.append(trio.current_time())

            nursery.start_soon(run)
            await agent.send_all(b"x" * 1000)
            assert len(await receive_exactly(client, 1000)) == 1000
            p.server_side.valve.silence()  # the agent goes silent
            silent_since = p.server_side.activity.last_receive
            assert await read_until_reset(client) == b""
        assert lost_at == [silent_since + PING_TIMEOUT]


async def test_agent_keepalive_timeout_resets_the_target_and_logs_once(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    target_side: list[trio.SocketStream] = []
    local, target = await open_tcp_pair()

    async def dialer(proto: str, address: str) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        target_side.append(local)
        return local

    handler = revdial.make_connect_handler(allow=["127.0.0.1:9"], dialer=dialer)
    caplog.set_level(logging.WARNING, logger="revdial")
    async with target, open_pair(extensions=1, on_connect=handler) as p:
        ours = p.server.open_stream("tcp", "127.0.0.1:9")
        await ours.send_all(b"upload" * 1000)
        assert len(await receive_exactly(target, 6000)) == 6000
        assert target_side == [local]
        p.client_side.valve.silence()  # the server goes silent
        # The agent's session ends (its handlers are cancelled): the target
        # sees a reset, not the end of a shorter upload.
        assert await read_until_reset(target) == b""
        assert not p.client.is_open
    resets = [r for r in caplog.records if "connection to tcp/127.0.0.1:9 reset" in r.message]
    assert len(resets) == 1, [r.message for r in caplog.records]
    assert resets[0].levelno == logging.WARNING
    assert "keepalive" in resets[0].message


# --- the agent's HTTP proxy on a tunnel stream ------------------------------------


async def test_agent_proxy_resets_its_tunnel_stream_when_the_upstream_dies() -> None:
    """Mid-response, the agent's proxy resets the tunnel stream (with the
    cause as the reason): the front door on the other end never sees EOF."""
    received = trio.Event()

    async def dying_upstream(stream: trio.SocketStream) -> None:
        await receive_until(stream, b"\r\n\r\n")
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nfirst part")
        await received.wait()
        await revdial.abort(stream)

    async with (
        serve_target(dying_upstream) as port,
        open_pair(extensions=1) as p,
        revdial.ReverseProxy(f"http://127.0.0.1:{port}") as proxy,
    ):
        with trio.fail_after(10):
            ours, agent = await p.open()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(proxy, agent)
                await ours.send_all(b"GET /logs?follow=1 HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await receive_until(ours, b"first part")).startswith(b"HTTP/1.1 200 ")
                received.set()
                with pytest.raises(revdial.StreamResetError) as info:
                    await ours.receive_some()
                assert info.value.reason.startswith("revdial: response aborted: upstream failed")
            assert proxy.statistics().aborted_responses == 1
