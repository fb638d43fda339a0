"""The writer's small-frame lane: small Data of an otherwise idle stream skips
ahead of queued bulk Data, within a byte budget, and never reorders one
stream's frames (Connect, Data, EOF) on the wire.

Frames are recorded in the order the session's writer sends them
(``RecordingWS``); the server's transport is clogged so that a backlog forms.
Virtual time; the keepalive timeout is raised so that no session dies while
its transport is clogged.
"""

from __future__ import annotations

import dataclasses

import trio
import trio.testing

from revdial import TunnelStream
from revdial._frames import Frame, MessageType
from session_pairs import SMALL_LIMITS, Pair, open_pair

SMALL = dataclasses.replace(SMALL_LIMITS, ping_timeout=3600.0)
KiB = 1024


def wire(pair: Pair) -> list[Frame]:
    return [f for _, f in pair.server_ws.sent]


async def receive_exactly(stream: TunnelStream, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = await stream.receive_some()
        assert chunk, "stream ended early"
        got += chunk
    return got


async def backlog(pair: Pair, nursery: trio.Nursery, stream: TunnelStream, n: int) -> None:
    """Clog the server's transport and queue ``n`` bulk bytes on ``stream``."""
    pair.server_side.valve.clog()
    nursery.start_soon(stream.send_all, bytes(n))
    await trio.testing.wait_all_tasks_blocked()
    assert pair.server.statistics().outbox_bytes >= SMALL.outbox_bytes - SMALL.max_frame_size


async def test_small_frame_overtakes_queued_bulk(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair(limits=SMALL) as p, trio.open_nursery() as nursery:
        bulk, bulk_peer = await p.open("bulk:1")
        chat, chat_peer = await p.open("chat:1")
        await trio.testing.wait_all_tasks_blocked()
        await backlog(p, nursery, bulk, 1024 * KiB)
        await chat.send_all(b"keystroke")
        p.server_side.valve.unclog()
        assert await chat_peer.receive_some() == b"keystroke"
        assert len(await receive_exactly(bulk_peer, 1024 * KiB)) == 1024 * KiB
        data = [f.conn_id for f in wire(p) if f.type == MessageType.DATA]
        after = data[data.index(chat.conn_id) + 1 :]
        # Without the lane the keystroke would follow every queued bulk frame.
        assert after.count(bulk.conn_id) >= SMALL.outbox_bytes // SMALL.max_frame_size
        nursery.cancel_scope.cancel()


async def test_bulk_is_not_starved_by_small_frames(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair(limits=SMALL) as p, trio.open_nursery() as nursery:
        bulk, bulk_peer = await p.open("bulk:1")
        chatty = [await p.open(f"chat:{i}") for i in range(12)]
        await trio.testing.wait_all_tasks_blocked()
        await backlog(p, nursery, bulk, 256 * KiB)
        for ours, _ in chatty:
            await ours.send_all(bytes(SMALL.small_frame_bytes))
        p.server_side.valve.unclog()
        for _, peer in chatty:
            await receive_exactly(peer, SMALL.small_frame_bytes)
        await receive_exactly(bulk_peer, 256 * KiB)
        run = longest = 0
        for f in wire(p):
            if f.type != MessageType.DATA:
                continue
            if f.conn_id == bulk.conn_id:
                run = 0
            else:
                run += len(f.payload)
                longest = max(longest, run)
        assert 0 < longest <= SMALL.small_frame_budget
        nursery.cancel_scope.cancel()


async def test_close_right_after_a_small_write_keeps_data_before_eof(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_pair(limits=SMALL) as p, trio.open_nursery() as nursery:
        bulk, _ = await p.open("bulk:1")
        chat, chat_peer = await p.open("chat:1")
        await trio.testing.wait_all_tasks_blocked()
        await backlog(p, nursery, bulk, 1024 * KiB)
        await chat.send_all(b"last words")
        await chat.aclose()  # the Error frame must not overtake the Data
        p.server_side.valve.unclog()
        assert await receive_exactly(chat_peer, 10) == b"last words"
        assert await chat_peer.receive_some() == b""
        mine = [f.type for f in wire(p) if f.conn_id == chat.conn_id]
        assert mine[-2:] == [MessageType.DATA, MessageType.ERROR]
        nursery.cancel_scope.cancel()


async def test_early_data_never_overtakes_its_connect(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair(limits=SMALL) as p, trio.open_nursery() as nursery:
        bulk, _ = await p.open("bulk:1")
        await trio.testing.wait_all_tasks_blocked()
        await backlog(p, nursery, bulk, 1024 * KiB)
        fresh = p.server.open_stream("tcp", "fresh:1")  # Connect queued behind bulk
        # Small, but it must queue behind the Connect (and so wait for space).
        nursery.start_soon(fresh.send_all, b"hello")
        await trio.testing.wait_all_tasks_blocked()
        p.server_side.valve.unclog()
        peer = await p.accept()
        assert await peer.receive_some() == b"hello"
        mine = [f.type for f in wire(p) if f.conn_id == fresh.conn_id]
        assert mine[:2] == [MessageType.CONNECT, MessageType.DATA]
        nursery.cancel_scope.cancel()


async def test_many_small_writes_arrive_in_order_beside_bulk(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_pair(limits=SMALL) as p, trio.open_nursery() as nursery:
        bulk, bulk_peer = await p.open("bulk:1")
        chat, chat_peer = await p.open("chat:1")
        expected = b"".join(i.to_bytes(4, "big") * (1 + i % 1500) for i in range(300))

        async def chatter() -> None:
            for i in range(300):
                await chat.send_all(i.to_bytes(4, "big") * (1 + i % 1500))
            await chat.aclose()

        nursery.start_soon(bulk.send_all, bytes(2048 * KiB))
        nursery.start_soon(chatter)
        nursery.start_soon(receive_exactly, bulk_peer, 2048 * KiB)
        got = b""
        while chunk := await chat_peer.receive_some():
            got += chunk
        assert got == expected
        nursery.cancel_scope.cancel()
