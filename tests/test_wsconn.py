"""``revdial._wsconn.Inbox``: what stands in for trio-websocket's message channel.

The Inbox replaces private attributes of trio-websocket 0.12 (the first test
fails loudly on another release, so it is checked before
``INBOX_TESTED_VERSIONS`` grows). The others pin its channel semantics (one
sender, one receiver, ``limit`` messages): order, inline delivery only when
nothing is queued, the failure marker, both ways of closing, the bound, and
cancellation of a waiting receive. All in virtual time, no sockets.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
import trio_websocket

from revdial._errors import ProtocolError
from revdial._wsconn import INBOX_TESTED_VERSIONS, Inbox, _InboxSend, inbox_supported


def test_inbox_knows_the_installed_trio_websocket() -> None:
    version = trio_websocket.__version__
    assert version.startswith(INBOX_TESTED_VERSIONS), (
        f"trio-websocket {version} is not a release the Inbox was tested with: check "
        "WebSocketConnection (_send_channel/_recv_channel use, _reader_task, _get_request, "
        "_open_handshake) and wrap_server_stream/wrap_client_stream, then extend "
        "INBOX_TESTED_VERSIONS"
    )
    assert inbox_supported()


async def test_messages_queue_until_delivery_is_installed_then_go_inline() -> None:
    inbox = Inbox(limit=4)
    sender = _InboxSend(inbox)
    await sender.send(b"m1")  # before the session started: queued
    got: list[bytes | str] = []
    inbox.deliver_inline(got.append)
    await sender.send(b"m2")  # m1 is still queued: m2 must follow it
    assert got == []
    assert inbox.queued == 2
    assert await inbox.receive() == b"m1"
    assert await inbox.receive() == b"m2"
    assert inbox._queue is None  # an empty inbox holds no list
    await sender.send(b"m3")  # nothing queued: handled inline
    assert got == [b"m3"]
    assert inbox.queued == 0


async def test_a_failing_delivery_is_kept_and_wakes_the_receiver() -> None:
    inbox = Inbox()
    sender = _InboxSend(inbox)

    def deliver(message: bytes | str) -> None:
        raise ProtocolError("bad frame")

    inbox.deliver_inline(deliver)
    await sender.send(b"x")
    assert isinstance(inbox.failed, ProtocolError)
    assert not inbox.delivers_inline
    assert await inbox.receive() == b""  # the marker
    await sender.send(b"y")  # later messages queue
    assert await inbox.receive() == b"y"


async def test_closing_the_send_side_ends_the_receiver_after_the_queue() -> None:
    inbox = Inbox(limit=2)
    async with _InboxSend(inbox) as sender:
        await sender.send(b"last")
    assert await inbox.receive() == b"last"
    with pytest.raises(trio.EndOfChannel):
        await inbox.receive()
    with pytest.raises(trio.ClosedResourceError):
        await _InboxSend(inbox).send(b"late")


async def test_closing_the_receive_side_breaks_the_sender_and_drops_the_queue() -> None:
    inbox = Inbox(limit=2)
    sender = _InboxSend(inbox)
    await sender.send(b"unread")
    await inbox.aclose()
    assert inbox.queued == 0
    with pytest.raises(trio.BrokenResourceError):
        await sender.send(b"more")
    with pytest.raises(trio.ClosedResourceError):
        await inbox.receive()


async def test_a_full_inbox_makes_the_sender_wait(autojump_clock: trio.abc.Clock) -> None:
    inbox = Inbox(limit=1)
    sender = _InboxSend(inbox)
    sent: list[bytes] = []

    async def send_two() -> None:
        for message in (b"a", b"b"):
            await sender.send(message)
            sent.append(message)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_two)
        await trio.testing.wait_all_tasks_blocked()
        assert sent == [b"a"]  # b waits for room
        assert await inbox.receive() == b"a"
        await trio.testing.wait_all_tasks_blocked()
        assert sent == [b"a", b"b"]
        assert await inbox.receive() == b"b"


async def test_a_waiting_sender_sees_the_receive_side_close(
    autojump_clock: trio.abc.Clock,
) -> None:
    inbox = Inbox(limit=1)
    sender = _InboxSend(inbox)
    await sender.send(b"a")
    broken: list[BaseException] = []

    async def send() -> None:
        with pytest.raises(trio.BrokenResourceError) as info:
            await sender.send(b"b")
        broken.append(info.value)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        await trio.testing.wait_all_tasks_blocked()
        await inbox.aclose()
    assert len(broken) == 1


async def test_a_cancelled_receive_leaves_no_waiter(autojump_clock: trio.abc.Clock) -> None:
    inbox = Inbox()
    with trio.move_on_after(1):
        await inbox.receive()
    assert inbox._waiter is None
    got: list[bytes | str] = []

    async def receive() -> None:
        got.append(await inbox.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await inbox.receive()  # one receiver at a time
        await _InboxSend(inbox).send(b"after")
    assert got == [b"after"]
