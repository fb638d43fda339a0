"""The agent's reconnect schedule: quick after a lost session, backing off only
while failures repeat, jittered within bounds.

``Backoff`` is pure (driven directly, and by hypothesis); the last tests run
the real ``Agent.run`` loop under ``MockClock`` with its session attempts
scripted, so every wait is checked to the exact virtual instant.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import revdial
from revdial._backoff import Backoff


def fixed(value: float) -> Callable[[], float]:
    return lambda: value


def test_first_retries_are_quick_then_double_to_the_cap() -> None:
    backoff = Backoff(fixed(0.999999), initial=0.25, maximum=30.0)
    ceilings = [round(backoff.session_ended(None), 3) for _ in range(10)]
    assert ceilings == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_a_stable_session_resets_the_schedule() -> None:
    backoff = Backoff(fixed(0.0), initial=0.25, maximum=30.0)
    for _ in range(6):
        backoff.session_ended(None)  # the server is down: 0.125 ... 4 s
    assert backoff.ceiling() == 16.0
    # Up for 3 s (a restart 5 s after the last): the next retry is quick again.
    assert backoff.session_ended(3.0) == 0.125
    assert backoff.session_ended(None) == 0.25


def test_a_session_dropped_at_once_counts_as_a_failure() -> None:
    backoff = Backoff(fixed(0.0), initial=0.25, maximum=30.0, stable_after=1.0)
    waits = [backoff.session_ended(0.01) for _ in range(5)]  # accepted, then dropped
    assert waits == [0.125, 0.25, 0.5, 1.0, 2.0]


def test_the_ceiling_survives_endless_failures() -> None:
    backoff = Backoff(fixed(0.5), initial=0.25, maximum=30.0)
    for _ in range(5000):
        wait = backoff.session_ended(None)
    assert wait == 22.5


@given(
    draws=st.lists(st.floats(min_value=0.0, max_value=1.0, exclude_max=True), min_size=1,
                   max_size=60),
    lasted=st.lists(st.one_of(st.none(), st.floats(min_value=0.0, max_value=100.0)),
                    min_size=60, max_size=60),
    initial=st.floats(min_value=0.01, max_value=5.0),
)
def test_waits_stay_within_half_and_all_of_the_ceiling(
    draws: list[float], lasted: list[float | None], initial: float
) -> None:
    values = iter(draws)
    backoff = Backoff(lambda: next(values), initial=initial, maximum=30.0)
    for up in lasted[: len(draws)]:
        stable = up is not None and up >= backoff.stable_after
        ceiling = initial if stable else backoff.ceiling()
        wait = backoff.session_ended(up)
        assert ceiling / 2 <= wait <= ceiling
        assert wait <= 30.0
        if stable:
            assert wait <= initial


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="0 < initial <= maximum"):
        Backoff(fixed(0.0), initial=0.0)
    with pytest.raises(ValueError, match="0 < initial <= maximum"):
        revdial.Agent("ws://127.0.0.1:1/connect", backoff_initial=10.0, backoff_max=1.0)


# --- the real Agent.run loop, sessions scripted --------------------------------------


class Script:
    """Stands in for ``Agent._run_session``: each attempt follows the next step.

    A step is ``None`` (the server is unreachable: OSError at once) or a number
    of seconds the session stays up before it is lost.
    """

    def __init__(self, steps: Iterator[float | None]) -> None:
        self.steps = steps
        self.attempts: list[float] = []
        self.done = trio.Event()

    async def __call__(self, on_up: Callable[[], None]) -> None:
        self.attempts.append(trio.current_time())
        step = next(self.steps, "end")
        if step == "end":
            self.done.set()
            await trio.sleep_forever()
        if step is None:
            raise OSError("connection refused")
        on_up()
        await trio.sleep(float(step))
        raise revdial.SessionLostError("session ended: peer went away")


async def run_script(steps: list[float | None], monkeypatch: pytest.MonkeyPatch) -> list[float]:
    agent = revdial.Agent("ws://127.0.0.1:1/connect")
    script = Script(iter(steps))
    monkeypatch.setattr(agent, "_run_session", script)
    monkeypatch.setattr("revdial._agent.random.random", lambda: 0.999999)  # the ceiling
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await script.done.wait()
        nursery.cancel_scope.cancel()
    start = script.attempts[0]
    return [round(t - start, 3) for t in script.attempts]


async def test_restarts_in_a_row_are_each_followed_by_a_quick_reconnect(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three rounds: up 3 s, server down for 2 s (refused meanwhile), back.
    steps: list[float | None] = []
    for _ in range(3):
        steps += [3.0, None, None, None, None]
    times = await run_script([*steps, 3.0], monkeypatch)
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(times)]
    # After each lost session: 0.25 s, then 0.5, 1, 2 while refused; never more,
    # however many rounds came before (the old schedule doubled across rounds).
    assert gaps == [3.25, 0.5, 1.0, 2.0, 4.0] * 3 + [3.25]


async def test_an_unreachable_server_is_retried_ever_more_slowly(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    times = await run_script([None] * 10, monkeypatch)
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(times)]
    assert gaps == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
