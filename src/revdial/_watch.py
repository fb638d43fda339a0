"""One task that watches the dead-peer deadlines of a server's sessions.

A session's reader holds its keepalive deadline in a cancel scope of its own
(see ``Session.run``): a cancel scope and its cancel status are ~0.75 KiB,
per session. A server runs one :class:`KeepaliveWatch` instead: a heap of
``[deadline, seq, session]`` entries and one task that sleeps until the
earliest. At a deadline it does exactly what the reader's scope would have
done at the same instant (``Session._keepalive_due``): end a session that
received nothing for ``ping_timeout`` (the same log line and error), or
retire its idle writer and re-arm at ``last_receive + ping_timeout``. Entries
are re-armed in place; a session that ends clears its entry's session, and
the entry leaves the heap at its deadline.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from ._session import Session

__all__ = ["KeepaliveWatch", "WatchEntry"]

#: ``[deadline, seq, session or None]`` (a list: re-armed and cleared in place).
WatchEntry = list[Any]


class KeepaliveWatch:
    """The keepalive deadlines of many sessions, in one task (:meth:`run`)."""

    __slots__ = ("_heap", "_seq", "_sleep", "running")

    def __init__(self) -> None:
        self._heap: list[WatchEntry] = []
        self._seq = itertools.count()
        self._sleep: trio.CancelScope | None = None
        #: True while :meth:`run` is running: only then may sessions rely on it.
        self.running = False

    def __len__(self) -> int:
        """Entries in the heap (those of ended sessions included, until due)."""
        return len(self._heap)

    def watch(self, session: Session, deadline: float) -> WatchEntry:
        """Call ``session._keepalive_due(now)`` at ``deadline`` (and then at
        each deadline it returns); clear ``entry[2]`` to stop."""
        entry: WatchEntry = [deadline, next(self._seq), session]
        heapq.heappush(self._heap, entry)
        sleep = self._sleep
        if sleep is not None and deadline < sleep.deadline:
            sleep.deadline = deadline
        return entry

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch until cancelled (with the server)."""
        heap = self._heap
        self.running = True
        try:
            task_status.started()
            while True:
                with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as sleep:
                    self._sleep = sleep
                    await trio.sleep_forever()
                self._sleep = None
                now = trio.current_time()
                while heap and heap[0][0] <= now:
                    entry = heap[0]
                    session = entry[2]
                    deadline = session._keepalive_due(now) if session is not None else None
                    if deadline is None:
                        heapq.heappop(heap)
                        entry[2] = None
                    else:
                        entry[0] = deadline
                        entry[1] = next(self._seq)
                        heapq.heapreplace(heap, entry)
        finally:
            self.running = False
            self._sleep = None
