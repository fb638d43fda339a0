"""Peered server replicas (PROTOCOL.md 4.2): bookkeeping, wire format, routing, faults.

Pure bookkeeping is tested directly; the wire format frame by frame against
PROTOCOL.md (no Go toolchain here, so no live Go peer); routing with real
servers on loopback, peered both ways, and with a bare WebSocket standing in
for a (Go) peer where the test must control every frame.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, ConnectionRejected, serve_websocket

import revdial
from conftest import (
    CLIENT_KEY,
    TOKEN,
    Targets,
    echo_roundtrip,
    free_port,
    open_raw_websocket,
    raw_headers,
    receive_exactly,
    spawn_agent,
    wait_until,
    ws_url,
)
from revdial._cli import _build_parser, main, parse_peer
from revdial._frames import Frame, MessageType, decode, encode
from revdial._peers import relay
from revdial._peerstate import (
    AnnouncedClients,
    PeerSet,
    announcement_payload,
    peer_network,
    split_peer_network,
    valid_peer_id,
)
from revdial._standin import StandInAPIServer
from revdial._state import ClientAnnounced, Role, SessionState

PEER_TOKEN = "peer-tok-5d1b-not-in-logs"


# --- pure bookkeeping -----------------------------------------------------------


def test_announced_clients_add_remove() -> None:
    table = AnnouncedClients(max_pairs=10)
    assert table.add("c1", 1)
    assert not table.add("c1", 1)  # duplicate
    assert table.add("c1", 2)
    assert table.add("c2", 3)
    assert table.has("c1")
    assert table.pairs == 3
    assert not table.remove("c1", 99)  # never announced: ignored
    assert table.remove("c1", 1)
    assert table.has("c1")
    assert table.remove("c1", 2)
    assert not table.has("c1")
    assert table.pairs == 1
    assert table.clients == {"c2": {3}}


def test_announced_clients_bound() -> None:
    table = AnnouncedClients(max_pairs=100)
    for i in range(1000):
        table.add(f"c{i % 7}", i)
    assert table.pairs == 100
    assert table.dropped == 900
    assert sum(len(s) for s in table.clients.values()) == 100
    for i in range(1000):  # a RemoveClient flood removes what was there, nothing more
        table.remove(f"c{i % 7}", i)
    assert table.pairs == 0
    assert table.clients == {}
    assert table.add("c1", 1)  # room again


def test_peer_network_split_at_first_separator() -> None:
    assert peer_network("c1", "tcp") == "c1::tcp"
    assert split_peer_network("c1::tcp") == ("c1", "tcp")
    assert split_peer_network("c1::unix::x") == ("c1", "unix::x")
    with pytest.raises(ValueError, match="invalid clientKey/proto: tcp"):
        split_peer_network("tcp")


@pytest.mark.parametrize(
    ("peer_id", "ok"),
    [("a", True), ("10.0.0.5:8123", True), ("[fd00::1]:8123", False), ("a/b", False),
     ("", False), ("x" * 81, False), ("tab\there", False)],
)
def test_valid_peer_id(peer_id: str, ok: bool) -> None:
    assert valid_peer_id(peer_id) is ok


def test_peer_set_diffs_dns_answers() -> None:
    peers = PeerSet(8123, own=frozenset({"10.0.0.1:8123"}))
    assert peers.update(["10.0.0.1", "10.0.0.2", "10.0.0.3"]) == (
        ["10.0.0.2:8123", "10.0.0.3:8123"], [])
    assert peers.update(["10.0.0.3", "10.0.0.2"]) == ([], [])
    assert peers.update(["10.0.0.3", "10.0.0.4", "fd00::9"]) == (
        ["10.0.0.4:8123", "[fd00::9]:8123"], ["10.0.0.2:8123"])
    assert peers.update([]) == ([], ["10.0.0.3:8123", "10.0.0.4:8123", "[fd00::9]:8123"])


# --- wire format (PROTOCOL.md 2.3, 2.4, 4.2) --------------------------------------


def test_announcement_frames_are_byte_exact() -> None:
    state = SessionState(Role.CLIENT)
    state.announce("c1", 123, added=True)
    state.announce("c1", 123, added=False)
    # msg id 1 -> 02, conn 0 -> 00, type 4 -> 08 / type 5 -> 0a, no deadline varint.
    assert state.take_urgent() == [
        bytes.fromhex("020008") + b"c1/123",
        bytes.fromhex("04000a") + b"c1/123",
    ]
    assert announcement_payload("c1", (1 << 63) - 1) == b"c1/9223372036854775807"


def test_forwarded_connect_payload_is_byte_exact() -> None:
    state = SessionState(Role.SERVER)
    conn_id = state.open(peer_network("c1", "tcp"), "127.0.0.1:8080", 0.0)
    assert conn_id == 2
    (frame,) = state.take_ordered()
    # msg 1, conn 2, Connect, legacy deadline 15000, payload "K::proto/address".
    assert frame == bytes.fromhex("020404b0ea01") + b"c1::tcp/127.0.0.1:8080"
    assert decode(frame).payload == b"c1::tcp/127.0.0.1:8080"


def test_server_session_reports_announcements_client_ignores_them() -> None:
    add = encode(Frame(9, 0, MessageType.ADD_CLIENT, b"c2/77"))
    remove = encode(Frame(10, 0, MessageType.REMOVE_CLIENT, b"c2/77"))
    server = SessionState(Role.SERVER)
    assert server.receive(add, 0.0) == ClientAnnounced("c2", 77, True)
    assert server.receive(remove, 0.0) == ClientAnnounced("c2", 77, False)
    client = SessionState(Role.CLIENT)
    assert client.receive(add, 0.0) is None
    assert client.receive(remove, 0.0) is None


# --- servers on loopback ------------------------------------------------------------


@asynccontextmanager
async def peered_servers(n: int, **kwargs: Any) -> AsyncIterator[list[revdial.Server]]:
    """``n`` servers peered with each other (ids s0, s1, ...), links up."""
    async with trio.open_nursery() as nursery:
        servers = []
        for i in range(n):
            srv = revdial.Server(revdial.token_authorizer(token=TOKEN), peer_id=f"s{i}",
                                 peer_token=PEER_TOKEN, **kwargs)
            await nursery.start(srv.serve, "127.0.0.1", 0)
            servers.append(srv)
        for i, srv in enumerate(servers):
            for j, other in enumerate(servers):
                if i != j:
                    srv.add_peer(f"s{j}", ws_url(other))
        await wait_until(lambda: all(
            s.peer_statistics().links_up == n - 1 and s.peer_statistics().sessions_in == n - 1
            for s in servers))
        yield servers
        nursery.cancel_scope.cancel()


async def test_dial_through_a_peer(targets: Targets, extensions: bool) -> None:
    async with peered_servers(2) as (a, b), trio.open_nursery() as nursery:
        await spawn_agent(nursery, a, targets.allow, extensions=extensions)
        with trio.fail_after(10):
            await b.wait_client(CLIENT_KEY)
        assert b.clients() == []
        assert b.has_client(CLIENT_KEY)
        assert b.peer_clients() == {"s0": [CLIENT_KEY]}
        stream = await b.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.echo}")
        await echo_roundtrip(stream, b"through a peer" * 1000)
        await stream.aclose()
        # A dial the agent cannot make comes back as the same typed error.
        if extensions:
            with pytest.raises(revdial.DialConnectionRefusedError):
                await b.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.closed}")
            with pytest.raises(revdial.DialRefusedError):
                await b.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.forbidden}")
        else:
            refused = await b.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.closed}")
            with pytest.raises(revdial.DialError):
                await refused.receive_some()
        # Nothing leaks on either hop once the streams are closed.
        await wait_until(lambda: a.statistics().streams == 0
                         and all(s.statistics().streams == 0 for s in a.sessions(CLIENT_KEY)))
        nursery.cancel_scope.cancel()


async def test_local_session_is_preferred(targets: Targets) -> None:
    async with peered_servers(2) as (a, b), trio.open_nursery() as nursery:
        await spawn_agent(nursery, a, targets.allow)
        await spawn_agent(nursery, b, targets.allow)
        await wait_until(lambda: b.peer_clients() == {"s0": [CLIENT_KEY]})
        stream = await b.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.echo}")
        await echo_roundtrip(stream, b"local")
        (local,) = b.sessions(CLIENT_KEY)
        assert local.statistics().streams == 1
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_agent_leaving_is_withdrawn_from_peers(targets: Targets) -> None:
    async with peered_servers(3) as servers, trio.open_nursery() as nursery:
        a, b, c = servers
        _, scope = await spawn_agent(nursery, a, targets.allow)
        await wait_until(lambda: b.has_client(CLIENT_KEY) and c.has_client(CLIENT_KEY))
        scope.cancel()
        await wait_until(lambda: not b.has_client(CLIENT_KEY) and not c.has_client(CLIENT_KEY))
        with pytest.raises(revdial.NoSuchClientError):
            await b.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.echo}")
        assert b.peer_statistics().announced == 0
        nursery.cancel_scope.cancel()


async def test_peer_leaving_mid_dial_fails_the_dial(targets: Targets) -> None:
    dialing = trio.Event()

    async def never_answers(proto: str, address: str) -> trio.abc.Stream:
        dialing.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async with trio.open_nursery() as outer:
        b = revdial.Server(revdial.token_authorizer(token=TOKEN), peer_id="b",
                           peer_token=PEER_TOKEN)
        await outer.start(b.serve, "127.0.0.1", 0)
        a_scope = trio.CancelScope()
        a = revdial.Server(revdial.token_authorizer(token=TOKEN), peer_id="a",
                           peer_token=PEER_TOKEN)
        a.add_peer("b", ws_url(b))

        async def run_a(*, task_status: trio.TaskStatus[None]) -> None:
            with a_scope:
                async with trio.open_nursery() as n:
                    await n.start(a.serve, "127.0.0.1", 0)
                    await spawn_agent(n, a, ["*:*"], dialer=never_answers)
                    task_status.started()

        await outer.start(run_a)
        with trio.fail_after(10):
            await b.wait_client(CLIENT_KEY)
        result: list[BaseException] = []

        async def dial() -> None:
            try:
                await b.dial(CLIENT_KEY, "tcp", "10.255.255.1:80")
            except revdial.DialError as exc:
                result.append(exc)

        outer.start_soon(dial)
        with trio.fail_after(10):
            await dialing.wait()
        a_scope.cancel()  # server A and its agent go away
        await wait_until(lambda: bool(result))
        assert isinstance(result[0], revdial.DialSessionLostError)
        await wait_until(lambda: not b.has_client(CLIENT_KEY))
        assert b.peer_statistics().sessions_in == 0
        assert b.statistics().streams == 0
        outer.cancel_scope.cancel()


async def rejected_status(port: int, headers: list[tuple[bytes, bytes]]) -> int:
    """Open a bare WebSocket expecting a refusal; return the HTTP status."""
    with pytest.raises((ConnectionRejected, BaseExceptionGroup)) as info:
        async with open_raw_websocket(port, headers):
            pass
    exc: BaseException = info.value
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    assert isinstance(exc, ConnectionRejected), info.value
    return int(exc.status_code)


def peer_headers(peer_id: str = "raw", token: str = PEER_TOKEN) -> list[tuple[bytes, bytes]]:
    return [(b"X-API-Tunnel-ID", peer_id.encode()), (b"X-API-Tunnel-Token", token.encode())]


async def test_wrong_peer_token_is_401_and_logged(
    server_with_peering: revdial.Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "revdial")
    status = await rejected_status(server_with_peering.port,
                                   peer_headers(token="wrong-peer-token"))
    assert status == 401
    lines = [r.getMessage() for r in caplog.records if "wrong peer token" in r.getMessage()]
    assert lines
    assert "raw" in lines[0]
    assert "wrong-peer-token" not in caplog.text
    assert PEER_TOKEN not in caplog.text
    assert server_with_peering.counters().handshakes_rejected == {401: 1}


async def test_peer_token_never_authenticates_an_agent(
    server_with_peering: revdial.Server,
) -> None:
    # The peer token as an agent's bearer token: the agents' authorizer refuses it.
    assert await rejected_status(server_with_peering.port,
                                 raw_headers(CLIENT_KEY, PEER_TOKEN)) == 401
    # A peer session is never an agent session: it is not dialled by its key.
    async with open_raw_websocket(server_with_peering.port, peer_headers("p1")):
        await wait_until(lambda: server_with_peering.peer_statistics().sessions_in == 1)
        assert server_with_peering.clients() == []
        with pytest.raises(revdial.NoSuchClientError):
            await server_with_peering.dial("p1", "tcp", "127.0.0.1:1")


@pytest.fixture
async def server_with_peering() -> AsyncIterator[revdial.Server]:
    async with revdial.open_server(revdial.token_authorizer(token=TOKEN), peer_id="me",
                                   peer_token=PEER_TOKEN, max_announced=50) as srv:
        yield srv


async def test_own_peer_id_is_refused_with_409(server_with_peering: revdial.Server) -> None:
    assert await rejected_status(server_with_peering.port, peer_headers("me")) == 409


async def test_a_link_to_itself_stops() -> None:
    async with revdial.open_server(revdial.token_authorizer(token=TOKEN), peer_id="me",
                                   peer_token=PEER_TOKEN) as srv:
        srv.add_peer("10.0.0.1:1", ws_url(srv))  # e.g. DNS lists this replica too
        await wait_until(lambda: srv.peer_statistics().configured == 0)
        assert srv.peer_statistics().sessions_in == 0


async def test_announcement_flood_stays_within_the_bound(
    server_with_peering: revdial.Server, caplog: pytest.LogCaptureFixture
) -> None:
    srv = server_with_peering
    async with open_raw_websocket(srv.port, peer_headers("flood")) as ws:
        for i in range(500):
            await ws.send_message(encode(Frame(i, 0, MessageType.ADD_CLIENT, f"k{i}/{i}".encode())))
        await wait_until(lambda: srv.peer_statistics().announcements_dropped == 450)
        assert srv.peer_statistics().announced == 50
        assert len(srv.peer_clients()["flood"]) == 50
        assert sum("further announcements are dropped" in r.getMessage()
                   for r in caplog.records) == 1
        for i in range(500):
            await ws.send_message(
                encode(Frame(i, 0, MessageType.REMOVE_CLIENT, f"k{i}/{i}".encode())))
        await wait_until(lambda: srv.peer_statistics().announced == 0)
    await wait_until(lambda: srv.peer_statistics().sessions_in == 0)
    assert srv.peer_clients() == {}


async def test_forwarded_dial_to_a_client_the_peer_lost(
    server_with_peering: revdial.Server,
) -> None:
    """A (Go-like) peer announced c1, then lost it: the dial fails with a typed
    DialError, and the Connect it saw is exactly ``c1::tcp/ADDRESS``."""
    srv = server_with_peering
    async with open_raw_websocket(srv.port, peer_headers("gopeer")) as ws:
        await ws.send_message(encode(Frame(1, 0, MessageType.ADD_CLIENT, b"c1/42")))
        await wait_until(lambda: srv.has_client("c1"))
        stream = await srv.dial("c1", "tcp", "127.0.0.1:9", connect_timeout=30)
        message = await ws.get_message()
        assert isinstance(message, bytes)
        connect = decode(message)
        assert (connect.type, connect.conn_id) == (MessageType.CONNECT, 2)
        assert connect.payload == b"c1::tcp/127.0.0.1:9"
        # What a Go peer answers when the client has gone.
        await ws.send_message(encode(Frame(2, 2, MessageType.ERROR,
                                           b"failed to find Session for client c1")))
        with pytest.raises(revdial.NoSuchClientError):
            await stream.receive_some()


async def test_forwarded_dial_without_answer_times_out(
    server_with_peering: revdial.Server,
) -> None:
    srv = server_with_peering
    async with open_raw_websocket(srv.port, peer_headers("silent")) as ws:
        await ws.send_message(encode(Frame(1, 0, MessageType.ADD_CLIENT, b"c1/42")))
        await wait_until(lambda: srv.has_client("c1"))
        stream = await srv.dial("c1", "tcp", "127.0.0.1:9", connect_timeout=0.2)
        with trio.fail_after(10), pytest.raises(revdial.DialTimeoutError):
            await stream.receive_some()


async def test_peer_link_sends_the_peer_headers(server: revdial.Server) -> None:
    """The outbound link's handshake carries X-API-Tunnel-ID / X-API-Tunnel-Token."""
    seen: list[dict[str, str]] = []

    async def handler(request: Any) -> None:
        seen.append({k.decode().lower(): v.decode() for k, v in request.headers})
        await request.reject(503)

    async with trio.open_nursery() as nursery:
        listener = await nursery.start(functools.partial(serve_websocket, handler, "127.0.0.1",
                                                         0, ssl_context=None))
        port = listener.port
        async with revdial.open_server(revdial.token_authorizer(token=TOKEN), peer_id="me",
                                       peer_token=PEER_TOKEN,
                                       peers={"p": f"ws://127.0.0.1:{port}/connect"}):
            await wait_until(lambda: bool(seen))
        nursery.cancel_scope.cancel()
    assert seen[0]["x-api-tunnel-id"] == "me"
    assert seen[0]["x-api-tunnel-token"] == PEER_TOKEN


async def test_forwarded_connect_without_separator_is_refused(targets: Targets) -> None:
    """A peer's Connect without ``::`` gets Go's dial error text, the link lives on."""
    async with peered_servers(2) as (a, b), trio.open_nursery() as nursery:
        await spawn_agent(nursery, a, targets.allow)
        await wait_until(lambda: b.has_client(CLIENT_KEY))
        (peer_session,) = [s for s in b._peer_in if s.is_open]
        stream = peer_session.open_stream("tcp", f"127.0.0.1:{targets.echo}")
        with pytest.raises(revdial.DialError, match="invalid clientKey/proto: tcp"):
            await peer_session.dial(stream, 10)
        ok = await b.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.echo}")
        await echo_roundtrip(ok, b"still up")
        await ok.aclose()
        nursery.cancel_scope.cancel()


async def test_agent_fails_over_between_server_urls(targets: Targets) -> None:
    async with revdial.open_server(revdial.token_authorizer(token=TOKEN)) as srv:
        dead = f"ws://127.0.0.1:{_closed_port()}/connect"
        agent = revdial.Agent([dead, ws_url(srv)], headers=dict(
            (k.decode(), v.decode()) for k, v in raw_headers()), allow=targets.allow)
        assert agent.urls == (dead, ws_url(srv))
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                await nursery.start(agent.run)
            assert srv.clients() == [CLIENT_KEY]
            nursery.cancel_scope.cancel()


def _closed_port() -> int:
    return free_port()


def free_ports(n: int) -> list[int]:
    return [free_port() for _ in range(n)]


# --- DNS discovery ------------------------------------------------------------------


class StubResolver:
    def __init__(self) -> None:
        self.answer: list[str] | OSError = []
        self.calls = 0

    async def __call__(self, name: str, port: int) -> list[str]:
        await trio.lowlevel.checkpoint()
        self.calls += 1
        assert (name, port) == ("revdial-peers.ns.svc", 8123)
        if isinstance(self.answer, OSError):
            raise self.answer
        return list(self.answer)


async def test_dns_discovery_follows_the_answer() -> None:
    server = revdial.Server(revdial.token_authorizer(token=TOKEN), peer_id="10.0.0.1:8123",
                            peer_token=PEER_TOKEN)
    stub = StubResolver()
    dns = revdial.DnsPeers(server, "revdial-peers.ns.svc", 8123, resolver=stub)
    stub.answer = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    await dns.refresh()
    assert dns.resolved
    assert server.peers() == {"10.0.0.2:8123": "ws://10.0.0.2:8123/connect",
                              "10.0.0.3:8123": "ws://10.0.0.3:8123/connect"}
    stub.answer = OSError("SERVFAIL")
    await dns.refresh()  # a failed lookup keeps the peers
    assert dns.failures == 1
    assert len(server.peers()) == 2
    stub.answer = ["10.0.0.3", "10.0.0.4"]
    await dns.refresh()
    assert sorted(server.peers()) == ["10.0.0.3:8123", "10.0.0.4:8123"]
    stub.answer = []
    await dns.refresh()
    assert server.peers() == {}


async def test_dns_discovery_re_resolves_every_interval(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = revdial.Server(revdial.token_authorizer(token=TOKEN), peer_id="s",
                            peer_token=PEER_TOKEN)
    stub = StubResolver()
    stub.answer = ["10.0.0.2"]
    dns = revdial.DnsPeers(server, "revdial-peers.ns.svc", 8123, interval=10, resolver=stub,
                           scheme="wss", path="/tunnel")
    async with trio.open_nursery() as nursery:
        await nursery.start(dns.run)
        assert stub.calls == 1
        assert dns.resolved
        assert server.peers() == {"10.0.0.2:8123": "wss://10.0.0.2:8123/tunnel"}
        stub.answer = ["10.0.0.5"]
        await trio.sleep(10.5)
        assert stub.calls == 2
        assert list(server.peers()) == ["10.0.0.5:8123"]
        await trio.sleep(20)
        assert stub.calls == 4
        nursery.cancel_scope.cancel()


async def test_relay_passes_errors_hop_by_hop() -> None:
    """Both legs of a relay: a reset on one closes the other with its text."""
    from revdial.testing import open_session_pair

    async with open_session_pair() as (s1, c1), open_session_pair() as (s2, c2):
        accepted: list[revdial.TunnelStream] = []
        got = trio.Event()

        async def take(stream: revdial.TunnelStream, proto: str, address: str) -> None:
            stream.session.dial_succeeded(stream)
            accepted.append(stream)
            got.set()
            await trio.sleep_forever()

        c1._on_connect = take
        c2._on_connect = take
        outer = await s1.dial(s1.open_stream("tcp", "x:1"), 10)
        inner = await s2.dial(s2.open_stream("tcp", "y:1"), 10)
        await wait_until(lambda: len(accepted) == 2)
        far_outer, far_inner = accepted
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(relay, outer, inner, read_size=65536))
            await far_outer.send_all(b"ping")
            assert await far_inner.receive_some() == b"ping"
            await far_inner.send_all(b"pong")
            assert await far_outer.receive_some() == b"pong"
            far_inner.close_nowait("dial tcp y:1: connect: connection refused")
            with pytest.raises(revdial.StreamResetError) as info:
                await far_outer.receive_some()
            assert info.value.reason == "dial tcp y:1: connect: connection refused"
        assert s1.statistics().streams == 0
        assert s2.statistics().streams == 0


# --- command line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "env", "message"),
    [
        (["--peer", "a=ws://127.0.0.1:1/connect"], {}, "need --peer-id"),
        (["--peers-dns", "peers.local:8123"], {}, "need --peer-id"),
        (["--peer-id", "me"], {}, "needs a peer token"),
        (["--peer-id", "me", "--peer-token-file", "/nonexistent/peer-token"], {},
         "--peer-token-file"),
    ],
    ids=["peer-without-id", "dns-without-id", "id-without-token", "missing-token-file"],
)
def test_server_peering_flags_are_checked(
    extra: list[str], env: dict[str, str], message: str,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("REVDIAL_PEER_TOKEN", raising=False)
    code = main(["server", "--listen", "127.0.0.1:0", "--token", TOKEN, *extra])
    assert code == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("spec", ["noequals", "a/b=ws://h:1/c", "a=http://h:1/c", "=ws://h:1/c"])
def test_bad_peer_spec_is_a_usage_error(spec: str) -> None:
    with pytest.raises(SystemExit) as info:
        _build_parser().parse_args(["server", "--listen", "127.0.0.1:0", "--peer", spec])
    assert info.value.code == 2


def test_agent_takes_several_servers() -> None:
    args = _build_parser().parse_args(["agent", "--server", "ws://a:1/connect",
                                       "--server", "ws://b:1/connect", "--id", "c1"])
    assert args.server == ["ws://a:1/connect", "ws://b:1/connect"]
    assert parse_peer("s1=wss://10.0.0.2:8123/connect") == ("s1", "wss://10.0.0.2:8123/connect")


# --- more routing and faults ---------------------------------------------------------


async def test_half_close_through_a_peer(targets: Targets) -> None:
    """With the revdial extension on both hops, half-close passes through the relay."""
    async with peered_servers(2) as (a, b), trio.open_nursery() as nursery:
        await spawn_agent(nursery, a, targets.allow)
        await wait_until(lambda: b.has_client(CLIENT_KEY))
        stream = await b.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.sha_eof}")
        payload = b"half-closed through a peer" * 4096
        await stream.send_all(payload)
        await stream.send_eof()
        assert await receive_exactly(stream, 32) == hashlib.sha256(payload).digest()
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_front_door_reaches_an_agent_on_a_peer_with_curl() -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    users = revdial.UserTokens({"user-tok-1": [CLIENT_KEY]})
    async with peered_servers(2) as (a, b), trio.open_nursery() as nursery:
        api = StandInAPIServer()
        await nursery.start(api.serve, "127.0.0.1", 0)
        _, agent_scope = await spawn_agent(nursery, a, [f"127.0.0.1:{api.port}"])
        await wait_until(lambda: b.has_client(CLIENT_KEY))
        front_door = revdial.FrontDoor(b, users)
        await nursery.start(front_door.serve, "127.0.0.1", 0)

        async def get(path: str) -> tuple[int, str]:
            result = await trio.run_process(
                [curl, "-sS", "-o", "-", "-w", "\n%{http_code}", "-H",
                 "Authorization: Bearer user-tok-1", f"http://127.0.0.1:{front_door.port}{path}"],
                capture_stdout=True, check=True)
            body, _, code = result.stdout.decode().rpartition("\n")
            return int(code), body

        with trio.fail_after(20):
            status, body = await get(f"/client/{CLIENT_KEY}/http/127.0.0.1:{api.port}"
                                     "/revdial/echo?q=peer")
            assert status == 200, body
            assert json.loads(body)["target"] == "/revdial/echo?q=peer"
            # The agent gone from every replica: the front door says so.
            agent_scope.cancel()
            await wait_until(lambda: not b.has_client(CLIENT_KEY))
            status, body = await get(f"/client/{CLIENT_KEY}/http/127.0.0.1:{api.port}/")
            assert status == 503, body
        nursery.cancel_scope.cancel()


async def test_cancelled_dial_through_a_peer_leaves_no_entries(targets: Targets) -> None:
    dialing = trio.Event()

    async def slow(proto: str, address: str) -> trio.abc.Stream:
        dialing.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async with peered_servers(2) as (a, b), trio.open_nursery() as nursery:
        await spawn_agent(nursery, a, ["*:*"], dialer=slow)
        await wait_until(lambda: b.has_client(CLIENT_KEY))
        with trio.move_on_after(30) as scope:
            async with trio.open_nursery() as dials:
                dials.start_soon(b.dial, CLIENT_KEY, "tcp", "10.255.255.1:80")
                await dialing.wait()
                dials.cancel_scope.cancel()
        assert not scope.cancelled_caught

        # statistics() counts the streams of peer links too.
        await wait_until(lambda: a.statistics().streams == 0 and b.statistics().streams == 0)
        nursery.cancel_scope.cancel()


async def test_links_survive_a_peer_restart(targets: Targets) -> None:
    """Server B restarts on the same port: A's link comes back and re-announces."""
    (port,) = free_ports(1)
    async with trio.open_nursery() as nursery:
        a = revdial.Server(revdial.token_authorizer(token=TOKEN), peer_id="a",
                           peer_token=PEER_TOKEN)
        await nursery.start(a.serve, "127.0.0.1", 0)
        a.add_peer("b", f"ws://127.0.0.1:{port}/connect")
        await spawn_agent(nursery, a, targets.allow)
        for _ in range(2):
            b = revdial.Server(revdial.token_authorizer(token=TOKEN), peer_id="b",
                               peer_token=PEER_TOKEN)
            b_scope = trio.CancelScope()

            async def run_b(b: revdial.Server = b, b_scope: trio.CancelScope = b_scope, *,
                            task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
                with b_scope:
                    await b.serve("127.0.0.1", port, task_status=task_status)

            await nursery.start(run_b)
            with trio.fail_after(20):
                await b.wait_client(CLIENT_KEY)
            stream = await b.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{targets.echo}")
            await echo_roundtrip(stream, b"after a restart")
            await stream.aclose()
            b_scope.cancel()
            await wait_until(lambda: a.peer_statistics().links_up == 0)
        nursery.cancel_scope.cancel()


async def test_peer_sessions_are_bounded() -> None:
    async with (
        revdial.open_server(revdial.token_authorizer(token=TOKEN), peer_id="me",
                            peer_token=PEER_TOKEN, max_peer_sessions=1) as srv,
        open_raw_websocket(srv.port, peer_headers("p1")),
    ):
        await wait_until(lambda: srv.peer_statistics().sessions_in == 1)
        assert await rejected_status(srv.port, peer_headers("p2")) == 503


async def test_our_link_serves_a_go_style_peer_frame_by_frame(targets: Targets) -> None:
    """A bare WebSocket server stands in for a Go remotedialer peer: our link
    announces the agent with AddClient "c1/<key>", then serves the peer's
    plain-protocol ``Connect(2, "c1::tcp/ADDR")``: Data echoes back, and the
    peer's Error "EOF" closes the stream; RemoveClient follows the agent's end."""
    frames: trio.MemorySendChannel[Frame]
    frames, received = trio.open_memory_channel[Frame](100)
    to_send: trio.MemorySendChannel[bytes]
    to_send, outgoing = trio.open_memory_channel[bytes](100)

    async def go_peer(request: Any) -> None:
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        assert headers["x-api-tunnel-id"] == "me"
        assert headers["x-api-tunnel-token"] == PEER_TOKEN
        ws = await request.accept()  # no X-Revdial-Version answer: plain remotedialer

        async def pump_out() -> None:
            async for message in outgoing:
                await ws.send_message(message)

        async with trio.open_nursery() as n:
            n.start_soon(pump_out)
            while True:
                try:
                    message = await ws.get_message()
                except ConnectionClosed:  # our server shut the link at the end
                    n.cancel_scope.cancel()
                    return
                assert isinstance(message, bytes)
                await frames.send(decode(message))

    async with trio.open_nursery() as nursery:
        listener = await nursery.start(functools.partial(serve_websocket, go_peer, "127.0.0.1",
                                                         0, ssl_context=None))
        async with revdial.open_server(revdial.token_authorizer(token=TOKEN), peer_id="me",
                                       peer_token=PEER_TOKEN) as srv:
            _, agent_scope = await spawn_agent(nursery, srv, targets.allow)
            (agent_session,) = srv.sessions(CLIENT_KEY)
            srv.add_peer("go", f"ws://127.0.0.1:{listener.port}/connect")
            with trio.fail_after(10):
                add = await received.receive()
                assert (add.type, add.conn_id) == (MessageType.ADD_CLIENT, 0)
                assert add.payload == f"{CLIENT_KEY}/{agent_session.state.session_key}".encode()
                target = f"{CLIENT_KEY}::tcp/127.0.0.1:{targets.echo}".encode()
                await to_send.send(encode(Frame(1000, 2, MessageType.CONNECT, target)))
                await to_send.send(encode(Frame(1001, 2, MessageType.DATA, b"hello go")))
                echoed = b""
                while echoed != b"hello go":
                    frame = await received.receive()
                    if frame.type == MessageType.DATA and frame.conn_id == 2:
                        echoed += frame.payload
                await to_send.send(encode(Frame(1002, 2, MessageType.ERROR, b"EOF")))
                await wait_until(lambda: srv.statistics().streams == 0)
                agent_scope.cancel()
                while True:
                    frame = await received.receive()
                    if frame.type == MessageType.REMOVE_CLIENT:
                        assert frame.payload == add.payload
                        break
        nursery.cancel_scope.cancel()
