"""Cumulative counters of sessions and dials (sans-I/O: plain integers).

Theory of operation
-------------------
Counting must cost next to nothing where bytes move, so the session driver
keeps plain ``int`` attributes and adds to them where frames are decoded or
taken by the writer (one integer add per frame, no lock, no lookup). Nothing
here knows about Prometheus: an exporter (``_metrics.py``) reads these
numbers when it is scraped.

A session's counters die with it, but a Prometheus counter must never go
down, so the server folds every ended session's :class:`SessionCounters`
into its own running total (``a + b``) and reports *ended + live*.

Dials are counted once, when their outcome is known, into one
:class:`DialStats` shared by every session of a server (a dial happens once
per stream, so a dict increment and a bisect are fine there). The result is
one of :data:`DIAL_RESULTS`; :func:`dial_result` maps the typed
:class:`~revdial.DialError` subclasses onto it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, fields

from ._errors import DialRefusedError, DialTimeoutError, NoSuchClientError

__all__ = [
    "DIAL_BUCKETS",
    "DIAL_RESULTS",
    "DialStats",
    "SessionCounters",
    "dial_result",
]

#: Every value of the ``result`` label of ``revdial_dials_total``:
#:
#: ``ok``         the agent connected (extension v1: it confirmed; a plain
#:                remotedialer agent: the first byte or an orderly close came back)
#: ``refused``    the agent's allow policy refused the target (DialRefusedError)
#: ``failed``     the agent could not connect (DialUnreachableError,
#:                DialConnectionRefusedError), or the session ended first
#:                (DialSessionLostError), or the stream was reset before any answer
#: ``timeout``    no answer within the connect timeout (DialTimeoutError)
#: ``no_client``  no session for that client key (NoSuchClientError)
#: ``cancelled``  the caller closed the stream or was cancelled before any outcome
DIAL_RESULTS = ("ok", "refused", "failed", "timeout", "no_client", "cancelled")

#: Upper bounds (seconds) of the dial latency histogram's buckets. The default
#: connect timeout (35 s) falls in the last finite bucket's overflow (+Inf).
DIAL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0)


def dial_result(exc: BaseException) -> str:
    """The ``result`` label for a dial that failed with ``exc``."""
    if isinstance(exc, NoSuchClientError):
        return "no_client"
    if isinstance(exc, DialRefusedError):
        return "refused"
    if isinstance(exc, DialTimeoutError):
        return "timeout"
    return "failed"


class DialStats:
    """Dial outcomes by result and a latency histogram, as plain numbers.

    ``record(result, seconds)`` counts one dial; ``seconds`` (from the
    Connect to the outcome) goes into the histogram unless it is ``None``
    (a dial that never reached an agent).
    """

    __slots__ = ("buckets", "count", "results", "sum")

    def __init__(self) -> None:
        self.results: dict[str, int] = dict.fromkeys(DIAL_RESULTS, 0)
        #: Non-cumulative: ``buckets[i]`` counts observations in
        #: ``(DIAL_BUCKETS[i-1], DIAL_BUCKETS[i]]``; the last one is ``+Inf``.
        self.buckets = [0] * (len(DIAL_BUCKETS) + 1)
        self.count = 0
        self.sum = 0.0

    def record(self, result: str, seconds: float | None) -> None:
        self.results[result] += 1
        if seconds is not None:
            seconds = max(0.0, seconds)
            self.buckets[bisect.bisect_left(DIAL_BUCKETS, seconds)] += 1
            self.count += 1
            self.sum += seconds

    def cumulative_buckets(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus wants them, ``+Inf`` last."""
        out: list[tuple[str, int]] = []
        total = 0
        for bound, n in zip((*map(repr, DIAL_BUCKETS), "+Inf"), self.buckets, strict=True):
            total += n
            out.append((bound, total))
        return out


@dataclass(frozen=True, slots=True)
class SessionCounters:
    """Cumulative figures of a session (or, summed, of a server).

    Bytes are tunnel payload bytes (the Data frames' contents): received as
    decoded, sent as the writer takes them for the WebSocket. Pauses are
    Pause frames, sent (we paused a peer's stream) and received. Resets are
    streams that ended with an error rather than an orderly close, by cause:
    ``peer`` (the peer sent an error for an established stream), ``local``
    (this side closed a stream with an error, e.g. a dial that timed out),
    ``overrun`` (the peer ignored Pause), ``protocol`` (e.g. Data after
    half-close) and ``sync`` (reaped by the peer's SyncConnections).
    """

    bytes_received: int = 0
    bytes_sent: int = 0
    pauses_sent: int = 0
    pauses_received: int = 0
    resets_peer: int = 0
    resets_local: int = 0
    resets_overrun: int = 0
    resets_protocol: int = 0
    resets_sync: int = 0

    def __add__(self, other: SessionCounters) -> SessionCounters:
        return SessionCounters(
            *(getattr(self, f.name) + getattr(other, f.name) for f in fields(self))
        )

    @property
    def resets(self) -> dict[str, int]:
        """Resets by cause (the ``cause`` label of ``revdial_stream_resets_total``)."""
        return {
            "peer": self.resets_peer,
            "local": self.resets_local,
            "overrun": self.resets_overrun,
            "protocol": self.resets_protocol,
            "sync": self.resets_sync,
        }
