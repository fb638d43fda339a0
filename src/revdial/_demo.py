"""``revdial demo``: the whole tunnel on loopback, with no configuration.

One process, loopback ephemeral ports: a TCP echo service and a stand-in
Kubernetes API server (plain HTTP: the demo needs nothing beyond the
package) behind an agent that serves the HTTP reverse proxy; a server with a
``--forward`` and the HTTP front door. The walk-through shows the agent
connecting, a port-forward round trip, a GET and a streaming watch through
the front door (events with their arrival times), then prints how to do the
same by hand. ``--keep-running`` leaves everything up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import secrets
import statistics
import time
from functools import partial

import trio

from ._agent import Agent
from ._errors import DialError
from ._frontdoor import FrontDoor, UserTokens
from ._proxy import PROXY_TARGET, ReverseProxy
from ._server import Server, token_authorizer
from ._splice import splice
from ._standin import HTTPConnection, StandInAPIServer

__all__ = ["run_demo"]


def _say(text: str = "") -> None:
    print(text, flush=True)


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        async for data in stream:
            await stream.send_all(data)


async def run_demo(args: argparse.Namespace) -> None:
    if args.log_level == "info":  # keep the walk-through readable
        logging.getLogger("revdial").setLevel(logging.ERROR)
    token = secrets.token_urlsafe(16)
    user_token = secrets.token_urlsafe(16)
    http = not getattr(args, "no_proxy", False)
    async with trio.open_nursery() as nursery:
        echo = await nursery.start(partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
        echo_port = echo[0].socket.getsockname()[1]
        server = Server(token_authorizer(token=token))
        await nursery.start(server.serve, "127.0.0.1", 0)
        url = f"ws://127.0.0.1:{server.port}/connect"
        _say("revdial demo: everything below runs in this process, on 127.0.0.1")
        _say(f"  target service   : TCP echo server on 127.0.0.1:{echo_port} (behind the agent)")
        services = {}
        if http:
            api = StandInAPIServer()
            await nursery.start(api.serve, "127.0.0.1", 0)
            api.create_configmap("default", "app-config", {"greeting": "hello"})
            api.create_configmap("default", "feature-flags", {"beta": "true"})
            proxy = ReverseProxy(f"http://127.0.0.1:{api.port}")
            services[PROXY_TARGET] = proxy
            front_door = FrontDoor(server, UserTokens({user_token: ["demo-agent"]}))
            await nursery.start(front_door.serve, "127.0.0.1", 0)
            _say(f"  API server       : stand-in Kubernetes API on http://127.0.0.1:{api.port} "
                 "(behind the agent)")
        _say(f"  revdial server   : {url}")
        if http:
            _say(f"  front door       : http://127.0.0.1:{front_door.port}"
                 "/k8s/clusters/demo-agent/...")

        agent = Agent(
            url,
            headers={"X-Tunnel-ID": "demo-agent", "Authorization": f"Bearer {token}"},
            allow=[f"127.0.0.1:{echo_port}"],
            services=services,
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

        try:
            # A revdial agent answers at dial() time; a plain (Go) one on first use.
            stream = await server.dial("demo-agent", "tcp", "127.0.0.1:22")
            await stream.receive_some()
            _say("5. unexpected: the agent dialled a target it was not allowed")
        except DialError as exc:
            _say(f"5. the agent refuses what it was not allowed: {type(exc).__name__}: "
                 f"{exc.reason}")

        if http:
            await _http_walkthrough(api, front_door.port, user_token)

        _say()
        _say("The same by hand, in two terminals:")
        _say("  revdial server --listen 127.0.0.1:8123 --token s3cret \\")
        _say("      --forward 127.0.0.1:2222=laptop/127.0.0.1:22")
        _say("  revdial agent --server ws://127.0.0.1:8123/connect --id laptop \\")
        _say("      --token s3cret --allow 127.0.0.1:22")
        _say("  ssh -p 2222 localhost      # reaches the agent's sshd through the tunnel")
        if http:
            _say()
            _say("And a cluster behind the agent, reached through the server's front door:")
            _say("  echo 'user-s3cret laptop' > users.txt")
            _say("  revdial server --listen 127.0.0.1:8123 --token s3cret \\")
            _say("      --http-listen 127.0.0.1:8080 --user-tokens users.txt")
            _say("  revdial agent --server ws://127.0.0.1:8123/connect --id laptop \\")
            _say("      --token s3cret --upstream https://10.0.0.1:6443 --upstream-ca ca.crt \\")
            _say("      --upstream-token-file /var/run/secrets/kubernetes.io/serviceaccount/token")
            _say("  revdial kubeconfig --server http://127.0.0.1:8080 --cluster laptop \\")
            _say("      --token user-s3cret > kubeconfig")
            _say("  kubectl --kubeconfig kubeconfig get configmaps --watch")
        if getattr(args, "keep_running", False):
            _say()
            _say(f"Still running: try  nc 127.0.0.1 {fwd_port}  (Ctrl-C to stop)")
            if http:
                base = f"http://127.0.0.1:{front_door.port}/k8s/clusters/demo-agent"
                _say(f"  curl -H 'Authorization: Bearer {user_token}' {base}/version")
                _say(f"  curl -N -H 'Authorization: Bearer {user_token}' \\")
                _say(f"      '{base}/api/v1/namespaces/default/configmaps?watch=1'")
                _say(f"  revdial kubeconfig --server http://127.0.0.1:{front_door.port} "
                     f"--cluster demo-agent --token {user_token}")
            await trio.sleep_forever()
        if http:
            await proxy.aclose()
        nursery.cancel_scope.cancel()


async def _http_walkthrough(api: StandInAPIServer, port: int, user_token: str) -> None:
    """Steps 6-8: a GET, a streaming watch and the front door's auth, over HTTP."""
    base = "/k8s/clusters/demo-agent"
    auth = [("Authorization", f"Bearer {user_token}")]
    async with await HTTPConnection.open("127.0.0.1", port) as conn:
        t = time.perf_counter()
        resp = await conn.request("GET", f"{base}/api/v1/namespaces/default/configmaps",
                                  headers=auth)
        names = ", ".join(item["metadata"]["name"] for item in resp.json()["items"])
        _say(f"6. GET {base}/api/v1/namespaces/default/configmaps -> {resp.status} "
             f"in {_ms(t)}: {names}")
        _say("   (front door -> tunnel -> agent's reverse proxy -> API server; the user's "
             "token stays at the front door)")

    async with await HTTPConnection.open("127.0.0.1", port) as conn, conn.stream_request(
        "GET", f"{base}/api/v1/namespaces/default/configmaps?watch=1&resourceVersion="
        f"{api.configmaps()[-1]['metadata']['resourceVersion']}", headers=auth,
    ) as (resp, chunks):
        _say(f"7. watch opened ({resp.status}, chunked); a controller creates three config "
             "maps, 100 ms apart:")
        t0 = time.perf_counter()
        buf = b""
        for i in range(3):
            await trio.sleep(0.1)  # demo pacing: one change every 100 ms
            created = time.perf_counter()
            api.create_configmap("default", f"job-{i}", {"step": str(i)})
            while b"\n" not in buf:
                buf += await chunks.__anext__()
            line, _, buf = buf.partition(b"\n")
            event = json.loads(line)
            _say(f"   +{(time.perf_counter() - t0) * 1e3:5.0f} ms  {event['type']:<8} "
                 f"{event['object']['metadata']['name']:<8} (arrived "
                 f"{(time.perf_counter() - created) * 1e3:.1f} ms after the change)")

    async with await HTTPConnection.open("127.0.0.1", port) as conn:
        no_token = await conn.request("GET", f"{base}/version")
    async with await HTTPConnection.open("127.0.0.1", port) as conn:
        other = await conn.request("GET", "/k8s/clusters/elsewhere/version", headers=auth)
    _say(f"8. without a token: {no_token.status}; a cluster this token may not reach: "
         f"{other.status} ({other.text.strip()})")


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
