"""A server that floods the agent with Connects: the session stays up, memory
stays bounded, and every Connect gets a clear answer.

The agent's real Connect handler (``make_connect_handler``) serves an
in-memory session pair; virtual time, so a 30 s dial timeout takes none.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import trio
import trio.testing

import revdial
from revdial._limits import DEFAULT_LIMITS
from session_pairs import open_pair

LIMITS = dataclasses.replace(DEFAULT_LIMITS, max_pending_dials=8, ping_timeout=3600.0)


async def blackhole(proto: str, address: str) -> trio.abc.Stream:
    """A target that never answers: the dial waits until its timeout."""
    await trio.sleep_forever()
    raise AssertionError("unreachable")


async def test_denied_flood_is_refused_one_by_one(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="revdial")
    handler = revdial.make_connect_handler(allow=["127.0.0.1:22"], limits=LIMITS)
    async with open_pair(limits=LIMITS, extensions=1, on_connect=handler) as p:
        # 10,000 Connects sent back to back, then every answer collected.
        streams = [p.server.open_stream("tcp", f"10.0.0.1:{i % 1000 + 1}")
                   for i in range(10_000)]
        refused = 0
        for stream in streams:
            with pytest.raises(revdial.DialRefusedError):
                await p.server.dial(stream, connect_timeout=5)
            refused += 1
        assert refused == 10_000
        assert p.server.is_open
        assert p.client.is_open
        await trio.testing.wait_all_tasks_blocked()
        # Nothing is left behind: no stream, no handler task, no buffered byte.
        assert p.server.statistics().streams == 0
        assert p.client.statistics().streams == 0
        assert p.client.statistics().buffered_bytes == 0
    # The refusals were logged, but not 10,000 times (at most one line a second).
    lines = [r.getMessage() for r in caplog.records if "refused dial" in r.getMessage()]
    assert 1 <= len(lines) < 100, len(lines)


async def test_blackholed_flood_is_bounded_by_max_pending_dials(
    autojump_clock: trio.abc.Clock,
) -> None:
    handler = revdial.make_connect_handler(
        allow=["192.0.2.1:443"], dialer=blackhole, limits=LIMITS
    )
    async with open_pair(limits=LIMITS, extensions=1, on_connect=handler) as p, \
            trio.open_nursery() as nursery:
        outcomes: list[str] = []

        async def dial() -> None:
            stream = p.server.open_stream("tcp", "192.0.2.1:443")
            try:
                await p.server.dial(stream, connect_timeout=0)
            except revdial.DialRefusedError as exc:
                outcomes.append(f"refused: {exc.reason}")
            except revdial.DialTimeoutError:
                outcomes.append("timeout")

        t0 = trio.current_time()
        for _ in range(10_000):
            nursery.start_soon(dial)
        await trio.testing.wait_all_tasks_blocked()
        # Only max_pending_dials dials wait on the target; the rest are refused at once.
        assert trio.current_time() == t0
        assert p.client.statistics().streams == LIMITS.max_pending_dials
        assert len(outcomes) == 10_000 - LIMITS.max_pending_dials
        assert set(outcomes) == {
            f"refused: revdial: too many dials in progress ({LIMITS.max_pending_dials})"
        }
        # The session is up and holds nothing for the refused ones.
        assert p.server.is_open
        assert p.client.is_open
        assert p.server.statistics().streams == LIMITS.max_pending_dials
        # At the dial timeout the waiting ones fail, freeing the slots for new dials.
        await trio.sleep(LIMITS.dial_timeout + 1)
        assert outcomes.count("timeout") == LIMITS.max_pending_dials
        assert p.client.statistics().streams == 0
        nursery.start_soon(dial)
        await trio.testing.wait_all_tasks_blocked()
        assert p.client.statistics().streams == 1  # accepted again: waiting on the target
        nursery.cancel_scope.cancel()
