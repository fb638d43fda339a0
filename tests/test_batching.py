"""The session writer gathers ready small frames into one transport write.

``_BatchSender`` serializes several frames with trio-websocket's wsproto
object and writes them together under its write lock (private attributes of
trio-websocket 0.12). These tests pin that it is active with the installed
release (an upgrade that changes the internals fails here, loudly, instead of
silently slowing down), that ready small frames really share writes, that
bulk frames are never copied into a batch, and that nothing is lost or
reordered. Virtual time, memory streams.
"""

from __future__ import annotations

import dataclasses

import trio
import trio.testing
import trio_websocket

from conftest import receive_exactly
from revdial import Limits
from revdial._session import BATCH_TESTED_VERSIONS, _BatchSender
from session_pairs import open_pair

KiB = 1024
LIMITS = Limits(
    max_frame_size=32 * KiB,
    read_size=32 * KiB,
    small_frame_bytes=4 * KiB,
    small_frame_budget=16 * KiB,
    ping_timeout=3600.0,
)
#: A WebSocket frame header plus the revdial header of a Data frame, at most.
OVERHEAD = 14 + 32


async def test_batching_is_active_with_the_installed_trio_websocket(
    autojump_clock: trio.abc.Clock,
) -> None:
    version = trio_websocket.__version__
    assert version.startswith(BATCH_TESTED_VERSIONS), (
        f"trio-websocket {version} is not a release _BatchSender was tested with: check "
        "WebSocketConnection._send and _abort_web_socket, then extend BATCH_TESTED_VERSIONS"
    )
    async with open_pair(limits=LIMITS, record=False) as p:
        assert _BatchSender.supported(p.server.ws)
        assert _BatchSender.supported(p.client.ws)
        # A wrapper (such as the tests' RecordingWS) keeps one send_message per frame.
        assert not _BatchSender.supported(p.server_ws)


async def test_ready_small_frames_share_one_write(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair(limits=LIMITS, record=False) as p:
        pairs = [await p.open(f"chat:{i}") for i in range(8)]
        await trio.testing.wait_all_tasks_blocked()
        valve = p.server_side.valve
        valve.clog()
        for i, (ours, _) in enumerate(pairs):
            await ours.send_all(b"message %d" % i)
        await trio.testing.wait_all_tasks_blocked()
        before = len(valve.writes)
        valve.unclog()
        for i, (_, peer) in enumerate(pairs):
            assert await receive_exactly(peer, len(b"message %d" % i)) == b"message %d" % i
        # The writer was blocked on the first frame; the other seven were
        # waiting together and went out in one write.
        assert len(valve.writes) - before <= 2, valve.writes[before:]


async def test_bulk_frames_are_written_alone(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair(limits=LIMITS, record=False) as p, trio.open_nursery() as nursery:
        bulk, bulk_peer = await p.open("bulk:1")
        chats = [await p.open(f"chat:{i}") for i in range(20)]
        await trio.testing.wait_all_tasks_blocked()
        valve = p.server_side.valve
        valve.clog()
        payload = bytes(range(256)) * (4 * LIMITS.max_frame_size // 256)
        nursery.start_soon(bulk.send_all, payload)
        for ours, _ in chats:
            await ours.send_all(bytes(LIMITS.small_frame_bytes))
        await trio.testing.wait_all_tasks_blocked()
        before = len(valve.writes)
        valve.unclog()
        assert await receive_exactly(bulk_peer, len(payload)) == payload
        for _, peer in chats:
            assert await receive_exactly(peer, LIMITS.small_frame_bytes) == bytes(
                LIMITS.small_frame_bytes
            )
        writes = valve.writes[before:]
        # A full-size frame is one write of its own; a batch of small frames
        # stops at the budget (plus the frame that crossed it).
        batch_bound = LIMITS.small_frame_budget + LIMITS.small_frame_bytes + 8 * OVERHEAD
        full = [w for w in writes if w > batch_bound]
        assert full, writes
        assert all(w <= LIMITS.max_frame_size + OVERHEAD for w in full), writes
        assert len(full) >= 3  # the first bulk frame may have gone out before the clog
        # Small frames did share writes: fewer writes than frames.
        assert len(writes) < len(chats) + len(full), writes
        nursery.cancel_scope.cancel()


async def test_many_streams_keep_their_bytes_in_order(autojump_clock: trio.abc.Clock) -> None:
    """Mixed sizes from many streams at once: every stream's bytes arrive whole, in order."""
    limits = dataclasses.replace(LIMITS, outbox_bytes=64 * KiB)
    async with open_pair(limits=limits, record=False) as p, trio.open_nursery() as nursery:
        pairs = [await p.open(f"s:{i}") for i in range(12)]
        expected = {}
        for i, (ours, _) in enumerate(pairs):
            chunks = [bytes([i]) * ((i * 977 + k * 1531) % (3 * limits.small_frame_bytes) + 1)
                      for k in range(20)]
            expected[i] = b"".join(chunks)

            async def send(stream: object = ours, chunks: list[bytes] = chunks) -> None:
                for chunk in chunks:
                    await stream.send_all(chunk)  # type: ignore[attr-defined]

            nursery.start_soon(send)
        for i, (_, peer) in enumerate(pairs):
            assert await receive_exactly(peer, len(expected[i])) == expected[i]
        nursery.cancel_scope.cancel()
