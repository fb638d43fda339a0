"""Malformed WebSocket handshakes get a 4xx answer, never a session or a crash.

Raw bytes to a real ``revdial`` server on loopback, while an agent's session
is up: each bad upgrade is answered with a 4xx status (and the connection
closed), no session is registered for it, and the good session is untouched.
"""

from __future__ import annotations

from functools import partial

import pytest
import trio

import revdial
from conftest import TOKEN, agent_headers, ws_url

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's example key (16 bytes, base64)
AUTH = b"Authorization: Bearer " + TOKEN.encode() + b"\r\nX-Tunnel-ID: bad\r\n"


def upgrade(*, key: bytes = KEY, version: bytes = b"13", method: bytes = b"GET",
            extra: bytes = b"", host: bool = True, auth: bool = True) -> bytes:
    return (method + b" /connect HTTP/1.1\r\n"
            + (b"Host: rd.example\r\n" if host else b"")
            + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            + b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: " + version + b"\r\n"
            + (AUTH if auth else b"") + extra + b"\r\n")


CORPUS: dict[str, tuple[bytes, set[int]]] = {
    "no upgrade headers": (b"GET /connect HTTP/1.1\r\nHost: rd.example\r\n" + AUTH + b"\r\n",
                           {400, 426}),
    "key not base64": (upgrade(key=b"not a key!"), {400}),
    "key of 8 bytes": (upgrade(key=b"AAAAAAAAAAA="), {400}),
    "no key": (b"GET /connect HTTP/1.1\r\nHost: rd.example\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n" + AUTH + b"\r\n", {400}),
    "version 8": (upgrade(version=b"8"), {400, 426}),
    "POST": (upgrade(method=b"POST", extra=b"Content-Length: 0\r\n"), {400, 405}),
    "no Host": (upgrade(host=False), {400}),
    "HTTP/1.0": (b"GET /connect HTTP/1.0\r\n\r\n", {400}),
    "unknown path": (upgrade().replace(b"/connect", b"/elsewhere", 1), {404}),
    "no credentials": (upgrade(auth=False), {401}),
    "huge headers": (upgrade(extra=b"X-Big: " + b"a" * 200_000 + b"\r\n"), {400, 431}),
    "not HTTP": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\r\n\r\n",
                 {400}),
    "bare LF and spaces": (b"GET  /connect  HTTP/1.1\nHost:rd.example\n\n", {400}),
}


async def answer(port: int, data: bytes) -> bytes:
    """Send ``data``, read until the server closes (or resets) the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    got = bytearray()
    async with stream:
        try:
            await stream.send_all(data)
            while chunk := await stream.receive_some(65536):
                got += chunk
        except trio.BrokenResourceError:
            pass  # a reset after the answer (unread request bytes): the answer counts
    return bytes(got)


@pytest.mark.parametrize("name", CORPUS)
async def test_malformed_handshake_gets_4xx(name: str) -> None:
    data, statuses = CORPUS[name]
    authorize = revdial.token_authorizer(token=TOKEN)
    async with revdial.open_server(authorize, "127.0.0.1", 0) as server, \
            trio.open_nursery() as nursery:
        await nursery.start(partial(revdial.connect, ws_url(server), headers=agent_headers()))
        await server.wait_client("c1")
        good = server.sessions("c1")[0]
        with trio.fail_after(15):
            raw = await answer(server.port, data)
        assert raw.startswith(b"HTTP/1.1 "), raw[:100]
        status = int(raw[9:12])
        assert status in statuses, (name, raw[:200])
        assert server.statistics().sessions == 1  # the bad one got none
        assert server.clients() == ["c1"]
        assert good.is_open
        with trio.fail_after(10):
            stream = await server.dial("c1", "tcp", "127.0.0.1:1", wait=False)
            with pytest.raises(revdial.DialRefusedError):
                await stream.receive_some()  # the agent allows nothing: still answering
        nursery.cancel_scope.cancel()
