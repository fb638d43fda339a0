"""The splice's direct socket I/O (issue #13): same bytes, same order, same failures.

:func:`revdial.splice` on a plain :class:`trio.SocketStream` skips two task
hand-offs per message: small Data frames that arrive while the splice waits
with nothing buffered are written to the local socket by the session's reader
itself (``TunnelStream._feed`` through :func:`revdial._splice.direct_writer`),
and the local socket is read with ``wait_readable`` + ``os.read`` and queued
with ``TunnelStream._send_nowait``. These tests check that the fast paths are
taken and that every way out of them -- a socket that takes only part of a
frame, one that would block, one that failed -- falls back to the ordinary
path without losing, duplicating or reordering a byte. The local sockets are
real loopback TCP connections; the sessions are memory-stream pairs.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

import revdial
import revdial._splice as splice_module
from conftest import KiB, open_tcp_pair, receive_exactly
from session_pairs import SMALL_LIMITS, open_pair

READ = 64 * KiB


@asynccontextmanager
async def spliced(
    seconds: float = 10,
) -> AsyncIterator[tuple[revdial.TunnelStream, trio.SocketStream, revdial.TunnelStream]]:
    """Our end of a session pair spliced to a loopback TCP connection, all
    within ``seconds``: yields (the peer's end, the TCP client, our end)."""
    async with open_pair(extensions=1) as p:
        with trio.fail_after(seconds):
            ours, agent = await p.open()
            local, client = await open_tcp_pair()
            async with client, trio.open_nursery() as nursery:
                nursery.start_soon(lambda: revdial.splice(ours, local, read_size=READ))
                yield agent, client, ours


@asynccontextmanager
async def spliced_after(
    *early: bytes,
) -> AsyncIterator[tuple[revdial.TunnelStream, trio.SocketStream]]:
    """As :func:`spliced`, but the peer's ``early`` data reaches our end (and
    is buffered there) before the splice starts, as during an agent's dial:
    yields (the peer's end, the TCP client)."""
    async with open_pair(extensions=1) as p:
        with trio.fail_after(10):
            ours, agent = await p.open()
            for data in early:
                await agent.send_all(data)
            await trio.testing.wait_all_tasks_blocked()  # buffered in `ours`
            local, client = await open_tcp_pair()
            async with client, trio.open_nursery() as nursery:
                nursery.start_soon(lambda: revdial.splice(ours, local, read_size=READ))
                yield agent, client


@pytest.fixture
def direct_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the bytes each direct write of the splice hands to the kernel."""
    writes: list[int] = []
    real = splice_module.direct_writer

    def counting(local: trio.abc.Stream) -> Callable[[bytes], int] | None:
        sink = real(local)
        if sink is None:
            return None

        def write(data: bytes) -> int:
            n = sink(data)
            writes.append(n)
            return n

        return write

    monkeypatch.setattr(splice_module, "direct_writer", counting)
    return writes


async def test_small_exchanges_take_the_direct_paths(
    direct_writes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Request/response traffic: answers are written by the reader, in order."""
    sent_nowait = 0
    real_send_nowait = revdial.TunnelStream._send_nowait

    def counting_send_nowait(self: revdial.TunnelStream, data: bytes) -> bool:
        nonlocal sent_nowait
        queued = real_send_nowait(self, data)
        sent_nowait += queued
        return queued

    monkeypatch.setattr(revdial.TunnelStream, "_send_nowait", counting_send_nowait)
    async with spliced() as (agent, client, _):
        rng = random.Random(13)
        for i in range(200):
            request = f"GET /{i} ".encode() * rng.randint(1, 50)
            await client.send_all(request)
            assert await receive_exactly(agent, len(request)) == request
            answer = bytes([i % 256]) * rng.randint(1, 3000)
            await agent.send_all(answer)
            assert await receive_exactly(client, len(answer)) == answer
        await client.send_eof()
        assert await agent.receive_some() == b""
        await agent.aclose()
        assert await client.receive_some() == b""
    assert sum(direct_writes) > 0, "answers were not written directly"
    assert sent_nowait > 0, "requests were not queued without waiting"


async def test_a_partial_direct_write_keeps_the_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket takes a few bytes of each frame: the rest follows, in order."""

    def stingy(local: trio.abc.Stream) -> Callable[[bytes], int] | None:
        fd = local.socket.fileno()  # type: ignore[attr-defined]
        return lambda data: os.write(fd, data[:3])

    monkeypatch.setattr(splice_module, "direct_writer", stingy)
    async with spliced() as (agent, client, _):
        messages = [bytes([i]) * (1 + 97 * i % 2000) for i in range(1, 60)]
        for message in messages:
            await agent.send_all(message)
        await agent.aclose()
        got = bytearray()
        while chunk := await client.receive_some(READ):
            got += chunk
        assert bytes(got) == b"".join(messages)


async def test_a_socket_that_would_block_gets_backpressure(direct_writes: list[int]) -> None:
    """The client stops reading: direct writes stop at EAGAIN, the stream
    buffers and pauses the peer, and every byte arrives once it reads again."""
    async with open_pair(extensions=1, limits=SMALL_LIMITS) as p:
        with trio.fail_after(20):
            ours, agent = await p.open()
            local, client = await open_tcp_pair()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KiB)
            local.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * KiB)
            chunk = bytes(range(256)) * 8  # 2 KiB: below SMALL_LIMITS.small_frame_bytes
            total = 512 * KiB
            async with client, trio.open_nursery() as nursery:
                nursery.start_soon(lambda: revdial.splice(ours, local, read_size=READ))

                async def produce() -> None:
                    for _ in range(total // len(chunk)):
                        await agent.send_all(chunk)
                    await agent.aclose()

                nursery.start_soon(produce)
                # Nothing is read until the producer is held up by the Pause.
                await trio.testing.wait_all_tasks_blocked()
                assert agent._peer_paused
                assert ours._buffer, "the stream should hold what the socket refused"
                got = bytearray()
                while data := await client.receive_some(READ):
                    got += data
                assert bytes(got) == chunk * (total // len(chunk))
            assert direct_writes, "the direct path was never tried"


async def test_a_failed_direct_write_falls_back_to_the_receiver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A direct write that raises leaves the bytes to the receiver's own
    write, which meets the socket as it is (here: healthy)."""
    failures = 0

    def failing(local: trio.abc.Stream) -> Callable[[bytes], int] | None:
        def write(data: bytes) -> int:
            nonlocal failures
            failures += 1
            raise ConnectionResetError("injected")

        return write

    monkeypatch.setattr(splice_module, "direct_writer", failing)
    async with spliced() as (agent, client, _):
        for i in range(20):
            await agent.send_all(b"%d;" % i)
        await agent.aclose()
        got = bytearray()
        while chunk := await client.receive_some(READ):
            got += chunk
        assert bytes(got) == b"".join(b"%d;" % i for i in range(20))
    assert failures > 0


async def test_a_reset_client_resets_the_tunnel_stream() -> None:
    """The client resets while small answers are being written to it
    directly: the peer sees a reset, not an orderly end."""
    async with spliced() as (agent, client, _):
        await agent.send_all(b"hello")
        assert await receive_exactly(client, 5) == b"hello"
        await revdial.abort(client)
        with pytest.raises(revdial.StreamResetError) as info:  # noqa: PT012
            while True:  # the reset may need a write or two to be noticed
                await agent.send_all(b"more")
                await trio.testing.wait_all_tasks_blocked()
        assert "local connection" in info.value.reason


async def test_bulk_reads_and_writes_stay_intact() -> None:
    """Full reads (bulk) and frames above the small-frame size use the
    ordinary write path; both directions arrive whole."""
    async with open_pair(extensions=1) as p:
        with trio.fail_after(20):
            ours, agent = await p.open()
            local, client = await open_tcp_pair()
            up = os.urandom(2 * 1024 * KiB)
            down = os.urandom(2 * 1024 * KiB)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: revdial.splice(ours, local, read_size=READ))

                async def upload() -> None:
                    await client.send_all(up)
                    await client.send_eof()

                async def download() -> None:
                    await agent.send_all(down)
                    await agent.send_eof()

                nursery.start_soon(upload)
                nursery.start_soon(download)
                got_up = bytearray()
                while data := await agent.receive_some():
                    got_up += data
                got_down = bytearray()
                while data := await client.receive_some(READ):
                    got_down += data
                assert bytes(got_up) == up
                assert bytes(got_down) == down
                await agent.aclose()
            await client.aclose()


async def test_a_reset_while_reading_directly_reaches_the_peer() -> None:
    """ECONNRESET from the direct read is a local failure, sent as a reset."""
    async with spliced() as (agent, client, _):
        await client.send_all(b"partial")
        assert await receive_exactly(agent, 7) == b"partial"
        await agent.send_all(b"unread answer")
        await trio.testing.wait_all_tasks_blocked()
        await revdial.abort(client)
        with pytest.raises(revdial.StreamResetError) as info:
            await agent.receive_some()
        assert "local connection failed" in info.value.reason


# --- the lazy receiver: an idle spliced socket holds one task ----------------------


def _tasks_named(name: str) -> int:
    """How many live tasks run a coroutine called ``name``."""
    count = 0
    root = trio.lowlevel.current_root_task()
    assert root is not None
    stack = [root]
    while stack:
        task = stack.pop()
        if task.coro.__qualname__.endswith(name):
            count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def test_an_idle_spliced_socket_has_no_receiving_task() -> None:
    async with spliced() as (agent, client, _):
        await trio.testing.wait_all_tasks_blocked()
        assert _tasks_named("tunnel_to_local") == 0
        for i in range(5):  # small answers go straight to the socket
            await agent.send_all(b"answer %d;" % i)
            assert await receive_exactly(client, 9) == b"answer %d;" % i
        assert _tasks_named("tunnel_to_local") == 0
        await agent.send_eof()  # the peer's half-close needs a receiver
        assert await client.receive_some(READ) == b""
        await client.send_all(b"last words")
        assert await receive_exactly(agent, 10) == b"last words"
        await client.send_eof()
        assert await agent.receive_some() == b""


async def test_data_buffered_before_the_splice_is_delivered_first() -> None:
    async with spliced_after(b"early") as (agent, client):
        await agent.send_all(b" and late")
        assert await receive_exactly(client, 14) == b"early and late"
        await agent.aclose()
        assert await client.receive_some(READ) == b""


async def test_early_data_needs_no_receiving_task() -> None:
    """Data that arrived during the dial (a remotedialer server sends it right
    behind the Connect) goes to the socket as the splice starts: the stream
    then idles with one task, as if the data had come later."""
    async with spliced_after(b"early", b" bytes") as (agent, client):
        assert await receive_exactly(client, 11) == b"early bytes"
        await trio.testing.wait_all_tasks_blocked()
        assert _tasks_named("tunnel_to_local") == 0
        await agent.send_all(b"; later")
        assert await receive_exactly(client, 7) == b"; later"
        await agent.aclose()
        assert await client.receive_some(READ) == b""


async def test_early_data_the_socket_does_not_take_goes_to_a_receiver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = splice_module.direct_writer

    def three_bytes_once(local: trio.abc.Stream) -> Callable[[bytes], int] | None:
        sink = real(local)
        assert sink is not None
        calls: list[int] = []

        def write(data: bytes) -> int:
            calls.append(len(data))
            return sink(data[:3] if len(calls) == 1 else data)

        return write

    monkeypatch.setattr(splice_module, "direct_writer", three_bytes_once)
    async with spliced_after(b"early", b" bytes") as (agent, client):
        await agent.send_all(b"; later")
        # The rest of the first chunk, the second and the later data follow
        # in order through the receiver.
        assert await receive_exactly(client, 18) == b"early bytes; later"
        await agent.aclose()
        assert await client.receive_some(READ) == b""


async def test_a_silent_go_agent_times_out_the_dial_of_an_idle_splice(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Plain remotedialer never confirms a dial: with no receiving task, the
    splice's own wait for the socket enforces the first-byte timeout."""
    async with open_pair(extensions=0) as p:
        stream = p.server.open_stream("tcp", "192.0.2.1:80")
        await p.server.dial(stream, 5, wait=False)
        local, client = await open_tcp_pair()
        async with client:
            t0 = trio.current_time()
            with pytest.raises(revdial.DialTimeoutError):
                await revdial.splice(stream, local, read_size=READ)
            assert trio.current_time() - t0 == pytest.approx(5)
            with pytest.raises(trio.BrokenResourceError):
                await client.receive_some(READ)  # reset, not an orderly end
