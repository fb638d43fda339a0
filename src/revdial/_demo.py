"""``revdial demo``: the whole tunnel on loopback, with no configuration."""

from __future__ import annotations

import argparse
import hashlib
import logging
import secrets
import statistics
import time
from functools import partial

import trio

from ._agent import Agent
from ._errors import DialError
from ._server import Server, token_authorizer
from ._splice import splice

__all__ = ["run_demo"]


def _say(text: str = "") -> None:
    print(text, flush=True)


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        async for data in stream:
            await stream.send_all(data)


async def run_demo(args: argparse.Namespace) -> None:
    if args.log_level == "info":  # keep the walk-through readable
        logging.getLogger("revdial").setLevel(logging.WARNING)
    token = secrets.token_urlsafe(16)
    async with trio.open_nursery() as nursery:
        echo = await nursery.start(partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
        echo_port = echo[0].socket.getsockname()[1]
        server = Server(token_authorizer(token=token))
        await nursery.start(server.serve, "127.0.0.1", 0)
        url = f"ws://127.0.0.1:{server.port}/connect"
        _say("revdial demo: everything below runs in this process, on 127.0.0.1")
        _say(f"  target service   : TCP echo server on 127.0.0.1:{echo_port} (behind the agent)")
        _say(f"  revdial server   : {url}")

        agent = Agent(
            url,
            headers={"X-Tunnel-ID": "demo-agent", "Authorization": f"Bearer {token}"},
            allow=[f"127.0.0.1:{echo_port}"],
        )
        t0 = time.perf_counter()
        await nursery.start(agent.run)
        await server.wait_client("demo-agent")
        _say(f"1. agent 'demo-agent' connected its WebSocket in {_ms(t0)}")

        # A forward, exactly what `revdial server --forward` does.
        async def forward(local: trio.SocketStream) -> None:
            tunnel = await server.dial("demo-agent", "tcp", f"127.0.0.1:{echo_port}")
            await splice(tunnel, local, read_size=server.limits.read_size)

        fwd = await nursery.start(partial(trio.serve_tcp, forward, 0, host="127.0.0.1"))
        fwd_port = fwd[0].socket.getsockname()[1]
        _say(f"2. forward 127.0.0.1:{fwd_port} -> demo-agent -> 127.0.0.1:{echo_port}")

        client = await trio.open_tcp_stream("127.0.0.1", fwd_port)
        times = []
        for i in range(200):
            t = time.perf_counter()
            await client.send_all(b"ping %d\n" % i)
            await _receive_exactly(client, len(b"ping %d\n" % i))
            times.append(time.perf_counter() - t)
        _say(
            "3. 200 round trips through the forward: "
            f"p50 {statistics.median(times) * 1e3:.2f} ms, max {max(times) * 1e3:.2f} ms"
        )

        size = 64 * 1024 * 1024
        blob = secrets.token_bytes(1024 * 1024)
        sent = hashlib.sha256()
        received = hashlib.sha256()
        t = time.perf_counter()
        async with trio.open_nursery() as inner:

            async def upload() -> None:
                for _ in range(size // len(blob)):
                    await client.send_all(blob)
                    sent.update(blob)

            inner.start_soon(upload)
            got = 0
            while got < size:
                data = await client.receive_some(256 * 1024)
                received.update(data)
                got += len(data)
        elapsed = time.perf_counter() - t
        same = "identical" if sent.digest() == received.digest() else "DIFFERENT (bug!)"
        _say(
            f"4. 64 MiB echoed through the tunnel in {elapsed:.2f} s "
            f"({size * 8 / elapsed / 1e9:.2f} Gbit/s each way); checksums {same}"
        )
        await client.aclose()

        stream = await server.dial("demo-agent", "tcp", "127.0.0.1:22")
        try:
            await stream.receive_some()
            _say("5. unexpected: the agent dialled a target it was not allowed")
        except DialError as exc:
            _say(f"5. the agent refuses what it was not allowed: {type(exc).__name__}: "
                 f"{exc.reason}")

        _say()
        _say("The same by hand, in two terminals:")
        _say("  revdial server --listen 127.0.0.1:8123 --token s3cret \\")
        _say("      --forward 127.0.0.1:2222=laptop/127.0.0.1:22")
        _say("  revdial agent --server ws://127.0.0.1:8123/connect --id laptop \\")
        _say("      --token s3cret --allow 127.0.0.1:22")
        _say("  ssh -p 2222 localhost      # reaches the agent's sshd through the tunnel")
        if getattr(args, "keep_running", False):
            _say()
            _say(f"Still running: try  nc 127.0.0.1 {fwd_port}  (Ctrl-C to stop)")
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()


async def _receive_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        if not data:
            raise EOFError("connection closed early")
        buf += data
    return bytes(buf)


def _ms(t0: float) -> str:
    return f"{(time.perf_counter() - t0) * 1e3:.1f} ms"
