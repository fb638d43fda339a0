"""revdial protocol extension v1: negotiation, confirmed dial, half-close.

Wire level (our own vectors), the sans-I/O state, the driver in virtual time
(dial timeouts with ``MockClock``), and negotiation between real servers and
agents on loopback with the extension switched off on either side (which is
what a Go peer looks like). Loopback data paths with half-close are in
``test_e2e.py`` (``test_half_close``, ``test_forward_half_close``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import revdial
from revdial._frames import ExtType, Frame, MessageType, decode, encode
from revdial._session import EXTENSION_HEADER, negotiate_extensions
from revdial._state import (
    Closed,
    DataReceived,
    DialConfirmed,
    PeerHalfClosed,
    Reset,
    Role,
    SessionState,
)
from revdial.testing import FakeNetwork, echo_handler, open_session_pair

VECTORS = Path(__file__).parent / "vectors" / "revdial-ext-frames.json"


# --- wire format -----------------------------------------------------------------


def load_vectors() -> list[dict[str, Any]]:
    doc = json.loads(VECTORS.read_text())
    assert doc["types"] == {"CONNECT_OK": int(ExtType.CONNECT_OK),
                            "HALF_CLOSE": int(ExtType.HALF_CLOSE)}
    vectors: list[dict[str, Any]] = doc["vectors"]
    return vectors


@pytest.mark.parametrize("vector", load_vectors(), ids=lambda v: str(v["name"]))
def test_extension_vectors_round_trip(vector: dict[str, Any]) -> None:
    frame = Frame(vector["msg_id"], vector["conn_id"], vector["type"],
                  bytes.fromhex(vector["payload_hex"]))
    assert encode(frame).hex() == vector["encoded_hex"]
    decoded = decode(bytes.fromhex(vector["encoded_hex"]))
    assert decoded == frame
    assert decoded.deadline is None  # only Data and Connect carry one


def test_extension_types_do_not_collide_with_go() -> None:
    assert {int(t) for t in ExtType}.isdisjoint(int(t) for t in MessageType)
    assert min(int(t) for t in ExtType) > max(int(t) for t in MessageType)


@pytest.mark.parametrize(
    ("offer", "supported", "expected"),
    [(None, 1, 0), ("", 1, 0), ("1", 1, 1), ("7", 1, 1), ("1", 0, 0), ("x", 1, 0),
     ("-3", 1, 0), (" 1 ", 1, 1)],
)
def test_negotiation(offer: str | None, supported: int, expected: int) -> None:
    assert negotiate_extensions(offer, supported) == expected


# --- sans-I/O state --------------------------------------------------------------


def frame(conn_id: int, mtype: int, payload: bytes = b"") -> bytes:
    return encode(Frame(99, conn_id, mtype, payload))


def decoded(frames: list[bytes]) -> list[tuple[int, int, bytes]]:
    return [(f.type, f.conn_id, f.payload) for f in map(decode, frames)]


def test_state_confirmed_dial_and_half_close_both_ways() -> None:
    opener = SessionState(Role.SERVER, extensions=1)
    dialer = SessionState(Role.CLIENT, extensions=1)
    cid = opener.open("tcp", "10.0.0.5:80", now=0.0)
    (connect,) = opener.take_ordered()
    dialer.receive(connect, now=0.0)
    dialer.dial_succeeded(cid)
    (ok,) = dialer.take_ordered()
    assert decoded([ok]) == [(ExtType.CONNECT_OK, cid, b"")]
    assert opener.receive(ok, now=0.0) == DialConfirmed(cid)
    assert opener.receive(ok, now=0.0) is None  # a duplicate means nothing

    # Opener half-closes: the dialer may still send.
    assert opener.send_eof(cid)
    assert not opener.send_eof(cid)  # idempotent, nothing more queued
    (eof,) = opener.take_ordered()
    assert dialer.receive(eof, now=0.0) == PeerHalfClosed(cid, retired=False)
    assert dialer.receive(frame(cid, ExtType.HALF_CLOSE), now=0.0) is None
    assert cid in dialer.conns
    assert opener.receive(frame(cid, MessageType.DATA, b"answer"), now=0.0) == DataReceived(
        cid, b"answer"
    )
    # Dialer half-closes too: both retire the id, no Error frame at all.
    assert dialer.send_eof(cid)
    assert cid not in dialer.conns
    (eof2,) = dialer.take_ordered()
    assert opener.receive(eof2, now=0.0) == PeerHalfClosed(cid, retired=True)
    assert cid not in opener.conns
    assert not opener.close(cid)  # already retired: nothing is sent
    assert opener.take_ordered() == []
    assert dialer.take_ordered() == []


def test_state_data_after_half_close_resets_only_that_stream() -> None:
    state = SessionState(Role.SERVER, extensions=1)
    cid = state.open("tcp", "a:1", now=0.0)
    other = state.open("tcp", "a:2", now=0.0)
    state.take_ordered()
    state.receive(frame(cid, ExtType.HALF_CLOSE), now=0.0)
    event = state.receive(frame(cid, MessageType.DATA, b"late"), now=0.0)
    assert isinstance(event, Reset)
    assert event.conn_id == cid
    assert decoded(state.take_ordered()) == [(MessageType.ERROR, cid, event.reason.encode())]
    assert cid not in state.conns
    assert other in state.conns


def test_state_without_extension_ignores_extension_frames() -> None:
    """A base-protocol session treats them as unknown types, as Go does."""
    state = SessionState(Role.SERVER)
    cid = state.open("tcp", "a:1", now=0.0)
    state.take_ordered()
    assert state.receive(frame(cid, ExtType.CONNECT_OK), now=0.0) is None
    assert state.receive(frame(cid, ExtType.HALF_CLOSE), now=0.0) is None
    assert state.receive(frame(cid, MessageType.DATA, b"x"), now=0.0) == DataReceived(cid, b"x")
    with pytest.raises(revdial.ProtocolError):
        state.send_eof(cid)
    dialer = SessionState(Role.CLIENT)
    dialer.receive(frame(5, MessageType.CONNECT, b"tcp/a:1"), now=0.0)
    dialer.dial_succeeded(5)
    assert dialer.take_ordered() == []  # no CONNECT_OK to a plain peer


def test_state_error_before_confirmation_is_the_dial_failure() -> None:
    state = SessionState(Role.SERVER, extensions=1)
    cid = state.open("tcp", "a:1", now=0.0)
    text = b"dial tcp a:1: connect: connection refused"
    assert state.receive(frame(cid, MessageType.ERROR, text), now=0.0) == Closed(
        cid, text.decode(), received_data=False
    )


# --- the driver, in virtual time --------------------------------------------------


@pytest.fixture
async def net() -> Any:
    network = FakeNetwork()
    async with trio.open_nursery() as nursery:
        await nursery.start(network.run)
        network.listen("10.0.0.5:80", echo_handler)
        network.blackhole("10.9.9.9:80")
        yield network
        nursery.cancel_scope.cancel()


ALLOW = ["10.0.0.5:80", "10.0.0.6:80", "10.9.9.9:80"]


async def test_confirmed_dial_refused_fast(
    autojump_clock: trio.testing.MockClock, net: FakeNetwork
) -> None:
    async with open_session_pair(allow=ALLOW, dialer=net.dial) as (server, _):
        start = trio.current_time()
        with pytest.raises(revdial.DialConnectionRefusedError) as info:
            await server.dial(server.open_stream("tcp", "10.0.0.6:80"), 35.0)
        assert trio.current_time() == start  # no timer involved
        assert "connection refused" in info.value.reason
        with pytest.raises(revdial.DialRefusedError):
            await server.dial(server.open_stream("tcp", "10.0.0.7:80"), 35.0)
        stream = await server.dial(server.open_stream("tcp", "10.0.0.5:80"), 35.0)
        await stream.send_all(b"ping")
        assert await stream.receive_some() == b"ping"
        await stream.aclose()
        assert server.statistics().streams == 0


async def test_blackholed_target_fails_at_the_agents_dial_timeout(
    autojump_clock: trio.testing.MockClock, net: FakeNetwork
) -> None:
    """The agent's own timeout (30 s) fires before ours (35 s): its text wins."""
    async with open_session_pair(allow=ALLOW, dialer=net.dial) as (server, client):
        start = trio.current_time()
        with pytest.raises(revdial.DialTimeoutError) as info:
            await server.dial(server.open_stream("tcp", "10.9.9.9:80"), 35.0)
        assert trio.current_time() - start == client.limits.dial_timeout
        assert "i/o timeout" in info.value.reason
        assert server.statistics().streams == 0
        assert client.statistics().streams == 0


async def test_blackholed_target_fails_at_our_connect_timeout(
    autojump_clock: trio.testing.MockClock, net: FakeNetwork
) -> None:
    async with open_session_pair(allow=ALLOW, dialer=net.dial) as (server, client):
        start = trio.current_time()
        with pytest.raises(revdial.DialTimeoutError, match=r"no answer within 5 s"):
            await server.dial(server.open_stream("tcp", "10.9.9.9:80"), 5.0)
        assert trio.current_time() - start == 5.0
        assert server.statistics().streams == 0
        # Our Error reaches the agent, whose dial task is then cancelled...
        await trio.testing.wait_all_tasks_blocked()
        # ...or, at the latest, ends with its own timeout; either way it is gone.
        await trio.sleep(client.limits.dial_timeout)
        assert client.statistics().streams == 0


async def test_plain_peer_first_byte_timeout(
    autojump_clock: trio.testing.MockClock, net: FakeNetwork
) -> None:
    """Without the extension, the timeout bounds the wait for the first byte."""
    async with open_session_pair(allow=ALLOW, dialer=net.dial, extensions=0) as (server, _):
        start = trio.current_time()
        stream = await server.dial(server.open_stream("tcp", "10.9.9.9:80"), 5.0)
        assert trio.current_time() == start  # returned at once: not confirmed
        with pytest.raises(revdial.DialTimeoutError, match=r"no answer within 5 s"):
            await stream.receive_some()
        assert trio.current_time() - start == 5.0
        assert server.statistics().streams == 0
        # A target that answers in time is unaffected, and so is a stream
        # that stays idle after its first byte.
        ok = await server.dial(server.open_stream("tcp", "10.0.0.5:80"), 5.0)
        await ok.send_all(b"x")
        assert await ok.receive_some() == b"x"
        with trio.move_on_after(60):
            await ok.receive_some()
        assert ok.session.is_open
        assert server.statistics().streams == 1


async def test_cancelled_confirmed_dial_leaves_no_entry(
    autojump_clock: trio.testing.MockClock, net: FakeNetwork
) -> None:
    async with open_session_pair(allow=ALLOW, dialer=net.dial) as (server, client):
        with trio.move_on_after(1):
            await server.dial(server.open_stream("tcp", "10.9.9.9:80"), 35.0)
        assert server.statistics().streams == 0
        await trio.sleep(client.limits.dial_timeout + 1)
        assert client.statistics().streams == 0


async def test_early_data_follows_the_connect_before_confirmation(
    autojump_clock: trio.testing.MockClock, net: FakeNetwork
) -> None:
    """``wait=False``: the first bytes travel behind the Connect, before CONNECT_OK."""
    release = trio.Event()

    async def slow_dial(proto: str, address: str) -> trio.abc.Stream:
        await release.wait()
        return await net.dial(proto, address)

    async with open_session_pair(allow=ALLOW, dialer=slow_dial) as (server, client):
        stream = await server.dial(server.open_stream("tcp", "10.0.0.5:80"), 35.0, wait=False)
        await stream.send_all(b"hello")
        await trio.testing.wait_all_tasks_blocked()
        # The agent is still dialling, and already holds the bytes.
        assert client.statistics().buffered_bytes == 5
        release.set()
        assert await stream.receive_some() == b"hello"
        await stream.aclose()


async def test_early_data_dial_failure_surfaces_from_receive(
    autojump_clock: trio.testing.MockClock, net: FakeNetwork
) -> None:
    async with open_session_pair(allow=ALLOW, dialer=net.dial) as (server, client):
        stream = await server.dial(server.open_stream("tcp", "10.0.0.6:80"), 35.0, wait=False)
        await stream.send_all(b"lost")  # dropped by the agent: nothing to deliver it to
        with pytest.raises(revdial.DialConnectionRefusedError):
            await stream.receive_some()
        stream = await server.dial(server.open_stream("tcp", "10.0.0.7:80"), 35.0, wait=False)
        with pytest.raises(revdial.DialRefusedError):
            await stream.receive_some()
        await trio.testing.wait_all_tasks_blocked()
        assert server.statistics().streams == 0
        assert client.statistics().streams == 0
        assert server.is_open
        assert client.is_open


async def test_early_data_timeout_covers_only_the_dial(
    autojump_clock: trio.testing.MockClock, net: FakeNetwork
) -> None:
    """The connect timeout bounds the confirmation; a connected target may stay silent."""
    async with open_session_pair(allow=ALLOW, dialer=net.dial) as (server, _):
        start = trio.current_time()
        stream = await server.dial(server.open_stream("tcp", "10.9.9.9:80"), 5.0, wait=False)
        assert trio.current_time() == start
        with pytest.raises(revdial.DialTimeoutError):
            await stream.receive_some()
        assert trio.current_time() - start == 5.0
        assert server.statistics().streams == 0
        quiet = await server.dial(server.open_stream("tcp", "10.0.0.5:80"), 5.0, wait=False)
        with trio.move_on_after(60) as scope:
            await quiet.receive_some()  # the echo target says nothing unprompted
        assert scope.cancelled_caught
        await quiet.send_all(b"x")
        assert await quiet.receive_some() == b"x"


# --- negotiation between real peers ---------------------------------------------------


@pytest.mark.parametrize(
    ("server_ext", "agent_ext", "expected"),
    [(True, True, 1), (True, False, 0), (False, True, 0), (False, False, 0)],
    ids=["both", "plain-agent", "plain-server", "neither"],
)
async def test_negotiation_matrix(
    server_ext: bool, agent_ext: bool, expected: int, echo_server: int
) -> None:
    authorize = revdial.token_authorizer(token="t")
    async with (
        revdial.open_server(authorize, extensions=server_ext) as server,
        trio.open_nursery() as nursery,
    ):
        agent = revdial.Agent(
            f"ws://127.0.0.1:{server.port}/connect",
            headers={"X-Tunnel-ID": "k", "Authorization": "Bearer t"},
            allow=[f"127.0.0.1:{echo_server}", "127.0.0.1:1"],
            extensions=agent_ext,
        )
        with trio.fail_after(10):
            await nursery.start(agent.run)
            await server.wait_client("k")
        (session,) = server.sessions("k")
        assert session.extensions == expected
        assert agent.session is not None
        assert agent.session.extensions == expected
        with trio.fail_after(10):
            stream = await server.dial("k", "tcp", f"127.0.0.1:{echo_server}")
            assert stream.supports_half_close == bool(expected)
            await stream.send_all(b"hello")
            assert await stream.receive_some() == b"hello"
            if expected:
                await stream.send_eof()
                assert await stream.receive_some() == b""  # the echo server closed too
            else:
                with pytest.raises(revdial.HalfCloseUnsupportedError):
                    await stream.send_eof()
            await stream.aclose()
            # A closed port: confirmed dial raises at once; plain, on first receive.
            if expected:
                with pytest.raises(revdial.DialConnectionRefusedError):
                    await server.dial("k", "tcp", "127.0.0.1:1")
            else:
                failed = await server.dial("k", "tcp", "127.0.0.1:1")
                with pytest.raises(revdial.DialConnectionRefusedError):
                    await failed.receive_some()
        nursery.cancel_scope.cancel()


async def test_server_answers_the_version_header(echo_server: int) -> None:
    """The 101 carries ``X-Revdial-Version`` only when the agent offered it."""
    from trio_websocket import wrap_client_stream

    authorize = revdial.token_authorizer(token="t")
    async with revdial.open_server(authorize) as server:
        for offer, expected in ((None, None), ("1", "1"), ("99", "1")):
            headers = [(b"X-Tunnel-ID", b"k"), (b"Authorization", b"Bearer t")]
            if offer is not None:
                headers.append((EXTENSION_HEADER.encode(), offer.encode()))
            tcp = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with tcp, trio.open_nursery() as nursery:
                ws = await wrap_client_stream(
                    nursery, tcp, "127.0.0.1", "/connect", extra_headers=headers
                )
                answer = dict(
                    (k.decode().lower(), v.decode()) for k, v in ws.handshake_headers
                ).get(EXTENSION_HEADER.lower())
                assert answer == expected
                nursery.cancel_scope.cancel()


