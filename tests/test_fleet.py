"""Fleet scale: what an idle session keeps, and a returning fleet's handshakes.

* After the 101 neither side keeps the opening handshake's objects
  (``release_handshake_state``: private attributes of trio-websocket 0.12 and
  wsproto 1.2/1.3, so the first test fails loudly on another release), and a
  session whose handshake was released still carries streams both ways.
* An idle session holds no writer task: the first queued frame starts one,
  and the reader retires it at its keepalive deadline once it is idle; a
  retired writer is started again by the next frame (MockClock).
"""

from __future__ import annotations

from typing import Any

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
    HANDSHAKE_TESTED_VERSIONS,
    release_handshake_state,
)
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
