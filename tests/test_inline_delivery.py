"""Messages handed to the session inside trio-websocket's reader task.

``_InlineDelivery`` replaces the message channel's send side so that a
message is handled where it was parsed (no task switch). These tests pin its
order guarantee (messages already queued on the channel go first), its
failure path, and that inline delivery is active with the installed
trio-websocket -- there through ``revdial._wsconn.Inbox``, which replaces the
channel altogether (``tests/test_wsconn.py``); ``_InlineDelivery`` remains for
connections whose channel is trio's own -- so an upgrade that renames the
private attributes is noticed here rather than as a silent slowdown.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

import revdial
from revdial._errors import ProtocolError
from revdial._session import _InlineDelivery
from revdial._wsconn import inbox_of
from revdial.testing import FakeNetwork, echo_handler, open_session_pair


def _fake_ws(size: int = 1) -> tuple[Any, trio.MemoryReceiveChannel[bytes | str]]:
    send, receive = trio.open_memory_channel[bytes | str](size)
    return SimpleNamespace(_send_channel=send, _recv_channel=receive), receive


async def test_delivers_inline_when_nothing_is_queued() -> None:
    ws, receive = _fake_ws()
    got: list[bytes | str] = []
    inline = _InlineDelivery.install(ws, got.append)
    assert inline is not None
    assert ws._send_channel is inline
    await ws._send_channel.send(b"m1")
    assert got == [b"m1"]
    assert receive.statistics().current_buffer_used == 0


async def test_queued_messages_keep_their_place() -> None:
    ws, receive = _fake_ws(size=4)
    await ws._send_channel.send(b"m1")  # arrived before the session started
    got: list[bytes | str] = []
    inline = _InlineDelivery.install(ws, got.append)
    assert inline is not None
    await ws._send_channel.send(b"m2")  # m1 is still queued: m2 must follow it
    assert got == []
    got.append(receive.receive_nowait())
    got.append(receive.receive_nowait())
    await ws._send_channel.send(b"m3")  # queue drained: inline again
    assert got == [b"m1", b"m2", b"m3"]


async def test_failure_is_kept_and_signalled_on_the_channel() -> None:
    ws, receive = _fake_ws()

    def deliver(message: bytes | str) -> None:
        raise ProtocolError("bad frame")

    inline = _InlineDelivery.install(ws, deliver)
    assert inline is not None
    await ws._send_channel.send(b"x")
    assert isinstance(inline.failed, ProtocolError)
    assert receive.receive_nowait() == b""  # the marker that wakes Session.run (the reader)
    # Later messages are no longer handled inline.
    await ws._send_channel.send(b"y")
    assert receive.receive_nowait() == b"y"


async def test_close_is_passed_on() -> None:
    ws, receive = _fake_ws()
    inline = _InlineDelivery.install(ws, lambda m: None)
    assert inline is not None
    await ws._send_channel.aclose()
    with pytest.raises(trio.EndOfChannel):
        await receive.receive()
    with pytest.raises(trio.ClosedResourceError):
        await ws._send_channel.send(b"late")


def test_unknown_websocket_keeps_its_channel() -> None:
    ws = SimpleNamespace()
    assert _InlineDelivery.install(ws, lambda m: None) is None  # type: ignore[arg-type]


async def test_active_with_the_installed_trio_websocket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNetwork()
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        net.listen("10.0.0.5:80", echo_handler)
        async with open_session_pair(allow=["10.0.0.5:80"], dialer=net.dial) as (server, client):
            await trio.testing.wait_all_tasks_blocked()
            for session in (server, client):
                # With the tested trio-websocket the channel is revdial's Inbox
                # (tests/test_wsconn.py), which delivers inline itself.
                inbox = inbox_of(session.ws)
                assert inbox is not None
                assert inbox.delivers_inline
            stream = await server.dial(server.open_stream("tcp", "10.0.0.5:80"), 5.0)
            await stream.send_all(b"ping")
            assert await stream.receive_some() == b"ping"
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_protocol_error_inline_ends_only_that_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_session_pair() as (server, client):
        await trio.testing.wait_all_tasks_blocked()
        await client.ws.send_message("text is not allowed")
        with trio.fail_after(5):
            await server.ended.wait()
        assert isinstance(server.end_reason, revdial.ProtocolError)
        assert "text WebSocket message" in str(server.end_reason)
