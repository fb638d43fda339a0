"""The trio driver (``revdial._session``) over memory streams, in virtual time.

Every test runs under ``MockClock(autojump_threshold=0)`` (pytest-trio's
``autojump_clock`` fixture): whenever all tasks are blocked the clock jumps
to the next deadline, so ten idle minutes cost nothing and times can be
asserted exactly. No test sleeps in real time.

Covered:

1. keepalive: an idle pair survives 10 minutes (client pings every
   ``ping_interval``, server never pings); a silent peer is declared dead at
   exactly ``ping_timeout`` after the last byte it delivered, on either side,
   and every stream fails with ``SessionLostError``;
2. flow control with small limits: a flooding agent stalls on Pause, the
   server's buffer stays bounded, another stream keeps echoing, and all bytes
   arrive in order once the reader resumes;
3. a peer ignoring Pause gets that stream reset (exact ``stream_max_buffer``
   boundary), the session lives on;
4. protocol errors end the session and fail its streams;
5. replies: ``connection not found``, silence for unknown-id Errors, refused
   client-initiated Connect;
6. SyncConnections: reaping with ``sync_grace`` (exact boundary) and the
   client's periodic Sync at exactly ``sync_interval``;
7. cancellation leaves the tables clean; session teardown fails streams;
8. Busy/Closed/Broken/reset-vs-EOF semantics of ``TunnelStream``;
9. half-close and confirmed dial (revdial extension v1) through the driver;
10. the bounded control-frame queue (a peer that provokes replies but does
    not read them).

Three tests pin down bugs found here once: a Data frame queued after the
closing Error, ``Session.ended`` never set on cancellation, and
``connection not found`` replies escaping the control-frame bound.

Helpers (pairs over memory streams, a silenceable/cloggable transport, a
frame recorder, a bare WebSocket peer) are in ``session_pairs.py``.
"""

from __future__ import annotations

import hashlib
import random

import pytest
import trio
import trio.testing

import revdial
from revdial import Limits, SessionStatistics, TunnelStream
from revdial._frames import ExtType, Frame, MessageType, encode, parse_sync
from revdial._limits import DEFAULT_LIMITS
from revdial._state import CLIENT_FIRST_CONN_ID, OVERRUN_TEXT
from revdial.testing import echo_handler
from session_pairs import (
    SMALL_LIMITS,
    KiB,
    MiB,
    Pair,
    RawPeer,
    connect_frame,
    data_frame,
    error_frame,
    half_close_frame,
    open_pair,
    open_raw_client,
    open_raw_server,
    pause_frame,
    resume_frame,
    sync_frame,
)

PING_INTERVAL = DEFAULT_LIMITS.ping_interval
PING_TIMEOUT = DEFAULT_LIMITS.ping_timeout
CLOSE_TIMEOUT = DEFAULT_LIMITS.close_timeout
SYNC_INTERVAL = DEFAULT_LIMITS.sync_interval
SYNC_GRACE = DEFAULT_LIMITS.sync_grace

SMALL = SMALL_LIMITS

ZERO = SessionStatistics(streams=0, buffered_bytes=0, outbox_bytes=0, outbox_frames=0)

wait_all_tasks_blocked = trio.testing.wait_all_tasks_blocked


async def exchange(pair: Pair) -> tuple[TunnelStream, TunnelStream]:
    """Open a stream and pass one byte each way (so neither side is 'dialing')."""
    ours, theirs = await pair.open()
    await theirs.send_all(b"a")
    assert await ours.receive_some() == b"a"
    await ours.send_all(b"s")
    assert await theirs.receive_some() == b"s"
    return ours, theirs


async def drain(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything up to EOF."""
    out = bytearray()
    while data := await stream.receive_some():
        out += data
    return bytes(out)


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# --- 1. keepalive and dead peers -------------------------------------------------


async def test_idle_pair_stays_open_ten_minutes(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair(behaviours={"echo:1": echo_handler}) as p:
        t0 = p.started_at
        await trio.sleep(600)
        assert trio.current_time() == t0 + 600
        assert p.server.is_open
        assert p.client.is_open
        assert not p.server.ended.is_set()
        assert not p.client.ended.is_set()
        assert p.server.end_reason is None
        assert p.client.end_reason is None
        # The client pinged every ping_interval from the start; the server never pings.
        pings = [t - t0 for t in p.client_ws.pings if t - t0 < 600]
        assert pings == [PING_INTERVAL * i for i in range(int(600 / PING_INTERVAL))]
        assert p.server_ws.pings == []
        # Pings reached the server and pongs the client, within one interval.
        now = trio.current_time()
        assert now - p.server_side.activity.last_receive <= PING_INTERVAL
        assert now - p.client_side.activity.last_receive <= PING_INTERVAL
        # Only the client sends SyncConnections, every sync_interval.
        syncs = [t - t0 for t, f in p.client_ws.sent if f.type == MessageType.SYNC_CONNECTIONS]
        assert [t for t in syncs if t < 600] == [SYNC_INTERVAL * i for i in range(1, 10)]
        assert p.server_ws.count(MessageType.SYNC_CONNECTIONS) == 0
        # And the pair still carries streams.
        stream = p.server.open_stream("tcp", "echo:1")
        await stream.send_all(b"still here")
        assert await stream.receive_some() == b"still here"


async def test_server_detects_silent_client(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair() as p:
        t0 = p.started_at
        talked, _ = await exchange(p)
        fresh, _ = await p.open()  # the agent never sends on this one
        await trio.sleep(12.5)
        # The last thing the server heard is the client's ping at t0 + 10.
        t_last = p.server_side.activity.last_receive
        assert t_last == t0 + 10.0
        p.server_side.valve.silence()  # client -> server goes quiet

        with trio.fail_after(PING_TIMEOUT), pytest.raises(revdial.SessionLostError) as info:
            await talked.receive_some()
        # Detected exactly ping_timeout after the last byte, i.e. within one
        # ping interval of ping_timeout after the silence began.
        assert trio.current_time() == t_last + PING_TIMEOUT
        assert not isinstance(info.value, revdial.DialError)
        assert not p.server.is_open
        assert p.server.statistics() == ZERO
        # A stream that never received data reports a lost *dial*.
        with pytest.raises(revdial.DialSessionLostError):
            await fresh.receive_some()
        with pytest.raises(revdial.SessionLostError):
            await talked.send_all(b"x")
        with pytest.raises(revdial.SessionLostError):
            p.server.open_stream("tcp", "target:1")

        # ended fires once the WebSocket is closed: the close handshake cannot
        # complete (the peer is silent), so after close_timeout at most.
        with trio.fail_after(CLOSE_TIMEOUT + 1):
            await p.server.ended.wait()
        assert trio.current_time() == t_last + PING_TIMEOUT + CLOSE_TIMEOUT
        assert isinstance(p.server.end_reason, revdial.SessionLostError)
        assert "silent" in str(p.server.end_reason)


async def test_unanswered_ping_ends_the_session_even_while_data_flows(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A server that sends data but never answers pings: one ping stays in
    flight (none pile up in trio-websocket's ping table) and after
    ``ping_timeout`` without its pong the session ends."""
    async with open_raw_server() as (client, peer, accepted):
        await peer.send(connect_frame(2, "tcp/x:1"))
        with trio.fail_after(1):
            ours = await accepted.receive()
        t0 = trio.current_time()  # the client's first ping (now) is answered
        await trio.testing.wait_all_tasks_blocked()
        peer.side.valve.silence()  # then the raw server stops reading: no pong, ever
        sent = 0
        while client.end_reason is None:
            if sent % 5 == 0:
                await peer.send(data_frame(2, b"tick"))  # data arrives every 5 s
            sent += 1
            assert len(client.ws._pings) <= 1  # one ping in flight at most
            await trio.sleep(1)  # virtual time
            await trio.testing.wait_all_tasks_blocked()  # what is due now has run
        # The second ping (at t0 + ping_interval) was never answered.
        assert trio.current_time() == t0 + PING_INTERVAL + PING_TIMEOUT
        assert "no pong within" in str(client.end_reason)
        # (The stream belongs to its Connect handler, which the session's end
        # cancels and closes: a reader outside it sees either.)
        with pytest.raises((revdial.SessionLostError, trio.ClosedResourceError)):
            await drain(ours)


async def test_client_detects_silent_server(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair() as p:
        t0 = p.started_at
        _, agent_side = await exchange(p)
        await trio.sleep(12.5)
        # The last thing the client heard is the pong to its ping at t0 + 10.
        t_last = p.client_side.activity.last_receive
        assert t_last == t0 + 10.0
        p.client_side.valve.silence()  # server -> client goes quiet

        # Agent-side streams belong to their Connect handler, which the session
        # cancels as it ends; the handler's exit closes the stream. A task
        # reading it from outside the handler therefore sees either the
        # session loss or that close, depending on trio's scheduling order.
        with (
            trio.fail_after(PING_TIMEOUT),
            pytest.raises((revdial.SessionLostError, trio.ClosedResourceError)),
        ):
            await agent_side.receive_some()
        assert trio.current_time() == t_last + PING_TIMEOUT
        # One ping into the silence: the next waits for its pong (never came).
        pings = [t - t0 for t in p.client_ws.pings if t_last < t < t_last + PING_TIMEOUT]
        assert pings == [15.0]
        assert not p.client.is_open
        assert p.client.statistics() == ZERO
        with trio.fail_after(CLOSE_TIMEOUT + 1):
            await p.client.ended.wait()
        assert isinstance(p.client.end_reason, revdial.SessionLostError)


async def test_any_received_byte_counts_as_life(autojump_clock: trio.abc.Clock) -> None:
    """The watchdog counts bytes, not pongs: a peer that never pings but keeps
    sending stays alive, and is dropped ping_timeout after its last byte."""
    async with open_raw_client() as (server, peer):
        t0 = trio.current_time()
        for _ in range(10):
            await trio.sleep(PING_TIMEOUT - 1)
            await peer.round_trip()
        t_last = t0 + 10 * (PING_TIMEOUT - 1)
        assert server.is_open
        assert peer.session_side.activity.last_receive == t_last
        with trio.fail_after(PING_TIMEOUT + CLOSE_TIMEOUT):
            await server.ended.wait()
        # The raw peer answers the close handshake at once.
        assert trio.current_time() == t_last + PING_TIMEOUT
        assert isinstance(server.end_reason, revdial.SessionLostError)


# --- 2. flow control ---------------------------------------------------------------


async def test_flow_control_stalls_writer_bounds_buffer_and_keeps_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    total = 2 * MiB
    payload = random_bytes(total, seed=7)
    written = 0
    chunk = 8 * KiB

    async def flood(stream: TunnelStream) -> None:
        nonlocal written
        view = memoryview(payload)
        for offset in range(0, total, chunk):
            await stream.send_all(view[offset : offset + chunk])
            written += chunk
        await stream.aclose()

    async with open_pair(limits=SMALL, behaviours={"flood:1": flood, "echo:1": echo_handler}) as p:
        reader = p.server.open_stream("tcp", "flood:1")
        await wait_all_tasks_blocked()

        # The agent's writer is stalled long before the end ...
        stalled = written
        assert SMALL.stream_high_water <= stalled < total
        # ... because the server paused it, exactly once,
        assert p.server_ws.count(MessageType.PAUSE, reader.conn_id) == 1
        assert p.server_ws.count(MessageType.RESUME, reader.conn_id) == 0
        # ... and what the server holds is bounded: the high-water mark plus
        # what was in flight while the Pause travelled (the agent's outbox and
        # what its writer had already handed to the transport: 104 KiB here),
        # far below stream_max_buffer.
        buffered = p.server.statistics().buffered_bytes
        overshoot_bound = SMALL.stream_high_water + 2 * SMALL.outbox_bytes
        assert SMALL.stream_high_water < buffered <= overshoot_bound < SMALL.stream_max_buffer
        assert buffered == stalled  # nothing lost, nothing stuck in between

        # Time passes (pings flow), nothing moves.
        await trio.sleep(20)
        assert written == stalled
        assert p.server.statistics().buffered_bytes == buffered

        # No head-of-line blocking: another stream still echoes, even more
        # than a frame's worth.
        echo = p.server.open_stream("tcp", "echo:1")
        for i in range(3):
            message = random_bytes(40 * KiB, seed=i)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(echo.send_all, message)
                got = bytearray()
                while len(got) < len(message):
                    got += await echo.receive_some()
            assert got == message
        assert written == stalled

        # Resume reading: everything arrives, in order, and the buffer never
        # exceeded the bound while the flood went on.
        digest = hashlib.sha256()
        received = 0
        peak = 0
        while data := await reader.receive_some(12 * KiB):
            digest.update(data)
            received += len(data)
            peak = max(peak, p.server.statistics().buffered_bytes)
        assert received == total
        assert digest.digest() == hashlib.sha256(payload).digest()
        assert peak <= overshoot_bound
        assert written == total

        pauses = p.server_ws.count(MessageType.PAUSE, reader.conn_id)
        resumes = p.server_ws.count(MessageType.RESUME, reader.conn_id)
        assert resumes >= 1  # reading below low water resumed the writer
        assert pauses - resumes in (0, 1)
        # Nothing ever had to pause the server's writes (the echo reads promptly).
        assert p.client_ws.count(MessageType.PAUSE) == 0
        await wait_all_tasks_blocked()
        assert p.server.statistics().buffered_bytes == 0


# --- 3. overrun ---------------------------------------------------------------------


async def test_peer_ignoring_pause_gets_its_stream_reset(autojump_clock: trio.abc.Clock) -> None:
    async with open_raw_client(limits=SMALL) as (server, peer):
        stream = server.open_stream("tcp", "x:1")
        connect = await peer.receive()
        assert connect.type == MessageType.CONNECT
        cid = connect.conn_id
        frame = bytes(16 * KiB)

        # Exactly stream_max_buffer: paused, not yet reset.
        for _ in range(SMALL.stream_max_buffer // len(frame)):
            await peer.send(data_frame(cid, frame))
        pause = await peer.receive()
        assert (pause.type, pause.conn_id) == (MessageType.PAUSE, cid)
        await peer.round_trip()
        assert server.statistics().buffered_bytes == SMALL.stream_max_buffer

        # One byte more: the stream is reset, and only that stream.
        await peer.send(data_frame(cid, b"!"))
        error = await peer.receive()
        assert (error.type, error.conn_id) == (MessageType.ERROR, cid)
        assert error.payload == OVERRUN_TEXT.encode()
        # The buffered data is dropped: the reader gets the reset at once.
        with pytest.raises(revdial.StreamResetError):
            await stream.receive_some()
        with pytest.raises(revdial.StreamResetError):
            await stream.send_all(b"x")
        assert server.statistics() == ZERO

        # Data still in flight is routine: answered with "connection not found".
        await peer.send(data_frame(cid, b"late"))
        late = await peer.receive()
        assert (late.type, late.conn_id) == (MessageType.ERROR, cid)
        assert late.payload == f"connection not found c1/0/{cid}".encode()

        # The session lives on.
        assert server.is_open
        other = server.open_stream("tcp", "y:1")
        connect2 = await peer.receive()
        assert connect2.conn_id == cid + 1
        await peer.send(data_frame(connect2.conn_id, b"hi"))
        assert await other.receive_some() == b"hi"
        await stream.aclose()  # already gone: sends nothing
        await peer.round_trip()


# --- 4. protocol errors ------------------------------------------------------------

FATAL_MESSAGES: dict[str, bytes | str] = {
    "text message": "hello",
    "empty message": b"",
    "truncated varint": b"\x02\x04\x80",
    "varint overflow": b"\xff" * 11,
    "data without deadline": b"\x02\x04\x02",
    "sync of bad length": encode(Frame(1, 0, MessageType.SYNC_CONNECTIONS, b"\x01\x02\x03")),
    "connect without slash": encode(Frame(1, 9, MessageType.CONNECT, b"tcp:x")),
    "malformed add client": encode(Frame(1, 0, MessageType.ADD_CLIENT, b"no-slash")),
    "malformed remove client": encode(Frame(1, 0, MessageType.REMOVE_CLIENT, b"k/notanumber")),
}


@pytest.mark.parametrize("message", FATAL_MESSAGES.values(), ids=FATAL_MESSAGES.keys())
async def test_protocol_error_ends_session(
    autojump_clock: trio.abc.Clock, message: bytes | str
) -> None:
    async with open_raw_client() as (server, peer):
        talked = server.open_stream("tcp", "x:1")
        fresh = server.open_stream("tcp", "y:1")
        assert (talked.conn_id, fresh.conn_id) == (2, 3)
        assert (await peer.receive()).conn_id == 2
        assert (await peer.receive()).conn_id == 3
        await peer.send(data_frame(2, b"d"))
        assert await talked.receive_some() == b"d"

        t_sent = trio.current_time()
        await peer.send(message)
        with trio.fail_after(CLOSE_TIMEOUT):
            await server.ended.wait()
        # The raw peer answers the close handshake: no waiting for a timeout.
        assert trio.current_time() == t_sent
        assert isinstance(server.end_reason, revdial.ProtocolError)
        with pytest.raises(revdial.SessionLostError) as info:
            await talked.receive_some()
        assert not isinstance(info.value, revdial.DialError)
        with pytest.raises(revdial.DialSessionLostError):
            await fresh.receive_some()
        assert server.statistics() == ZERO
        # No Error frames on the way out (Go sends "tunnel disconnect"; we
        # close the WebSocket instead), and the peer sees the connection end.
        assert peer.pending() == []
        with pytest.raises(trio.EndOfChannel):
            await peer.receive()


async def test_unknown_message_types_are_ignored(autojump_clock: trio.abc.Clock) -> None:
    async with open_raw_client() as (server, peer):
        for mtype in (0, 9, 100, -1):
            await peer.send(encode(Frame(1, 5, mtype, b"whatever")))
        # Peering frames carry nothing for us, but well-formed ones are fine.
        await peer.send(encode(Frame(1, 0, MessageType.ADD_CLIENT, b"k/12")))
        await peer.send(encode(Frame(1, 0, MessageType.REMOVE_CLIENT, b"k/12")))
        await peer.round_trip()
        assert server.is_open


# --- 5. replies ---------------------------------------------------------------------


async def test_data_for_unknown_id_is_answered_connection_not_found(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_raw_client(client_key="c1", session_key=4242) as (server, peer):
        await peer.send(data_frame(999, b"lost"))
        reply = await peer.receive()
        assert (reply.type, reply.conn_id) == (MessageType.ERROR, 999)
        assert reply.payload == b"connection not found c1/4242/999"
        assert server.is_open


async def test_client_session_names_itself_client_0(autojump_clock: trio.abc.Clock) -> None:
    async with open_raw_server() as (_client, peer, _accepted):
        await peer.send(data_frame(999, b"lost"))
        reply = await peer.receive()
        assert reply.payload == b"connection not found client/0/999"


async def test_error_pause_resume_for_unknown_id_are_not_answered(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_raw_client() as (server, peer):
        await peer.send(error_frame(555, "boom"))
        await peer.send(error_frame(556, "EOF"))
        await peer.send(pause_frame(557))
        await peer.send(resume_frame(558))
        # The next thing to arrive is the answer to the marker sent after them.
        await peer.round_trip()
        assert server.is_open


async def test_client_initiated_connect_refused_by_server_session(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_raw_client() as (server, peer):
        await peer.send(connect_frame(7, "tcp/127.0.0.1:22"))
        reply = await peer.receive()
        assert (reply.type, reply.conn_id) == (MessageType.ERROR, 7)
        assert reply.payload.startswith(b"revdial: ")
        assert reply.payload != b"EOF"
        await peer.round_trip()  # that was the only reply
        assert server.is_open
        assert server.statistics() == ZERO
        # The id is not kept: its data is "not found"; a retry is refused again.
        await peer.send(data_frame(7, b"x"))
        assert (await peer.receive()).payload == b"connection not found c1/0/7"
        await peer.send(connect_frame(7, "tcp/127.0.0.1:22"))
        assert (await peer.receive()).conn_id == 7
        # Server-opened streams still work.
        stream = server.open_stream("tcp", "x:1")
        assert (await peer.receive()).conn_id == stream.conn_id
        await peer.send(data_frame(stream.conn_id, b"ok"))
        assert await stream.receive_some() == b"ok"


# --- 6. SyncConnections -------------------------------------------------------------


async def test_sync_reaps_unlisted_streams_older_than_grace(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_raw_client() as (server, peer):
        t0 = trio.current_time()
        old = server.open_stream("tcp", "old:1")
        listed = server.open_stream("tcp", "listed:1")
        for stream in (old, listed):
            assert (await peer.receive()).conn_id == stream.conn_id
        await peer.send(data_frame(old.conn_id, b"unread"))
        await trio.sleep(SYNC_GRACE - 0.5)
        young = server.open_stream("tcp", "young:1")
        assert (await peer.receive()).conn_id == young.conn_id
        await trio.sleep(0.5)
        assert trio.current_time() == t0 + SYNC_GRACE

        # Lists only `listed` (and an id we never heard of). `old` is exactly
        # sync_grace old: reaped; `young` is 0.5 s younger: spared.
        await peer.send(sync_frame([listed.conn_id, 12345]))
        await peer.round_trip()  # no Error frame for the reaped stream
        stats = server.statistics()
        assert stats.streams == 2
        assert stats.buffered_bytes == 0
        # Data it had already received is still readable, then the reset.
        assert await old.receive_some() == b"unread"
        with pytest.raises(revdial.StreamResetError):
            await old.receive_some()
        for stream in (listed, young):
            await peer.send(data_frame(stream.conn_id, b"alive"))
            assert await stream.receive_some() == b"alive"
        await old.aclose()  # already removed: nothing is sent
        await peer.round_trip()

        # An empty Sync once everything is old enough reaps the rest.
        await trio.sleep(SYNC_GRACE)
        await peer.send(sync_frame([]))
        await peer.round_trip()
        assert server.statistics() == ZERO
        with pytest.raises(revdial.StreamResetError):
            await young.receive_some()


async def accept_5_and_6(
    peer: RawPeer, accepted: trio.MemoryReceiveChannel[TunnelStream]
) -> tuple[TunnelStream, TunnelStream]:
    """The raw server opens ids 5 and 6; return the agent-side streams."""
    await peer.send(connect_frame(5, "tcp/a:1"))
    await peer.send(connect_frame(6, "tcp/other:1"))
    with trio.fail_after(1):
        return await accepted.receive(), await accepted.receive()


async def test_connect_reusing_a_live_id_resets_only_that_stream(
    autojump_clock: trio.abc.Clock,
) -> None:
    """One bad frame costs its own stream: the session, and the new stream, go on."""
    async with open_raw_server() as (client, peer, accepted):
        old, other = await accept_5_and_6(peer, accepted)
        await peer.send(data_frame(5, b"for the old one"))
        assert await old.receive_some() == b"for the old one"
        await peer.send(data_frame(5, b"unread"))
        await peer.round_trip()

        await peer.send(connect_frame(5, "tcp/b:2"))  # id 5 again, while in use
        with trio.fail_after(1):
            new = await accepted.receive()
        with pytest.raises(revdial.StreamResetError, match="reused its connection id"):
            await old.receive_some()
        with pytest.raises(revdial.StreamResetError):
            await old.send_all(b"never sent")
        await old.aclose()  # closing the old stream must not close the new one
        await peer.send(data_frame(5, b"for the new one"))
        assert await new.receive_some() == b"for the new one"
        await new.send_all(b"reply")
        reply = await peer.receive()
        assert (reply.type, reply.conn_id, reply.payload) == (MessageType.DATA, 5, b"reply")
        assert client.is_open
        assert client.statistics().streams == 2  # the new 5 and 6

        await new.aclose()
        await other.aclose()
        closes = [await peer.receive(), await peer.receive()]
        # Exactly one EOF for id 5 (the new stream's), none for the replaced one.
        assert sorted((f.type, f.conn_id, f.payload) for f in closes) == [
            (MessageType.ERROR, 5, b"EOF"), (MessageType.ERROR, 6, b"EOF")]
        await peer.round_trip()
        assert [f for f in peer.pending() if f.conn_id == 5] == []
        assert client.statistics() == ZERO


async def test_agent_reusing_a_server_id_resets_that_stream_only(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A Connect from the agent for an id the server opened: that stream is reset,
    the Connect refused (the server does not dial), the session goes on."""
    async with open_raw_client() as (server, peer):
        talked = server.open_stream("tcp", "x:1")
        assert (await peer.receive()).conn_id == talked.conn_id
        await peer.send(connect_frame(talked.conn_id, "tcp/evil:1"))
        with pytest.raises(revdial.StreamResetError):
            await talked.receive_some()
        refusal = await peer.receive()
        assert (refusal.type, refusal.conn_id) == (MessageType.ERROR, talked.conn_id)
        assert server.is_open
        await talked.aclose()
        await peer.round_trip()
        assert server.statistics() == ZERO


async def test_replaced_stream_data_still_queued_is_dropped(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Data the old stream queued must not reach the connection that took its id."""
    async with open_raw_server() as (client, peer, accepted):
        old, other = await accept_5_and_6(peer, accepted)
        await peer.round_trip()
        valve = peer.session_side.valve
        valve.clog()
        await other.send_all(b"in flight")  # the writer takes it and blocks
        await wait_all_tasks_blocked()
        await old.send_all(b"queued behind it")
        assert client.statistics().outbox_bytes == len(b"queued behind it")
        await peer.send(connect_frame(5, "tcp/b:2"))
        with trio.fail_after(1):
            new = await accepted.receive()
        assert client.statistics().outbox_bytes == 0
        valve.unclog()
        first = await peer.receive()
        assert (first.conn_id, first.payload) == (6, b"in flight")
        await new.send_all(b"new")
        second = await peer.receive()
        assert (second.conn_id, second.payload) == (5, b"new")
        await old.aclose()
        await peer.round_trip()
        assert peer.pending() == []


async def test_client_sends_sync_every_interval(autojump_clock: trio.abc.Clock) -> None:
    async with open_raw_server() as (client, peer, accepted):
        t0 = trio.current_time()
        await peer.send(connect_frame(2, "tcp/x:1"))
        with trio.fail_after(1):
            theirs = await accepted.receive()
        ours = client.open_stream("tcp", "y:1")
        connect = await peer.receive()
        assert connect.type == MessageType.CONNECT
        assert connect.conn_id == ours.conn_id == CLIENT_FIRST_CONN_ID

        t, sync = await peer.receive_timed(within=SYNC_INTERVAL + 1)
        assert t == t0 + SYNC_INTERVAL
        assert (sync.type, sync.conn_id) == (MessageType.SYNC_CONNECTIONS, 0)
        assert parse_sync(sync.payload) == [2, CLIENT_FIRST_CONN_ID]

        await theirs.aclose()
        eof = await peer.receive()
        assert (eof.type, eof.conn_id, eof.payload) == (MessageType.ERROR, 2, b"EOF")
        t, sync = await peer.receive_timed(within=SYNC_INTERVAL + 1)
        assert t == t0 + 2 * SYNC_INTERVAL
        assert parse_sync(sync.payload) == [CLIENT_FIRST_CONN_ID]

        await ours.aclose()
        assert (await peer.receive()).type == MessageType.ERROR
        t, sync = await peer.receive_timed(within=SYNC_INTERVAL + 1)
        assert t == t0 + 3 * SYNC_INTERVAL
        assert sync.payload == b""  # sent even when empty
        assert client.is_open  # kept alive by the raw server's pongs


# --- 7. cancellation and teardown ---------------------------------------------------


async def test_cancelled_send_blocked_by_pause_leaves_tables_clean(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_pair(limits=SMALL) as p:
        ours, theirs = await p.open()
        with trio.move_on_after(5) as scope:
            await ours.send_all(bytes(1 * MiB))
        assert scope.cancelled_caught
        # It was Pause that blocked it (the agent paused the server's stream).
        assert p.client_ws.count(MessageType.PAUSE, theirs.conn_id) == 1
        assert p.server.statistics().outbox_bytes == 0

        await ours.aclose()
        await wait_all_tasks_blocked()
        assert p.server.statistics() == ZERO
        assert p.client.statistics() == ZERO
        # The agent gets what was sent before the cancellation, whole frames, then EOF.
        got = await drain(theirs)
        assert SMALL.stream_high_water < len(got) < 1 * MiB
        assert len(got) % SMALL.max_frame_size == 0
        assert p.client.statistics() == ZERO


async def test_cancelled_receive_loses_nothing(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair() as p:
        ours, theirs = await p.open()
        with trio.move_on_after(3) as scope:
            await ours.receive_some()
        assert scope.cancelled_caught
        await theirs.send_all(b"after the cancel")
        assert await ours.receive_some() == b"after the cancel"
        await ours.aclose()
        await wait_all_tasks_blocked()
        assert p.server.statistics() == ZERO
        assert p.client.statistics() == ZERO


async def test_cancelled_task_holding_streams_leaves_tables_clean(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_pair(limits=SMALL) as p:
        reached = []

        async def holder() -> None:
            s1 = p.server.open_stream("tcp", "a:1")
            s2 = p.server.open_stream("tcp", "b:1")
            s3 = p.server.open_stream("tcp", "c:1")
            async with s1, s2, s3, trio.open_nursery() as nursery:
                nursery.start_soon(s1.send_all, bytes(512 * KiB))  # blocks on Pause
                nursery.start_soon(s2.receive_some)  # blocks: nobody sends
                await s3.send_all(b"some")
                reached.append(True)
                await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder)
            await wait_all_tasks_blocked()
            assert reached == [True]
            assert p.server.statistics().streams == 3
            assert p.client.statistics().buffered_bytes > SMALL.stream_high_water
            nursery.cancel_scope.cancel()

        await wait_all_tasks_blocked()
        assert p.server.statistics() == ZERO
        assert p.client.statistics() == ZERO
        # Each stream was closed with an orderly EOF.
        for _, frame in p.server_ws.sent:
            if frame.type == MessageType.ERROR:
                assert frame.payload == b"EOF"
        assert p.server_ws.count(MessageType.ERROR) == 3


async def test_cancelled_send_blocked_on_full_outbox(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair(limits=SMALL) as p:
        ours, theirs = await p.open()
        p.server_side.valve.clog()  # the server's socket stops draining
        with trio.move_on_after(1) as scope:
            await ours.send_all(bytes(1 * MiB))
        assert scope.cancelled_caught
        stats = p.server.statistics()
        # Bounded: the outbox holds at most outbox_bytes (+ the frame that
        # crossed it); the writer holds one more frame.
        assert SMALL.outbox_bytes - SMALL.max_frame_size <= stats.outbox_bytes
        assert stats.outbox_bytes <= SMALL.outbox_bytes + SMALL.max_frame_size
        await ours.aclose()
        p.server_side.valve.unclog()
        await wait_all_tasks_blocked()
        assert p.server.statistics() == ZERO
        got = await drain(theirs)
        assert len(got) % SMALL.max_frame_size == 0  # frames are never torn
        assert p.client.statistics() == ZERO


async def test_no_data_after_close_when_sender_waited_for_outbox_space(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_pair(limits=SMALL) as p:
        ours, _theirs = await p.open()
        p.server_side.valve.clog()

        async def sender() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await ours.send_all(bytes(1 * MiB))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await wait_all_tasks_blocked()  # parked: the outbox is full
            ours.close_nowait()
            await wait_all_tasks_blocked()
            p.server_side.valve.unclog()
        await wait_all_tasks_blocked()
        types = [f.type for _, f in p.server_ws.sent if f.conn_id == ours.conn_id]
        assert types[-1] == MessageType.ERROR, "Data was sent after the closing Error"
        assert p.client_ws.count(MessageType.ERROR, ours.conn_id) == 0


async def test_teardown_fails_every_stream_and_hangs_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    outcomes: dict[str, type[BaseException]] = {}

    async def blocked_receive(name: str, stream: TunnelStream) -> None:
        try:
            await stream.receive_some()
        except revdial.TunnelError as exc:
            outcomes[name] = type(exc)

    async def blocked_send(stream: TunnelStream) -> None:
        try:
            await stream.send_all(b"more")
        except revdial.TunnelError as exc:
            outcomes["paused"] = type(exc)

    async with trio.open_nursery() as outer:
        async with open_pair(limits=SMALL) as p:
            talked, theirs = await exchange(p)
            fresh, _ = await p.open()
            paused, _ = await p.open()
            outer.start_soon(blocked_receive, "talked", talked)
            outer.start_soon(blocked_receive, "fresh", fresh)
            # A sender blocked on Pause is released too.
            with trio.move_on_after(1):
                await paused.send_all(bytes(256 * KiB))
            outer.start_soon(blocked_send, paused)  # parks on the Pause
            await wait_all_tasks_blocked()
            t_exit = trio.current_time()
        # Cancelling the pair closes forcefully, at once.
        assert trio.current_time() == t_exit
        assert not p.server.is_open
        assert not p.client.is_open

    assert outcomes == {
        "talked": revdial.SessionLostError,
        "fresh": revdial.DialSessionLostError,
        "paused": revdial.DialSessionLostError,  # never received anything either
    }
    with pytest.raises(revdial.SessionLostError):
        await talked.send_all(b"x")
    # The agent side's handler was cancelled and its exit closed the stream.
    with pytest.raises(trio.ClosedResourceError):
        await theirs.receive_some()
    assert p.server.statistics() == ZERO
    assert p.client.statistics() == ZERO


async def test_ended_is_set_when_run_is_cancelled(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair() as p:
        pass
    assert not p.server.is_open
    assert p.server.ended.is_set()
    assert p.client.ended.is_set()


async def test_send_blocked_by_pause_released_by_teardown(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair(limits=SMALL) as p:
        ours, _ = await p.open()

        async def stuck_sender() -> None:
            with pytest.raises(revdial.SessionLostError):
                await ours.send_all(bytes(1 * MiB))
            released.append(trio.current_time())

        released: list[float] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stuck_sender)
            await wait_all_tasks_blocked()
            p.server_side.valve.silence()  # the watchdog ends the session
        assert released == [p.server_side.activity.last_receive + PING_TIMEOUT]


# --- 8. stream semantics ------------------------------------------------------------


async def test_concurrent_receivers_are_busy(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair() as p:
        ours, theirs = await p.open()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ours.receive_some)
            await wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await ours.receive_some()
            nursery.cancel_scope.cancel()
        # The failed call did not break the stream.
        await theirs.send_all(b"fine")
        assert await ours.receive_some() == b"fine"


async def test_concurrent_senders_are_busy(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair(limits=SMALL) as p:
        ours, _ = await p.open()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ours.send_all, bytes(512 * KiB))  # blocks on Pause
            await wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await ours.send_all(b"x")
            with pytest.raises(trio.BusyResourceError):
                await ours.wait_send_all_might_not_block()
            nursery.cancel_scope.cancel()


async def test_own_close(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair() as p:
        ours, theirs = await p.open()
        await theirs.send_all(b"unread")
        await wait_all_tasks_blocked()

        async def receive_then_closed() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await ours.receive_some()

        await ours.receive_some()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_then_closed)
            await wait_all_tasks_blocked()
            await ours.aclose()  # wakes the blocked receiver
        for _ in range(3):  # idempotent
            await ours.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await ours.receive_some()
        with pytest.raises(trio.ClosedResourceError):
            await ours.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await ours.send_all(b"")
        await wait_all_tasks_blocked()
        # Exactly one EOF went out, and the peer sees a clean end.
        eofs = p.server_ws.frames(MessageType.ERROR, ours.conn_id)
        assert [f.payload for f in eofs] == [b"EOF"]
        assert await theirs.receive_some() == b""
        # A cancelled aclose still closes.
        other, _ = await p.open()
        with trio.CancelScope() as scope:
            scope.cancel()
            await other.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await other.receive_some()


async def test_peer_eof(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair() as p:
        ours, theirs = await p.open()
        await theirs.send_all(b"last words")
        await theirs.aclose()
        await wait_all_tasks_blocked()
        # Buffered data first, then a sticky clean EOF.
        assert await ours.receive_some() == b"last words"
        assert await ours.receive_some() == b""
        assert await ours.receive_some() == b""
        # No half-close: sending fails, and keeps failing.
        with pytest.raises(trio.BrokenResourceError):
            await ours.send_all(b"x")
        with pytest.raises(trio.BrokenResourceError):
            await ours.send_all(b"x")
        # The peer already forgot the stream; our close sends nothing more.
        await ours.aclose()
        await wait_all_tasks_blocked()
        assert p.server_ws.count(MessageType.ERROR, ours.conn_id) == 0
        assert p.server.statistics() == ZERO
        assert p.client.statistics() == ZERO


async def test_peer_reset(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair() as p:
        ours, theirs = await exchange(p)
        await theirs.send_all(b"partial")
        theirs.close_nowait("write: broken pipe")
        await wait_all_tasks_blocked()
        assert await ours.receive_some() == b"partial"  # drained first
        for _ in range(2):  # sticky
            with pytest.raises(revdial.StreamResetError) as info:
                await ours.receive_some()
            assert info.value.reason == "write: broken pipe"
        with pytest.raises(revdial.StreamResetError):
            await ours.send_all(b"x")
        assert p.server.statistics() == ZERO


async def test_reset_before_any_data_is_a_dial_error(autojump_clock: trio.abc.Clock) -> None:
    """On the opener's side, an Error before any Data is the dial's failure."""
    async with open_pair() as p:
        cases = {
            "dial tcp 10.0.0.1:80: connect: connection refused": revdial.DialUnreachableError,
            "dial tcp 10.0.0.1:80: i/o timeout": revdial.DialTimeoutError,
            "revdial: dial not allowed: tcp/10.0.0.1:80": revdial.DialRefusedError,
        }
        for text, kind in cases.items():
            ours, theirs = await p.open("10.0.0.1:80")
            theirs.close_nowait(text)
            with pytest.raises(kind) as info:
                await ours.receive_some()
            assert info.value.reason == text
            assert info.value.target == "tcp/10.0.0.1:80"
            assert info.value.client_key == "c1"
        # On the dialer's side the same Error is a plain reset.
        ours, theirs = await p.open()
        ours.close_nowait("dial tcp: connect: connection refused")
        with pytest.raises(revdial.StreamResetError) as reset:
            await theirs.receive_some()
        assert not isinstance(reset.value, revdial.DialError)


async def test_receive_some_max_bytes_and_frame_splitting(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair(limits=SMALL) as p:
        ours, theirs = await p.open()
        with pytest.raises(ValueError, match="max_bytes"):
            await ours.receive_some(0)
        await theirs.send_all(b"abcdef")
        assert await ours.receive_some(2) == b"ab"
        assert await ours.receive_some(3) == b"cde"
        assert await ours.receive_some(100) == b"f"

        # Empty writes send nothing; big ones are cut at max_frame_size.
        before = p.server_ws.count(MessageType.DATA, ours.conn_id)
        await ours.send_all(b"")
        big = random_bytes(40 * KiB)
        await ours.send_all(bytearray(big))
        await wait_all_tasks_blocked()
        sizes = [len(f.payload) for f in p.server_ws.frames(MessageType.DATA, ours.conn_id)]
        assert sizes[before:] == [16 * KiB, 16 * KiB, 8 * KiB]
        assert await drain_n(theirs, len(big)) == big


async def drain_n(stream: TunnelStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += await stream.receive_some(n - len(out))
    return bytes(out)


# --- revdial extension v1 through the driver ------------------------------------------


async def test_half_close_both_ways_retires_the_id_without_error_frames(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_pair(extensions=1) as p:
        ours, theirs = await p.open()
        await ours.wait_dialed()  # the agent's dial_succeeded() confirmed it
        assert p.client_ws.count(ExtType.CONNECT_OK, theirs.conn_id) == 1
        await ours.send_all(b"request")
        await ours.send_eof()
        assert await drain(theirs) == b"request"
        await theirs.send_all(b"response")  # the other direction still flows
        await theirs.send_eof()
        assert await drain(ours) == b"response"
        await wait_all_tasks_blocked()
        assert p.server.statistics() == ZERO
        assert p.client.statistics() == ZERO
        await ours.aclose()
        await theirs.aclose()
        await wait_all_tasks_blocked()
        assert p.server_ws.count(MessageType.ERROR) == 0
        assert p.client_ws.count(MessageType.ERROR) == 0


async def test_data_after_half_close_resets_the_stream(autojump_clock: trio.abc.Clock) -> None:
    async with open_raw_client(extensions=1) as (server, peer):
        stream = server.open_stream("tcp", "x:1")
        cid = (await peer.receive()).conn_id
        await peer.send(data_frame(cid, b"body"))
        await peer.send(half_close_frame(cid))
        await peer.send(data_frame(cid, b"more"))
        error = await peer.receive()
        assert (error.type, error.conn_id) == (MessageType.ERROR, cid)
        assert error.payload.startswith(b"revdial: ")
        with pytest.raises(revdial.StreamResetError) as info:
            await stream.receive_some()
        assert info.value.reason == error.payload.decode()
        assert server.statistics() == ZERO
        assert server.is_open


# --- bounded control-frame queue ----------------------------------------------------


async def test_peer_not_reading_while_provoking_pauses_ends_session(
    autojump_clock: trio.abc.Clock,
) -> None:
    limits = Limits(
        stream_low_water=1, stream_high_water=2, stream_max_buffer=1024, max_control_frames=8
    )
    n = limits.max_control_frames + 2
    async with open_raw_client(limits=limits) as (server, peer):
        streams = []
        for i in range(n):  # one at a time: queued Connects count as control frames too
            streams.append(server.open_stream("tcp", f"x:{i}"))
            assert (await peer.receive()).conn_id == streams[-1].conn_id
        peer.session_side.valve.clog()  # the server's writes no longer drain
        for stream in streams:  # each provokes one (urgent) Pause
            await peer.send(data_frame(stream.conn_id, b"xyz"))
        t = trio.current_time()
        with trio.fail_after(CLOSE_TIMEOUT + 1):
            await server.ended.wait()
        # The close handshake cannot be sent either: forced after close_timeout.
        assert trio.current_time() == t + CLOSE_TIMEOUT
        assert isinstance(server.end_reason, revdial.ProtocolError)
        assert "control frame" in str(server.end_reason)
        # Data already received stays readable, then the session loss.
        assert await streams[0].receive_some() == b"xyz"
        with pytest.raises(revdial.SessionLostError):
            await streams[0].receive_some()
        assert server.statistics() == ZERO


async def test_peer_not_reading_while_provoking_not_found_replies_ends_session(
    autojump_clock: trio.abc.Clock,
) -> None:
    limits = Limits(max_control_frames=8)
    async with open_raw_client(limits=limits) as (server, peer):
        peer.session_side.valve.clog()  # the server's writes no longer drain
        for i in range(100):
            await peer.send(data_frame(1000 + i, b"?"))
        await wait_all_tasks_blocked()
        queued = server.statistics().outbox_frames
        reason = server.end_reason
    assert queued <= limits.max_control_frames, f"{queued} replies queued"
    assert isinstance(reason, revdial.ProtocolError)
