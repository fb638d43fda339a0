"""Fleet scale: what an idle session keeps, and a returning fleet's handshakes.

* After the 101 neither side keeps the opening handshake's objects
  (``release_handshake_state``: private attributes of trio-websocket 0.12 and
  wsproto 1.2/1.3, so the first test fails loudly on another release), and a
  session whose handshake was released still carries streams both ways.
* An idle session holds no writer task: the first queued frame starts one,
  and the reader retires it at its keepalive deadline once it is idle; a
  retired writer is started again by the next frame (MockClock).
* A returning fleet: at most ``max_concurrent_handshakes`` handshake at once,
  the others wait and all complete; one whose wait and handshake outlast
  ``handshake_timeout`` is closed (logged), never refused; past
  ``max_sessions`` an agent gets a 503 and the server logs a warning. Raw
  trio-websocket clients over memory streams, MockClock, exact instants.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import pytest
import trio
import trio.testing
import trio_websocket
import wsproto

import revdial
from conftest import (
    CLIENT_KEY,
    agent_headers,
    echo_handler,
    echo_roundtrip,
    serve_target,
    ws_url,
)
from revdial._session import (
    _NO_QUEUE,
    _OPENED_HANDSHAKE,
    _SET_EVENT,
    HANDSHAKE_TESTED_VERSIONS,
    _EventList,
    release_handshake_state,
)
from revdial._wsconn import inbox_of
from session_pairs import open_pair


def test_handshake_release_knows_the_installed_releases() -> None:
    for name, module in (("trio-websocket", trio_websocket), ("wsproto", wsproto)):
        version = module.__version__
        assert version.startswith(HANDSHAKE_TESTED_VERSIONS[name]), (
            f"{name} {version} is not a release release_handshake_state was tested with: "
            "check wsproto.WSConnection (handshake, events()) and trio-websocket's "
            "_initial_request, then extend HANDSHAKE_TESTED_VERSIONS"
        )


async def test_sessions_keep_no_handshake_state(server: revdial.Server) -> None:
    async with serve_target(echo_handler) as port, trio.open_nursery() as nursery:
        agent = revdial.Agent(
            ws_url(server), headers=agent_headers(), allow=[f"127.0.0.1:{port}"]
        )
        with trio.fail_after(5):
            await nursery.start(agent.run_once)
            await server.wait_client(CLIENT_KEY)
        (ours,) = server.sessions(CLIENT_KEY)
        theirs = agent.session
        assert theirs is not None
        for session in (ours, theirs):
            ws: Any = session.ws
            assert ws._wsproto.handshake is _OPENED_HANDSHAKE
            assert ws._initial_request is None
            assert type(ws._wsproto.connection._events) is _EventList
            assert ws._open_handshake is ws._for_testing_peer_closed_connection is _SET_EVENT
            # trio-websocket's message channel is revdial's Inbox, holding nothing.
            inbox = inbox_of(ws)
            assert inbox is not None
            assert inbox.delivers_inline
            assert inbox._queue is None
            # An idle session has not allocated its outbox queues.
            assert session._urgent is session._fifo is session._small is _NO_QUEUE
        assert release_handshake_state(ours.ws)  # idempotent
        # Streams still work both ways.
        stream = await server.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{port}")
        await echo_roundtrip(stream, b"after the handshake was released")
        await stream.aclose()
        nursery.cancel_scope.cancel()


def writers(p: Any) -> tuple[bool, bool]:
    """Is a writer task running on the server side, on the client side?"""
    return p.server._writer_running, p.client._writer_running


async def test_writer_runs_only_while_there_is_something_to_write(
    autojump_clock: trio.abc.Clock,
) -> None:
    limits = revdial.Limits(sync_interval=3600.0)  # no Sync frames in between
    async with open_pair(limits=limits) as p:
        await trio.sleep(1)
        # Pings go through trio-websocket, not the writer: nothing started it.
        assert writers(p) == (False, False)
        for round_ in range(3):
            ours, theirs = await p.open(f"target:{round_}")
            await theirs.send_all(b"a")
            assert await ours.receive_some() == b"a"
            await ours.send_all(b"s")
            assert await theirs.receive_some() == b"s"
            assert writers(p) == (True, True)
            # Idle past the readers' next keepalive deadline (pings keep the
            # pair alive): both writers are retired.
            await trio.sleep(limits.ping_timeout + limits.ping_interval)
            assert writers(p) == (False, False)
            assert p.server.is_open
            assert p.client.is_open
            await ours.aclose()
            await theirs.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert p.server.statistics().streams == 0
        assert p.client.statistics().streams == 0


# --- a returning fleet: bounded handshake work, nobody refused ----------------------


async def _agent_over_memory(
    server: revdial.Server, nursery: trio.Nursery, key: str, done: list[str]
) -> None:
    """One raw WebSocket client over a memory stream pair, served by ``server``."""
    server_end, client_end = trio.testing.memory_stream_pair()
    nursery.start_soon(server._serve_stream, server_end, key)
    try:
        await trio_websocket.wrap_client_stream(
            nursery, cast(Any, client_end), "fleet", "/connect",
            extra_headers=[(b"X-Tunnel-ID", key.encode())],
        )
    except trio_websocket.HandshakeError:
        done.append(f"{key}: failed")
        return
    done.append(key)


def _counting_authorizer(
    seconds: float,
) -> tuple[revdial.Authorizer, dict[str, int]]:
    """An async authorizer that takes ``seconds`` and counts how many run at once."""
    counts = {"active": 0, "peak": 0, "calls": 0}

    async def authorize(request: revdial.HandshakeRequest) -> str:
        counts["calls"] += 1
        counts["active"] += 1
        counts["peak"] = max(counts["peak"], counts["active"])
        try:
            await trio.sleep(seconds)
        finally:
            counts["active"] -= 1
        return request.headers["x-tunnel-id"]

    return authorize, counts


async def test_handshakes_beyond_the_limit_wait_and_all_complete(
    autojump_clock: trio.abc.Clock,
) -> None:
    authorize, counts = _counting_authorizer(1.0)
    server = revdial.Server(authorize, limits=revdial.Limits(max_concurrent_handshakes=2))
    done: list[str] = []
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        for i in range(7):
            nursery.start_soon(_agent_over_memory, server, nursery, f"agent-{i}", done)
            await trio.testing.wait_all_tasks_blocked()  # arrive in this order
        while len(server.clients()) < 7:
            await server._changed.wait()
        # Two at a time, one virtual second each: 7 handshakes take 4 s, and
        # nobody was refused or timed out.
        assert trio.current_time() == t0 + 4.0
        assert counts == {"active": 0, "peak": 2, "calls": 7}
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(done) == sorted(f"agent-{i}" for i in range(7))
        assert server.statistics().sessions == 7
        nursery.cancel_scope.cancel()


async def test_a_connection_waiting_past_the_handshake_timeout_is_closed_not_refused(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="revdial")
    authorize, counts = _counting_authorizer(4.0)
    limits = revdial.Limits(max_concurrent_handshakes=1, handshake_timeout=10.0)
    server = revdial.Server(authorize, limits=limits)
    done: list[str] = []
    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(_agent_over_memory, server, nursery, f"agent-{i}", done)
            await trio.testing.wait_all_tasks_blocked()  # arrive in this order
        await trio.sleep(20)
        # Slots at 0-4 s and 4-8 s; the third would finish at 12 s, past its
        # 10 s, and the fourth never got a slot: both connections are closed
        # at 10 s (the agents retry), with no 503.
        assert sorted(server.clients()) == ["agent-0", "agent-1"]
        assert "agent-2" not in done
        assert "agent-3" not in done
        assert counts["peak"] == 1
        nursery.cancel_scope.cancel()
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "agent-2: no WebSocket handshake within 10 s" in m for m in messages
    ), messages
    assert any(
        "agent-3: closed after waiting 10 s for a handshake slot" in m for m in messages
    ), messages
    assert not any("503" in m for m in messages)


async def test_past_max_sessions_the_agent_gets_503_and_the_server_logs_it(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    authorize, _ = _counting_authorizer(0.0)
    server = revdial.Server(authorize, limits=revdial.Limits(max_sessions=2))
    done: list[str] = []
    async with trio.open_nursery() as nursery:
        for i in range(2):
            await _agent_over_memory(server, nursery, f"agent-{i}", done)
        server_end, client_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server._serve_stream, server_end, "agent-2")
        rejected: list[trio_websocket.ConnectionRejected] = []
        try:
            async with trio.open_nursery() as inner:  # hosts the client's reader
                await trio_websocket.wrap_client_stream(
                    inner, cast(Any, client_end), "fleet", "/connect",
                    extra_headers=[(b"X-Tunnel-ID", b"agent-2")],
                )
        except* trio_websocket.ConnectionRejected as group:
            rejected.extend(cast(Any, group.exceptions))
        assert [(r.status_code, r.body) for r in rejected] == [(503, b"too many sessions\n")]
        assert server.clients() == ["agent-0", "agent-1"]
        nursery.cancel_scope.cancel()
    assert any(
        r.levelname == "WARNING" and "agent-2: session limit reached -> 503" in r.getMessage()
        for r in caplog.records
    )


# --- a server's sessions: one keepalive watch, two tasks each when idle --------------


def writer_running(session: revdial.Session) -> bool:
    return session._writer_running


def _descendants(task: trio.lowlevel.Task) -> list[trio.lowlevel.Task]:
    found = []
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            found.append(child)
            found.extend(_descendants(child))
    return found


async def test_server_sessions_share_one_keepalive_watch(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A serving server holds its sessions' dead-peer deadlines in one task:
    each idle session is its connection's task plus trio-websocket's reader,
    and a silent agent is dropped exactly ``ping_timeout`` after its last
    byte, as by the reader's own deadline; an idle writer is retired there."""
    caplog.set_level(logging.WARNING, logger="revdial")
    authorize, _ = _counting_authorizer(0.0)
    limits = revdial.Limits()
    timeout = limits.ping_timeout
    server = revdial.Server(authorize, limits=limits)
    watch = server._keepalive
    done: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        clients: dict[str, Any] = {}

        async def agent(key: str) -> None:
            server_end, client_end = trio.testing.memory_stream_pair()
            nursery.start_soon(server._serve_stream, server_end, key)
            clients[key] = await trio_websocket.wrap_client_stream(
                nursery, cast(Any, client_end), "fleet", "/connect",
                extra_headers=[(b"X-Tunnel-ID", key.encode())],
            )
            done.append(key)

        for key in ("a", "b", "c"):
            await agent(key)
        await trio.testing.wait_all_tasks_blocked()
        sessions = {key: server.sessions(key)[0] for key in ("a", "b", "c")}
        assert all(s._watch is watch for s in sessions.values())
        assert len(watch) == 3
        handlers = [
            t for t in nursery.child_tasks if t.coro.cr_code.co_name == "_serve_stream"
        ]
        assert len(handlers) == 3
        for handler in handlers:
            # trio-websocket's reader, nothing else: no writer, no watchdog.
            assert [t.coro.cr_code.co_name for t in _descendants(handler)] == ["_reader_task"]
        # "a" gets a frame to write (a writer starts) and pings now and then;
        # "b" and "c" stay silent.
        t0 = trio.current_time()
        sessions["a"].announce("peer-x", 1, added=True)
        await trio.testing.wait_all_tasks_blocked()
        assert writer_running(sessions["a"])
        await trio.sleep(timeout / 2)
        await clients["a"].ping(b"1")
        last_a = sessions["a"]._transport.last_receive
        assert last_a == t0 + timeout / 2
        silent_since = {k: sessions[k]._transport.last_receive for k in ("b", "c")}
        ended_at: dict[str, float] = {}

        async def note_end(key: str) -> None:
            await sessions[key].ended.wait()
            ended_at[key] = trio.current_time()

        for key in sessions:
            nursery.start_soon(note_end, key)
        await trio.sleep(timeout / 2 + 1)
        # b and c were silent for ping_timeout: dropped then, exactly; a's
        # deadline moved with its ping, and its idle writer was retired.
        assert ended_at == {k: silent_since[k] + timeout for k in ("b", "c")}
        assert sessions["a"].is_open
        assert not writer_running(sessions["a"])
        assert server.clients() == ["a"]
        await trio.sleep(timeout)
        assert ended_at["a"] == last_a + timeout
        assert server.clients() == []
        assert len(watch) == 0  # ended sessions leave the heap at their deadline
        nursery.cancel_scope.cancel()
    lost = [r.getMessage() for r in caplog.records if "keepalive timeout" in r.getMessage()]
    assert len(lost) == 3, lost
    assert not watch.running


async def test_a_serving_server_runs_the_websocket_readers_itself(
    server: revdial.Server,
) -> None:
    """While serving, trio-websocket's reader runs in the server's nursery:
    an idle session is its connection's task with no nursery or task below
    it (the session's own nursery aside, empty while idle)."""
    async with serve_target(echo_handler) as port, trio.open_nursery() as nursery:
        agent = revdial.Agent(
            ws_url(server), headers=agent_headers(), allow=[f"127.0.0.1:{port}"]
        )
        with trio.fail_after(5):
            await nursery.start(agent.run_once)
            await server.wait_client(CLIENT_KEY)
        (ours,) = server.sessions(CLIENT_KEY)
        assert ours._watch is server._keepalive
        assert server._nursery is not None
        readers = [
            t for t in server._nursery.child_tasks if t.coro.cr_code.co_name == "_read"
        ]
        assert len(readers) == 1
        assert _descendants(readers[0]) == []
        # Streams work through it.
        stream = await server.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{port}")
        await echo_roundtrip(stream, b"through a reader the server owns")
        await stream.aclose()
        nursery.cancel_scope.cancel()
    # The agent went away: its reader ends with the connection.
    with trio.fail_after(5):
        await ours.ended.wait()
        while any(t.coro.cr_code.co_name == "_read" for t in server._nursery.child_tasks):
            await trio.testing.wait_all_tasks_blocked()


async def test_a_failing_websocket_reader_ends_only_its_session(
    server: revdial.Server,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected error in trio-websocket's reader (run in the server's
    nursery) is logged and ends that connection; the server serves on."""
    caplog.set_level(logging.ERROR, logger="revdial")

    async def broken_ping(self: Any, event: object) -> None:
        await trio.lowlevel.checkpoint()
        raise RuntimeError("reader bug")

    monkeypatch.setattr(trio_websocket.WebSocketConnection, "_handle_ping_event", broken_ping)
    lost = trio.Event()

    async def run_agent(*, task_status: trio.TaskStatus[None]) -> None:
        agent = revdial.Agent(ws_url(server), headers=agent_headers())
        try:
            await agent.run_once(task_status=task_status)
        except revdial.SessionLostError:
            lost.set()

    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            # The agent pings at once: the server's reader fails on it.
            await nursery.start(run_agent)
            (ours,) = server.sessions(CLIENT_KEY)
            await ours.ended.wait()
        assert "WebSocket reader failed" in caplog.text
        assert "reader bug" in caplog.text
        with trio.fail_after(5):
            await lost.wait()  # the agent sees its session lost (the connection closed)
        monkeypatch.undo()
        other = revdial.Agent(ws_url(server), headers=agent_headers("c2"))
        with trio.fail_after(5):
            await nursery.start(other.run_once)
            await server.wait_client("c2")
        nursery.cancel_scope.cancel()
