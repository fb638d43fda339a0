"""``TunnelStream`` against trio's generic stream checks.

``trio.testing.check_two_way_stream`` (plain remotedialer, extension 0: no
half-close on the wire) and ``check_half_closeable_stream`` (revdial
extension v1) run over a real session pair on memory streams, in virtual
time. The stream pair is (server-side stream, agent-side stream), and trio
also runs every check flipped. The *clogged* maker pauses both directions
(each side sends just over ``stream_high_water`` that the other does not
read), so ``send_all`` and ``wait_send_all_might_not_block`` block until the
other side reads -- exactly trio's definition.

The minimal tests at the end pin down three contract points that trio's
checks caught in an earlier version (``receive_some(1.5)`` must raise
``TypeError``; ``wait_send_all_might_not_block`` must raise
``ClosedResourceError`` after ``aclose()`` and take the send side, so a
concurrent sender gets ``BusyResourceError``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

import revdial
from revdial import TunnelStream
from revdial._frames import MessageType
from session_pairs import SMALL_LIMITS, Pair, open_pair

LIMITS = SMALL_LIMITS
#: Virtual seconds any one check may take; a hang becomes TooSlowError.
CHECK_TIMEOUT = 600

StreamPair = tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]
Maker = Callable[[], Awaitable[StreamPair]]
wait_all_tasks_blocked = trio.testing.wait_all_tasks_blocked


async def exchange(pair: Pair) -> tuple[TunnelStream, TunnelStream]:
    ours, theirs = await pair.open()
    return ours, theirs


def makers(pair: Pair) -> tuple[Maker, Maker]:
    """``(stream_maker, clogged_stream_maker)`` for trio's checks."""

    async def stream_maker() -> StreamPair:
        ours, theirs = await pair.open()
        return ours, theirs

    async def clogged_stream_maker() -> StreamPair:
        ours, theirs = await pair.open()
        await clog_both_ways(pair, ours, theirs)
        return ours, theirs

    return stream_maker, clogged_stream_maker


async def clog_both_ways(pair: Pair, ours: TunnelStream, theirs: TunnelStream) -> None:
    """Each side sends just over the high-water mark; both get paused."""
    fill = bytes(LIMITS.stream_high_water + 1)
    await ours.send_all(fill)
    await theirs.send_all(fill)
    await wait_all_tasks_blocked()
    # Both sessions paused the other side (checked on the wire, not inside).
    assert pair.client_ws.count(MessageType.PAUSE, theirs.conn_id) == 1
    assert pair.server_ws.count(MessageType.PAUSE, ours.conn_id) == 1


@asynccontextmanager
async def conformance_pair(extensions: int) -> AsyncIterator[Pair]:
    async with open_pair(limits=LIMITS, extensions=extensions) as pair:
        yield pair
        # Every stream the checks made was closed: the tables are empty again.
        await wait_all_tasks_blocked()
        for session in (pair.server, pair.client):
            stats = session.statistics()
            assert (stats.streams, stats.buffered_bytes, stats.outbox_bytes) == (0, 0, 0)


# --- the generic checks -------------------------------------------------------------


async def test_two_way_stream_plain_remotedialer(autojump_clock: trio.abc.Clock) -> None:
    async with conformance_pair(extensions=0) as pair:
        stream_maker, clogged_maker = makers(pair)
        with trio.fail_after(CHECK_TIMEOUT):
            await trio.testing.check_two_way_stream(stream_maker, clogged_maker)
        # The checks did run (pytest-trio issue 110): dozens of streams went by.
        assert pair.server_ws.count(MessageType.CONNECT) > 20


async def test_half_closeable_stream_with_extension(autojump_clock: trio.abc.Clock) -> None:
    async with conformance_pair(extensions=1) as pair:
        stream_maker, clogged_maker = makers(pair)
        with trio.fail_after(CHECK_TIMEOUT):
            await trio.testing.check_half_closeable_stream(stream_maker, clogged_maker)
        assert pair.server_ws.count(MessageType.CONNECT) > 20


# --- the contract points trio's checks caught once ---------------------------------


async def test_receive_some_rejects_non_integer_max_bytes(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair() as pair:
        ours, _ = await pair.open()
        with trio.move_on_after(1) as scope, pytest.raises(TypeError):
            await ours.receive_some(1.5)  # type: ignore[arg-type]
        assert not scope.cancelled_caught, "receive_some(1.5) blocked"


@pytest.mark.parametrize("when", ["before", "while waiting"])
async def test_wait_send_all_might_not_block_after_close_raises_closed(
    autojump_clock: trio.abc.Clock, when: str
) -> None:
    async with open_pair(limits=LIMITS) as pair:
        ours, theirs = await pair.open()
        await clog_both_ways(pair, ours, theirs)
        if when == "before":
            await ours.aclose()
            with pytest.raises(trio.ClosedResourceError):
                await ours.wait_send_all_might_not_block()
        else:
            async with trio.open_nursery() as nursery:

                async def close_soon() -> None:
                    await wait_all_tasks_blocked()
                    await ours.aclose()

                nursery.start_soon(close_soon)
                with pytest.raises(trio.ClosedResourceError):
                    await ours.wait_send_all_might_not_block()


@pytest.mark.parametrize("other", ["wait", "send_all", "send_eof"])
async def test_wait_send_all_might_not_block_is_exclusive(
    autojump_clock: trio.abc.Clock, other: str
) -> None:
    async with open_pair(limits=LIMITS, extensions=1) as pair:
        ours, theirs = await pair.open()
        await clog_both_ways(pair, ours, theirs)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ours.wait_send_all_might_not_block)
            await wait_all_tasks_blocked()
            operations: dict[str, Callable[[], Awaitable[None]]] = {
                "wait": ours.wait_send_all_might_not_block,
                "send_all": partial(ours.send_all, b"x"),
                "send_eof": ours.send_eof,
            }
            operation = operations[other]
            with trio.move_on_after(1) as scope, pytest.raises(trio.BusyResourceError):
                await operation()
            nursery.cancel_scope.cancel()
        assert not scope.cancelled_caught, f"{other} blocked instead of raising Busy"


# --- documented differences -----------------------------------------------------------


async def test_plain_remotedialer_cannot_half_close(autojump_clock: trio.abc.Clock) -> None:
    async with open_pair(extensions=0) as pair:
        ours, theirs = await pair.open()
        assert not ours.supports_half_close
        with pytest.raises(revdial.HalfCloseUnsupportedError):
            await ours.send_eof()
        # The stream is untouched by the refusal.
        await ours.send_all(b"still open")
        assert await theirs.receive_some() == b"still open"


async def test_peer_failure_is_a_tunnel_error_not_broken(autojump_clock: trio.abc.Clock) -> None:
    """trio says BrokenResourceError for a peer-broken stream; revdial raises its
    own TunnelError subclasses (documented in TunnelStream), except for the
    orderly close, where send_all raises BrokenResourceError as trio's checks
    expect."""
    async with open_pair() as pair:
        ours, theirs = await pair.open()
        await theirs.send_all(b"x")
        assert await ours.receive_some() == b"x"
        theirs.close_nowait("boom")
        await wait_all_tasks_blocked()
        with pytest.raises(revdial.StreamResetError) as info:
            await ours.send_all(b"y")
        assert not isinstance(info.value, trio.BrokenResourceError)
        assert ours.peer_closed
