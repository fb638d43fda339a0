"""A burst of dials waits for slots instead of meeting the agent's refusal.

A revdial agent refuses Connects beyond ``max_pending_dials`` (a defence
against a flood of dials to a blackhole). A server dialling through a revdial
agent keeps at most ``max_dials_in_flight`` of a session's dials without an
outcome and queues the rest, in order, within the connect timeout; so a
burst of connections through ``--forward`` or the front door is paced, never
refused. In-memory session pairs, virtual time.
"""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing

import revdial
from revdial._limits import DEFAULT_LIMITS
from session_pairs import open_pair

LIMITS = dataclasses.replace(
    DEFAULT_LIMITS, max_pending_dials=4, max_dials_in_flight=4, ping_timeout=3600.0
)


class SlowTargets:
    """Targets whose connect completes only when the test releases it, and
    the agent's real Connect handler dialling them."""

    def __init__(self) -> None:
        self.waiting = 0
        self.most_waiting = 0
        self.release = trio.Event()
        self.handler = revdial.make_connect_handler(
            allow=["192.0.2.1:443"], dialer=self.dial, limits=LIMITS
        )

    async def dial(self, proto: str, address: str) -> trio.abc.Stream:
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            await self.release.wait()
        finally:
            self.waiting -= 1
        ours, _theirs = trio.testing.memory_stream_pair()
        return ours


@pytest.fixture
def targets() -> SlowTargets:
    return SlowTargets()


async def test_a_burst_is_paced_not_refused(
    autojump_clock: trio.abc.Clock, targets: SlowTargets
) -> None:
    async with open_pair(limits=LIMITS, extensions=1, on_connect=targets.handler) as p:
        dialled: list[int] = []
        async with trio.open_nursery() as nursery:

            async def dial(i: int) -> None:
                stream = await p.server.open_dial("tcp", "192.0.2.1:443", 30)
                await p.server.dial(stream, connect_timeout=30)
                dialled.append(i)
                await stream.aclose()

            for i in range(40):
                nursery.start_soon(dial, i)
            await trio.testing.wait_all_tasks_blocked()
            # Only max_dials_in_flight Connects went out; the rest wait here.
            assert targets.waiting == 4
            assert p.server.statistics().streams == 4
            targets.release.set()
        assert sorted(dialled) == list(range(40))
        assert targets.most_waiting == 4  # none refused: dial() would have raised


async def test_waiting_dials_keep_their_order(
    autojump_clock: trio.abc.Clock, targets: SlowTargets
) -> None:
    async with open_pair(limits=LIMITS, extensions=1, on_connect=targets.handler) as p:
        order: list[int] = []
        async with trio.open_nursery() as nursery:

            async def dial(i: int) -> None:
                stream = await p.server.open_dial("tcp", "192.0.2.1:443", 30)
                order.append(i)
                await p.server.dial(stream, connect_timeout=30)
                await stream.aclose()

            for i in range(12):
                nursery.start_soon(dial, i)
                await trio.testing.wait_all_tasks_blocked()
            targets.release.set()
        assert order == list(range(12))


async def test_a_waiting_dial_times_out_with_a_typed_error(
    autojump_clock: trio.abc.Clock, targets: SlowTargets
) -> None:
    async with open_pair(limits=LIMITS, extensions=1, on_connect=targets.handler) as p, \
            trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(lambda: p.server.open_dial("tcp", "192.0.2.1:443", 30))
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        with pytest.raises(revdial.DialTimeoutError, match="4 dials in flight"):
            await p.server.open_dial("tcp", "192.0.2.1:443", 5)
        assert trio.current_time() - t0 == pytest.approx(5)
        targets.release.set()
        nursery.cancel_scope.cancel()


async def test_waiting_dials_fail_when_the_session_ends(
    autojump_clock: trio.abc.Clock, targets: SlowTargets
) -> None:
    async with open_pair(limits=LIMITS, extensions=1, on_connect=targets.handler) as p:
        errors: list[BaseException] = []
        async with trio.open_nursery() as nursery:

            async def dial() -> None:
                try:
                    stream = await p.server.open_dial("tcp", "192.0.2.1:443", 30)
                    await p.server.dial(stream, connect_timeout=30)
                except revdial.DialError as exc:
                    errors.append(exc)

            for _ in range(10):
                nursery.start_soon(dial)
            await trio.testing.wait_all_tasks_blocked()
            await p.server.ws.aclose()  # the session ends with 4 dials out, 6 waiting
        assert len(errors) == 10
        assert all(isinstance(e, revdial.DialSessionLostError) for e in errors)
        assert p.server.statistics().streams == 0


async def test_a_plain_remotedialer_agent_is_not_paced(autojump_clock: trio.abc.Clock) -> None:
    """Go agents have no pending-dial limit: nothing waits on their sessions."""
    async with open_pair(limits=LIMITS, extensions=0) as p:
        streams = [await p.server.open_dial("tcp", "192.0.2.1:443", 30) for _ in range(20)]
        assert p.server.statistics().streams == 20
        for stream in streams:
            stream.close_nowait()


async def test_a_cancelled_waiter_passes_its_turn_on(
    autojump_clock: trio.abc.Clock, targets: SlowTargets
) -> None:
    async with open_pair(limits=LIMITS, extensions=1, on_connect=targets.handler) as p:
        first = [await p.server.open_dial("tcp", "192.0.2.1:443", 30) for _ in range(4)]
        got: list[revdial.TunnelStream] = []
        async with trio.open_nursery() as nursery:
            cancelled = trio.CancelScope()

            async def waiter_a() -> None:
                with cancelled:
                    await p.server.open_dial("tcp", "192.0.2.1:443", 30)

            async def waiter_b() -> None:
                got.append(await p.server.open_dial("tcp", "192.0.2.1:443", 30))

            nursery.start_soon(waiter_a)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter_b)
            await trio.testing.wait_all_tasks_blocked()
            first[0].close_nowait()  # one slot frees: A's turn...
            cancelled.cancel()  # ...but A gives up before it runs: B goes
        assert len(got) == 1
        for stream in [*first, *got]:
            stream.close_nowait()
        targets.release.set()
