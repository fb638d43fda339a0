"""Fleet scale: what an idle session keeps, and a returning fleet's handshakes.

* After the 101 neither side keeps the opening handshake's objects
  (``release_handshake_state``: private attributes of trio-websocket 0.12 and
  wsproto 1.2/1.3, so the first test fails loudly on another release), and a
  session whose handshake was released still carries streams both ways and
  closes cleanly.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
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
    HANDSHAKE_TESTED_VERSIONS,
    release_handshake_state,
)


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
        ran: list[str] = []

        async def run_once(*, task_status: trio.TaskStatus[None]) -> None:
            with pytest.raises(revdial.SessionLostError, match="1000 NORMAL_CLOSURE"):
                await agent.run_once(task_status=task_status)
            ran.append("ended")

        with trio.fail_after(5):
            await nursery.start(run_once)
            await server.wait_client(CLIENT_KEY)
        (ours,) = server.sessions(CLIENT_KEY)
        theirs = agent.session
        assert theirs is not None
        for session in (ours, theirs):
            ws: Any = session.ws
            assert ws._wsproto.handshake is _OPENED_HANDSHAKE
            assert ws._initial_request is None
            # An idle session has not allocated its outbox queues.
            assert session._urgent is session._fifo is session._small is _NO_QUEUE
        assert release_handshake_state(ours.ws)  # idempotent
        # Streams still work both ways, and the session still closes cleanly.
        stream = await server.dial(CLIENT_KEY, "tcp", f"127.0.0.1:{port}")
        await echo_roundtrip(stream, b"after the handshake was released")
        await stream.aclose()
        await ours.ws.aclose()
        with trio.fail_after(5):
            await ours.ended.wait()
            await theirs.ended.wait()
        assert "WebSocket closed (1000" in str(ours.end_reason)
        assert "WebSocket closed (1000" in str(theirs.end_reason)
    assert ran == ["ended"]
