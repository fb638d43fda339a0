"""Observability: counters, ``/metrics``, ``/healthz``, ``/readyz``, ``/clients`` and logs.

Metrics are scraped over HTTP from a real server's :class:`revdial.Monitor`
and parsed with prometheus-client's own parser. Anything about time runs on
a ``MockClock`` over memory streams (or, for the session log line, on real
sockets with a clock that only moves when the test jumps it).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h11
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

import revdial
from conftest import (
    CLIENT_KEY,
    TOKEN,
    Targets,
    agent_headers,
    receive_exactly,
    serve_target,
    spawn_agent,
    wait_until,
    ws_url,
)
from revdial._logs import JsonFormatter
from revdial._stats import DIAL_BUCKETS, DialStats, dial_result
from revdial.testing import FakeNetwork, echo_handler, open_session_pair

# --- helpers ------------------------------------------------------------------

ALL = revdial.AllowPolicy(allow_all=True)


@asynccontextmanager
async def open_monitor(server: revdial.Server, **kwargs: object) -> AsyncIterator[revdial.Monitor]:
    monitor = revdial.Monitor(server, **kwargs)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.serve, "127.0.0.1", 0)
        yield monitor
        nursery.cancel_scope.cancel()


async def http_request(
    port: int, target: str, method: str = "GET", headers: list[tuple[str, str]] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: ``(status, headers, body)``."""
    conn = h11.Connection(h11.CLIENT)
    head = [("Host", "monitor"), ("Connection", "close"), *(headers or [])]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            (conn.send(h11.Request(method=method, target=target, headers=head)) or b"")
            + (conn.send(h11.EndOfMessage()) or b"")
        )
        status, answer, body = 0, {}, b""
        with trio.fail_after(10):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    answer = {k.decode().lower(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return status, answer, body


async def scrape(port: int) -> dict[str, float]:
    """``/metrics`` parsed: ``'name{label="v",...}' -> value`` for every sample."""
    status, headers, body = await http_request(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


async def reset_after_hello(stream: trio.SocketStream) -> None:
    """Target: say ``hi``, wait for ``go``, then reset the connection."""
    await stream.send_all(b"hi")
    await receive_exactly(stream, 2)
    await revdial.abort(stream)


# --- metrics over HTTP ----------------------------------------------------------


async def test_metrics_move_with_sessions_dials_bytes_resets_and_pauses(
    server: revdial.Server, targets: Targets
) -> None:
    async with (
        open_monitor(server) as monitor,
        serve_target(reset_after_hello) as reset_port,
        trio.open_nursery() as nursery,
    ):
        port = monitor.port
        before = await scrape(port)
        assert before["revdial_sessions"] == 0
        assert before["revdial_dials_total{result=\"ok\"}"] == 0
        assert before["revdial_dial_seconds_count"] == 0

        allow = [*targets.allow, f"127.0.0.1:{reset_port}"]
        _, agent_scope = await spawn_agent(nursery, server, allow)
        m = await scrape(port)
        assert m["revdial_sessions"] == 1
        assert m["revdial_clients"] == 1
        assert m[f'revdial_client_sessions{{client="{CLIENT_KEY}"}}'] == 1
        assert m["revdial_client_series_omitted"] == 0
        assert m["revdial_sessions_accepted_total"] == 1

        # A dial that works, and bytes both ways.
        stream = await server.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.echo}")
        await stream.send_all(b"x" * 1000)
        assert await receive_exactly(stream, 1000) == b"x" * 1000
        m = await scrape(port)
        assert m['revdial_dials_total{result="ok"}'] == 1
        assert m["revdial_dial_seconds_count"] == 1
        assert m['revdial_dial_seconds_bucket{le="+Inf"}'] == 1
        assert m["revdial_streams"] == 1
        assert m["revdial_bytes_sent_total"] == 1000
        assert m["revdial_bytes_received_total"] == 1000
        await stream.aclose()

        # Refused by the agent's policy, unreachable, no such client.
        with pytest.raises(revdial.DialRefusedError):
            await server.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.forbidden}")
        with pytest.raises(revdial.DialConnectionRefusedError):
            await server.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.closed}")
        with pytest.raises(revdial.NoSuchClientError):
            await server.dial("nobody", "tcp", f"127.0.0.1:{targets.echo}")
        m = await scrape(port)
        assert m['revdial_dials_total{result="refused"}'] == 1
        assert m['revdial_dials_total{result="failed"}'] == 1
        assert m['revdial_dials_total{result="no_client"}'] == 1
        assert m['revdial_dials_total{result="ok"}'] == 1
        assert m["revdial_dial_seconds_count"] == 3  # no_client never reached an agent

        # The target resets an established stream: the agent passes the reset on.
        stream = await server.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{reset_port}")
        assert await receive_exactly(stream, 2) == b"hi"
        await stream.send_all(b"go")
        with pytest.raises(revdial.StreamResetError):
            await stream.receive_some()
        m = await scrape(port)
        assert m['revdial_stream_resets_total{cause="peer"}'] == 1
        assert m["revdial_bytes_sent_total"] == 1002
        assert m["revdial_bytes_received_total"] == 1002

        # A download we do not read: the server pauses the stream.
        stream = await server.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.download}")
        await stream.send_all((8 * 1024 * 1024).to_bytes(8, "big") + (7).to_bytes(8, "big"))
        await wait_until(lambda: server.counters().sessions.pauses_sent >= 1)
        m = await scrape(port)
        assert m['revdial_pauses_total{direction="sent"}'] >= 1
        assert m["revdial_buffered_bytes"] > 0
        await stream.aclose()

        # The agent goes away: gauges drop, counters keep what they counted.
        agent_scope.cancel()
        await wait_until(lambda: not server.clients())
        after = await scrape(port)
        assert after["revdial_sessions"] == 0
        assert after["revdial_streams"] == 0
        assert f'revdial_client_sessions{{client="{CLIENT_KEY}"}}' not in after
        assert after["revdial_bytes_sent_total"] >= 1002 + 16
        assert after["revdial_bytes_received_total"] >= m["revdial_bytes_received_total"]
        assert after['revdial_stream_resets_total{cause="peer"}'] == 1
        nursery.cancel_scope.cancel()


async def test_per_client_series_are_bounded(server: revdial.Server) -> None:
    async with open_monitor(server, max_client_series=1) as monitor, trio.open_nursery() as n:
        await spawn_agent(n, server, None, client_key="first")
        await spawn_agent(n, server, None, client_key="second")
        await spawn_agent(n, server, None, client_key="second", sessions=2)
        m = await scrape(monitor.port)
        assert m['revdial_client_sessions{client="first"}'] == 1
        assert not any('client="second"' in name for name in m)
        assert m["revdial_client_series_omitted"] == 1
        assert m["revdial_sessions"] == 3
        assert m["revdial_clients"] == 2
        n.cancel_scope.cancel()


async def test_rejected_handshakes_are_counted_by_status(server: revdial.Server) -> None:
    async with open_monitor(server) as monitor:
        agent = revdial.Agent(ws_url(server), headers=agent_headers(token="wrong"))
        with trio.fail_after(10), pytest.raises(revdial.HandshakeError):
            await agent.run_once()
        m = await scrape(monitor.port)
        assert m['revdial_handshakes_rejected_total{status="401"}'] == 1
        assert m['revdial_handshakes_rejected_total{status="503"}'] == 0
        assert m["revdial_sessions_accepted_total"] == 0


# --- health, readiness, the HTTP surface --------------------------------------------


async def test_readyz_follows_the_listener() -> None:
    server = revdial.Server(revdial.token_authorizer(token=TOKEN))
    async with open_monitor(server) as monitor, trio.open_nursery() as nursery:
        assert (await http_request(monitor.port, "/healthz"))[0] == 200
        status, _, body = await http_request(monitor.port, "/readyz")
        assert (status, body) == (503, b"not ready\n")

        scope = trio.CancelScope()

        async def serve(*, task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
            with scope:
                await server.serve("127.0.0.1", 0, task_status=task_status)

        await nursery.start(serve)
        status, _, body = await http_request(monitor.port, "/readyz")
        assert (status, body) == (200, b"ready\n")

        scope.cancel()  # the server stops listening; the monitor stays up
        await trio.testing.wait_all_tasks_blocked()
        assert not server.listening
        assert (await http_request(monitor.port, "/readyz"))[0] == 503
        assert (await http_request(monitor.port, "/healthz"))[0] == 200
        nursery.cancel_scope.cancel()


async def test_readyz_extra_check(server: revdial.Server) -> None:
    ready = False
    async with open_monitor(server, ready=lambda: ready) as monitor:
        assert (await http_request(monitor.port, "/readyz"))[0] == 503
        ready = True
        assert (await http_request(monitor.port, "/readyz"))[0] == 200


async def test_monitor_http_surface(server: revdial.Server) -> None:
    async with open_monitor(server, max_request_bytes=1024) as monitor:
        port = monitor.port
        assert (await http_request(port, "/nope"))[0] == 404
        status, headers, _ = await http_request(port, "/metrics", method="POST")
        assert status == 405
        assert headers["allow"] == "GET, HEAD"
        status, headers, body = await http_request(port, "/healthz", method="HEAD")
        assert (status, body, headers["content-length"]) == (200, b"", "3")
        assert (await http_request(port, "/healthz?verbose=1"))[0] == 200
        status, _, _ = await http_request(port, "/healthz", headers=[("X-Big", "a" * 2000)])
        assert status == 431

        # Not HTTP at all: 400, then the connection ends.
        raw = await trio.open_tcp_stream("127.0.0.1", port)
        async with raw:
            await raw.send_all(b"\x16\x03\x01 hello\r\n\r\n")
            answer = b""
            with trio.fail_after(10):
                while chunk := await raw.receive_some(4096):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 400 ")

        # Keep-alive: two requests on one connection.
        conn = h11.Connection(h11.CLIENT)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            for path in ("/healthz", "/readyz"):
                await stream.send_all(
                    (conn.send(h11.Request(method="GET", target=path,
                                           headers=[("Host", "m")])) or b"")
                    + (conn.send(h11.EndOfMessage()) or b"")
                )
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(4096))
                    elif isinstance(event, h11.Response):
                        assert event.status_code == 200
                    elif isinstance(event, h11.EndOfMessage):
                        break
                conn.start_next_cycle()


async def test_clients_report(server: revdial.Server, targets: Targets) -> None:
    async with open_monitor(server) as monitor, trio.open_nursery() as nursery:
        status, headers, body = await http_request(monitor.port, "/clients")
        assert status == 200
        assert json.loads(body) == {"clients": []}
        await spawn_agent(nursery, server, targets.allow)
        stream = await server.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.echo}")
        await stream.send_all(b"abc")
        assert await receive_exactly(stream, 3) == b"abc"
        status, headers, body = await http_request(monitor.port, "/clients")
        assert headers["content-type"] == "application/json"
        (entry,) = json.loads(body)["clients"]
        (session,) = server.sessions(CLIENT_KEY)
        assert entry["client_key"] == CLIENT_KEY
        assert entry["session_id"] == session.id
        assert entry["remote"].startswith("127.0.0.1:")
        assert entry["connected_since"].endswith("+00:00")
        assert entry["age_seconds"] >= 0
        assert (entry["streams"], entry["bytes_in"], entry["bytes_out"]) == (1, 3, 3)
        assert entry["extension"] == 1
        assert TOKEN.encode() not in body
        await stream.aclose()
        nursery.cancel_scope.cancel()


# --- dial outcomes and latency on the mock clock ------------------------------------


async def _slow_dialer(net: FakeNetwork, delay: float, proto: str, address: str) -> trio.abc.Stream:
    await trio.sleep(delay)
    return await net.dial(proto, address)


async def test_dial_latency_histogram_on_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNetwork()
    net.listen("echo:1", echo_handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        async with open_session_pair(
            allow=ALL, dialer=functools.partial(_slow_dialer, net, 0.3)
        ) as (server, _):
            stream = server.open_stream("tcp", "echo:1")
            await server.dial(stream, 35.0)
            stats = server.dial_stats
            assert stats.results["ok"] == 1
            assert stats.count == 1
            assert stats.sum == pytest.approx(0.3, abs=1e-9)
            buckets = dict(stats.cumulative_buckets())
            assert buckets["0.25"] == 0
            assert buckets["0.5"] == 1
            assert buckets["+Inf"] == 1
            await stream.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("extensions", [1, 0], ids=["v1", "plain"])
async def test_dial_outcomes_timeout_and_cancelled(
    autojump_clock: trio.testing.MockClock, extensions: int
) -> None:
    net = FakeNetwork()
    net.blackhole("hole:1")
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        async with open_session_pair(allow=ALL, dialer=net.dial, extensions=extensions) as (
            server, _
        ):
            stream = server.open_stream("tcp", "hole:1")
            # v1 waits for the confirmation; plain returns, and the first receive times out
            with pytest.raises(revdial.DialTimeoutError):
                await _dial_and_receive(server, stream, 2.0)
            assert server.dial_stats.results["timeout"] == 1
            assert server.dial_stats.sum == pytest.approx(2.0, abs=1e-9)

            stream = server.open_stream("tcp", "hole:1")
            await stream.aclose()  # given up before any outcome
            assert server.dial_stats.results["cancelled"] == 1
            assert server.dial_stats.count == 2
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("extensions", [1, 0], ids=["v1", "plain"])
async def test_dial_outcomes_ok_and_refused(
    autojump_clock: trio.testing.MockClock, extensions: int
) -> None:
    net = FakeNetwork()
    net.listen("echo:1", echo_handler)
    net.listen("secret:1", echo_handler)
    policy = revdial.AllowPolicy(["echo:1"])
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        async with open_session_pair(allow=policy, dialer=net.dial, extensions=extensions) as (
            server, _
        ):
            stream = await server.dial(server.open_stream("tcp", "echo:1"), 35.0)
            # plain remotedialer: the dial counts as ok once the first byte is back
            await stream.send_all(b"ping")
            assert await stream.receive_some() == b"ping"
            assert server.dial_stats.results["ok"] == 1
            await stream.aclose()
            with pytest.raises(revdial.DialRefusedError):
                await _dial_and_receive(server, server.open_stream("tcp", "secret:1"), 35.0)
            assert server.dial_stats.results["refused"] == 1
            assert server.dial_stats.count == 2
            assert sum(server.dial_stats.results.values()) == 2
        nursery.cancel_scope.cancel()


async def test_dial_outcome_session_lost(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNetwork()
    net.blackhole("hole:1")
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        async with open_session_pair(allow=ALL, dialer=net.dial) as (server, client):
            stream = server.open_stream("tcp", "hole:1")
            async with trio.open_nursery() as inner:
                inner.start_soon(client.ws.aclose)
                with pytest.raises(revdial.DialSessionLostError):
                    await server.dial(stream, 0)
            assert server.dial_stats.results["failed"] == 1
        nursery.cancel_scope.cancel()


async def _dial_and_receive(session: revdial.Session, stream: revdial.TunnelStream,
                            connect_timeout: float) -> bytes:
    stream = await session.dial(stream, connect_timeout)
    return await stream.receive_some()


async def test_collector_bound_is_validated(server: revdial.Server) -> None:
    with pytest.raises(ValueError, match="max_client_series"):
        revdial.Monitor(server, max_client_series=-1)


def test_dial_result_mapping() -> None:
    kw = {"reason": "x", "client_key": "c", "target": "tcp/a:1"}
    assert dial_result(revdial.DialRefusedError("m", **kw)) == "refused"
    assert dial_result(revdial.DialTimeoutError("m", **kw)) == "timeout"
    assert dial_result(revdial.DialConnectionRefusedError("m", **kw)) == "failed"
    assert dial_result(revdial.DialUnreachableError("m", **kw)) == "failed"
    assert dial_result(revdial.DialSessionLostError("m", **kw)) == "failed"
    assert dial_result(revdial.NoSuchClientError("m", **kw)) == "no_client"
    assert dial_result(revdial.StreamResetError("m")) == "failed"


def test_dial_stats_buckets_are_upper_inclusive() -> None:
    stats = DialStats()
    stats.record("ok", DIAL_BUCKETS[0])
    stats.record("ok", 1e9)
    stats.record("no_client", None)
    cumulative = stats.cumulative_buckets()
    assert cumulative[0] == (repr(DIAL_BUCKETS[0]), 1)
    assert cumulative[-1] == ("+Inf", 2)
    assert stats.count == 2
    assert stats.results == {"ok": 2, "refused": 0, "failed": 0, "timeout": 0,
                             "no_client": 1, "cancelled": 0}


def test_session_counters_add() -> None:
    a = revdial.SessionCounters(bytes_received=1, resets_peer=2)
    b = revdial.SessionCounters(bytes_received=10, pauses_sent=3)
    assert a + b == revdial.SessionCounters(bytes_received=11, pauses_sent=3, resets_peer=2)
    assert (a + b).resets["peer"] == 2


# --- logs -----------------------------------------------------------------------------


class _Recorder(logging.Handler):
    """Keep records; set an event when a record with ``event == wanted`` arrives."""

    def __init__(self, wanted: str) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.wanted = wanted
        self.seen = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if getattr(record, "event", None) == self.wanted:
            self.seen.set()


async def test_session_start_and_end_lines(
    mock_clock: trio.testing.MockClock, echo_server: int
) -> None:
    recorder = _Recorder("session_end")
    logger = logging.getLogger("revdial")
    logger.addHandler(recorder)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        async with revdial.open_server(revdial.token_authorizer(token=TOKEN)) as server:
            agent = revdial.Agent(ws_url(server) + "?token=" + TOKEN,
                                  headers=agent_headers(), allow=[f"127.0.0.1:{echo_server}"])
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def run_agent(*, task_status: trio.TaskStatus[None]) -> None:
                    with scope:
                        await agent.run(task_status=task_status)

                await nursery.start(run_agent)
                await server.wait_client(CLIENT_KEY)
                stream = await server.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{echo_server}")
                await stream.send_all(b"y" * 100)
                assert await receive_exactly(stream, 100) == b"y" * 100
                await stream.aclose()
                mock_clock.jump(3.0)  # less than a ping interval: nothing else wakes
                scope.cancel()
                await recorder.seen.wait()
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(old_level)
    starts = [r for r in recorder.records if getattr(r, "event", None) == "session_start"]
    ends = [r for r in recorder.records if getattr(r, "event", None) == "session_end"]
    assert len(starts) == len(ends) == 1
    start, end = starts[0], ends[0]
    for record in (start, end):
        assert record.client_key == CLIENT_KEY  # type: ignore[attr-defined]
        assert record.remote.startswith("127.0.0.1:")  # type: ignore[attr-defined]
        assert record.remote in record.getMessage()  # type: ignore[attr-defined]
    assert end.duration_s == 3.0  # type: ignore[attr-defined]
    assert (end.bytes_in, end.bytes_out) == (100, 100)  # type: ignore[attr-defined]
    assert "after 3.0 s (100 bytes in, 100 bytes out)" in end.getMessage()
    text = "\n".join(r.getMessage() for r in recorder.records)
    assert TOKEN not in text
    assert "?token" not in text


def test_json_formatter() -> None:
    formatter = JsonFormatter()
    record = logging.LogRecord("revdial", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    record.client_key = "c1"
    record.bytes_in = 5
    record.thing = object()
    line = formatter.format(record)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["level"] == "info"
    assert obj["logger"] == "revdial"
    assert obj["message"] == "hello you"
    assert obj["time"].endswith("Z")
    assert (obj["client_key"], obj["bytes_in"]) == ("c1", 5)
    assert isinstance(obj["thing"], str)
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("revdial", logging.ERROR, __file__, 1, "failed", (),
                                   sys.exc_info())
    obj = json.loads(formatter.format(record))
    assert "ValueError: boom" in obj["exception"]
