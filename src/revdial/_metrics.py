"""Prometheus metrics and the ``/clients`` report of a :class:`~revdial.Server`.

Nothing here runs on a hot path: the session driver keeps plain integers
(:mod:`revdial._stats`) and :class:`ServerCollector` turns them into metric
families when ``/metrics`` is scraped, in one pass over the sessions table.
Each :class:`~revdial.Monitor` has its own ``CollectorRegistry`` (never
prometheus-client's global one), so several servers in one process, and the
tests, never collide.

Metrics (every label has a fixed, small set of values except ``client``)::

    revdial_sessions                       gauge    sessions connected now
    revdial_clients                        gauge    distinct client keys connected now
    revdial_client_sessions{client}        gauge    sessions of one client key (bounded, below)
    revdial_client_series_omitted          gauge    connected client keys without a series
    revdial_sessions_accepted_total        counter  sessions accepted
    revdial_handshakes_rejected_total{status}  counter  upgrades refused: 400, 401, 404, 409
                                                    (a peer link to itself), 503
    revdial_streams                        gauge    streams open now (peer links included)
    revdial_dials_total{result}            counter  ok, refused, failed, timeout, no_client,
                                                    cancelled (see revdial._stats.DIAL_RESULTS)
    revdial_dial_seconds                   histogram  Connect to outcome, every dial that
                                                    reached an agent
    revdial_bytes_received_total           counter  tunnel payload bytes from agents
    revdial_bytes_sent_total               counter  tunnel payload bytes to agents
    revdial_buffered_bytes                 gauge    received bytes not yet read by the application
    revdial_pauses_total{direction}        counter  Pause frames: sent, received
    revdial_stream_resets_total{cause}     counter  peer, local, overrun, protocol, sync
    revdial_peers                          gauge    peers registered (--peer, --peers-dns)
    revdial_peer_links{direction}          gauge    peer WebSockets up: out (ours), in (theirs)
    revdial_peer_announced_clients         gauge    (client, session) pairs peers announced
    revdial_peer_announcements_dropped_total  counter  AddClient beyond the per-peer bound

Cardinality: no label ever holds an address or a target. ``client`` holds a
client key, and only for the first ``max_client_series`` keys in connection
order (default :data:`DEFAULT_CLIENT_SERIES`; 0 turns the per-client series
off); the keys beyond it are counted in ``revdial_client_series_omitted``,
and every total above still includes them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import trio
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._server import Server

__all__ = ["DEFAULT_CLIENT_SERIES", "ServerCollector", "client_report", "peer_report"]

#: Per-client ``revdial_client_sessions`` series at most (the first keys connected).
DEFAULT_CLIENT_SERIES = 50


class ServerCollector(Collector):
    """A prometheus-client collector reading a :class:`~revdial.Server` at scrape time."""

    def __init__(self, server: Server, *, max_client_series: int = DEFAULT_CLIENT_SERIES) -> None:
        if max_client_series < 0:
            raise ValueError("max_client_series must be >= 0")
        self.server = server
        self.max_client_series = max_client_series

    def collect(self) -> Iterable[Metric]:
        server = self.server
        stats = server.statistics()
        counters = server.counters()
        traffic = counters.sessions
        dials = server.dial_stats

        yield GaugeMetricFamily("revdial_sessions", "Agent sessions connected now.",
                                value=stats.sessions)
        yield GaugeMetricFamily("revdial_clients", "Distinct client keys connected now.",
                                value=stats.clients)
        per_client = GaugeMetricFamily(
            "revdial_client_sessions",
            f"Sessions of each client key (the first {self.max_client_series} keys "
            "connected; see revdial_client_series_omitted).",
            labels=["client"],
        )
        keys = server.clients()
        for key in keys[: self.max_client_series]:
            per_client.add_metric([key], len(server.sessions(key)))
        yield per_client
        yield GaugeMetricFamily(
            "revdial_client_series_omitted",
            "Connected client keys beyond the per-client series bound.",
            value=max(0, len(keys) - self.max_client_series),
        )
        yield CounterMetricFamily("revdial_sessions_accepted", "Agent sessions accepted.",
                                  value=counters.sessions_accepted)
        rejected = CounterMetricFamily(
            "revdial_handshakes_rejected", "WebSocket upgrades refused, by HTTP status.",
            labels=["status"],
        )
        for status in (400, 401, 404, 409, 503):
            rejected.add_metric([str(status)], counters.handshakes_rejected.get(status, 0))
        yield rejected
        yield GaugeMetricFamily("revdial_streams", "Tunnel streams open now (agent sessions "
                                "and peer links).",
                                value=stats.streams)
        yield GaugeMetricFamily("revdial_buffered_bytes",
                                "Received tunnel bytes not yet read by the application.",
                                value=stats.buffered_bytes)
        by_result = CounterMetricFamily("revdial_dials", "Dials through agents, by outcome.",
                                        labels=["result"])
        for result, n in dials.results.items():
            by_result.add_metric([result], n)
        yield by_result
        yield HistogramMetricFamily(
            "revdial_dial_seconds",
            "Seconds from a dial's Connect to its outcome (confirmation, first byte or "
            "failure).",
            buckets=[(le, float(n)) for le, n in dials.cumulative_buckets()],
            sum_value=dials.sum,
        )
        yield CounterMetricFamily("revdial_bytes_received", "Tunnel payload bytes received.",
                                  value=traffic.bytes_received)
        yield CounterMetricFamily("revdial_bytes_sent", "Tunnel payload bytes sent.",
                                  value=traffic.bytes_sent)
        pauses = CounterMetricFamily("revdial_pauses", "Pause frames, by direction.",
                                     labels=["direction"])
        pauses.add_metric(["sent"], traffic.pauses_sent)
        pauses.add_metric(["received"], traffic.pauses_received)
        yield pauses
        resets = CounterMetricFamily(
            "revdial_stream_resets", "Streams ended with an error instead of a close, by cause.",
            labels=["cause"],
        )
        for cause, n in traffic.resets.items():
            resets.add_metric([cause], n)
        yield resets
        peers = server.peer_statistics()
        yield GaugeMetricFamily("revdial_peers", "Peer replicas registered (flags and DNS).",
                                value=peers.configured)
        links = GaugeMetricFamily(
            "revdial_peer_links",
            "Peer WebSockets up: out = our link to a peer, in = a peer's link to us.",
            labels=["direction"],
        )
        links.add_metric(["out"], peers.links_up)
        links.add_metric(["in"], peers.sessions_in)
        yield links
        yield GaugeMetricFamily(
            "revdial_peer_announced_clients",
            "Client sessions (clientKey/sessionKey pairs) the connected peers announced.",
            value=peers.announced,
        )
        yield CounterMetricFamily(
            "revdial_peer_announcements_dropped",
            "AddClient announcements dropped because a peer exceeded the bound.",
            value=peers.announcements_dropped,
        )


def peer_report(server: Server) -> dict[str, list[dict[str, Any]]]:
    """Peering, JSON-ready: ``links`` (ours to each registered peer: ``peer_id``,
    ``url`` without query or user-info, ``state`` up/down/self) and ``incoming``
    (each peer's session to us: ``peer_id``, ``remote``, ``session_id``,
    ``announced_clients``, sorted). No tokens."""
    links = []
    for peer_id, link in server._links.items():
        state = "self" if link.is_self else ("up" if link.session is not None else "down")
        links.append({"peer_id": peer_id, "url": link.agent._log_url, "state": state})
    incoming = []
    for session, table in server._peer_in.items():
        if session.is_open:
            incoming.append({"peer_id": session.client_key, "remote": session.remote,
                             "session_id": session.id,
                             "announced_clients": sorted(table.clients)})
    return {"links": links, "incoming": incoming}


def client_report(server: Server) -> list[dict[str, Any]]:
    """One JSON-ready dict per connected session, clients in connection order.

    Keys: ``client_key``, ``session_id``, ``remote``, ``connected_since``
    (ISO 8601, UTC), ``age_seconds``, ``streams``, ``bytes_in``,
    ``bytes_out``, ``extension`` (0: plain remotedialer). No secrets: the
    token an agent presented is never kept.
    """
    now = trio.current_time()
    rows: list[dict[str, Any]] = []
    for key in server.clients():
        for session in server.sessions(key):
            age = now - session.started_at
            rows.append({
                "client_key": key,
                "session_id": session.id,
                "remote": session.remote,
                "connected_since": datetime.fromtimestamp(session.started_wall, UTC)
                .isoformat(timespec="seconds"),
                "age_seconds": round(age, 3) if math.isfinite(age) else None,
                "streams": session.statistics().streams,
                "bytes_in": session.bytes_received,
                "bytes_out": session.bytes_sent,
                "extension": session.extensions,
            })
    return rows
