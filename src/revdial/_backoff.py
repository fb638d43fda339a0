"""The agent's reconnect schedule (sans-I/O: no trio, no clock, no randomness of its own).

Theory of operation
-------------------
An agent whose session ends reconnects. Two things matter and pull apart:
a server that restarts (an upgrade, a crash) should find its agents back
within about a second of its return, and a fleet of agents whose server is
gone for a long time must not hammer it, nor all arrive in the same instant
when it returns.

So the wait before attempt *n* of a run of failures is drawn from
``[c/2, c)`` with ``c = min(maximum, initial * 2**n)`` ("equal jitter"):
quick first retries (``initial`` 0.25 s: 0.125-0.25 s, then 0.25-0.5 s,
0.5-1 s, ...), doubling up to ``maximum`` (30 s), and never less than half
of the ceiling, so one agent never waits much longer than its peers while a
fleet is still spread over half the interval.

A run of failures ends when a session was *up*: its WebSocket handshake
completed and it lasted at least ``stable_after`` (1 s). The next failure then
starts again from ``initial``, however short or long the session was: a
server that was restarted a few times in a row is reached again as quickly
the third time as the first. A session that dies within ``stable_after`` of
its handshake (a server accepting and dropping at once) counts as a failure,
so such a server is not reconnected to in a tight loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """Reconnect delays: capped exponential with equal jitter, reset by a stable session.

    ``random`` returns uniform floats in ``[0, 1)`` (the agent passes
    :func:`random.random`; tests pass their own).
    """

    random: Callable[[], float]
    initial: float = 0.25
    maximum: float = 30.0
    #: A session that stayed up this long ends a run of failures.
    stable_after: float = 1.0
    #: Failures in a row since the last stable session.
    failures: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("backoff needs 0 < initial <= maximum")

    def ceiling(self) -> float:
        """The upper bound of the next wait."""
        # 2**n overflows a float past ~1,000 failures: stop doubling at the cap.
        n = min(self.failures, 64)
        return min(self.maximum, self.initial * 2.0**n)

    def session_ended(self, lasted: float | None) -> float:
        """A session attempt ended; return how long to wait before the next one.

        ``lasted`` is how long the session was up after its handshake, or
        ``None`` if it never completed one (refused, unreachable, timed out).
        """
        if lasted is not None and lasted >= self.stable_after:
            self.failures = 0
        ceiling = self.ceiling()
        self.failures += 1
        return ceiling * (0.5 + 0.5 * self.random())
