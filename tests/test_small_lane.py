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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import receive_exactly
from revdial import TunnelStream
from revdial._frames import Frame, MessageType
from session_pairs import SMALL_LIMITS, Pair, open_pair

SMALL = dataclasses.replace(SMALL_LIMITS, ping_timeout=3600.0)
KiB = 1024


def wire(pair: Pair) -> list[Frame]:
    return [f for _, f in pair.server_ws.sent]


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


# --- generated: any mix of sizes and closes keeps every stream's bytes in order ---

STREAMS = 6
#: A budget of one small frame, so that bulk and small frames interleave a lot.
TIGHT = dataclasses.replace(SMALL, small_frame_budget=1)

writes = st.lists(
    st.tuples(
        st.integers(0, STREAMS - 1),  # stream
        st.sampled_from([1, 100, 4 * KiB - 1, 4 * KiB, 4 * KiB + 1, 16 * KiB, 40 * KiB]),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=writes, clog=st.booleans(), close=st.sets(st.integers(0, STREAMS - 1)))
def test_generated_writes_keep_each_stream_in_order(
    plan: list[tuple[int, int]], clog: bool, close: set[int]
) -> None:
    async def run() -> None:
        async with open_pair(limits=TIGHT) as p, trio.open_nursery() as nursery:
            pairs = [await p.open(f"s:{i}") for i in range(STREAMS)]
            expected = [bytearray() for _ in pairs]
            per_stream: list[list[bytes]] = [[] for _ in pairs]
            for k, (i, size) in enumerate(plan):
                chunk = bytes([k % 251]) * size
                per_stream[i].append(chunk)
                expected[i] += chunk

            async def writer(i: int) -> None:
                for chunk in per_stream[i]:
                    await pairs[i][0].send_all(chunk)
                if i in close:
                    await pairs[i][0].aclose()

            async def reader(i: int) -> None:
                got = await receive_exactly(pairs[i][1], len(expected[i])) if expected[i] else b""
                assert got == bytes(expected[i]), f"stream {i} reordered or lost bytes"
                if i in close:
                    assert await pairs[i][1].receive_some() == b""

            if clog:
                p.server_side.valve.clog()
            async with trio.open_nursery() as inner:
                for i in range(len(pairs)):
                    inner.start_soon(writer, i)
                    inner.start_soon(reader, i)
                await trio.testing.wait_all_tasks_blocked()
                p.server_side.valve.unclog()
            nursery.cancel_scope.cancel()

    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_lane_budget_cannot_reorder_a_streams_frames(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The writer serves the queue before a small frame when the budget is spent:
    the stream behind that small frame must not have a later frame queued."""
    tight = dataclasses.replace(SMALL, small_frame_budget=1)
    async with open_pair(limits=tight) as p, trio.open_nursery() as nursery:
        (busy, busy_peer), (other, other_peer), (mine, mine_peer) = [
            await p.open(f"s:{i}") for i in range(3)
        ]
        await trio.testing.wait_all_tasks_blocked()
        p.server_side.valve.clog()
        nursery.start_soon(busy.send_all, bytes(SMALL.max_frame_size))  # the writer blocks on it
        await trio.testing.wait_all_tasks_blocked()
        await other.send_all(b"o")  # small lane, first
        await mine.send_all(b"m")  # small lane, second

        async def more() -> None:
            await mine.send_all(b"M" * 20 * KiB)  # bulk, must not pass b"m"
            await mine.aclose()

        nursery.start_soon(more)
        await trio.testing.wait_all_tasks_blocked()
        p.server_side.valve.unclog()
        assert await receive_exactly(mine_peer, 1 + 20 * KiB) == b"m" + b"M" * 20 * KiB
        assert await mine_peer.receive_some() == b""
        assert await other_peer.receive_some() == b"o"
        await receive_exactly(busy_peer, SMALL.max_frame_size)
        nursery.cancel_scope.cancel()


async def test_lane_budget_cannot_put_an_eof_before_data(
    autojump_clock: trio.abc.Clock,
) -> None:
    tight = dataclasses.replace(SMALL, small_frame_budget=1)
    async with open_pair(limits=tight) as p, trio.open_nursery() as nursery:
        (busy, _), (other, _), (mine, mine_peer) = [await p.open(f"s:{i}") for i in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        p.server_side.valve.clog()
        nursery.start_soon(busy.send_all, bytes(SMALL.max_frame_size))
        await trio.testing.wait_all_tasks_blocked()
        await other.send_all(b"o")
        await mine.send_all(b"m")
        await mine.aclose()  # its Error is queued: it must follow b"m"
        p.server_side.valve.unclog()
        assert await mine_peer.receive_some() == b"m"
        assert await mine_peer.receive_some() == b""
        nursery.cancel_scope.cancel()
