"""``revdial demo``: the whole tunnel on loopback, with no configuration.

One process, loopback ephemeral ports: a TCP echo service and a stand-in
Kubernetes API server (plain HTTP: the demo needs nothing beyond the
package) behind an agent that serves the HTTP reverse proxy; a server with a
``--forward`` and the front door over HTTPS, with a certificate from a
throw-away CA made for this run (kubectl sends its token only over TLS). The
walk-through shows the agent connecting, a port-forward round trip, a GET and
a streaming watch through the front door (events with their arrival times),
``kubectl get pods`` if kubectl is installed, then prints how to do the same
by hand. ``--keep-running`` leaves everything up.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import secrets
import shutil
import ssl
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import trio
import trustme

from ._agent import Agent
from ._errors import DialError
from ._frontdoor import FrontDoor, UserTokens, make_kubeconfig
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
    with tempfile.TemporaryDirectory(prefix="revdial-demo-") as tmp:
        await _run_demo(args, Path(tmp), token, user_token, http=http)


async def _run_demo(
    args: argparse.Namespace, tmp: Path, token: str, user_token: str, *, http: bool
) -> None:
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
            api.create_pod("default", "web-0")
            api.create_pod("default", "web-1")
            proxy = ReverseProxy(f"http://127.0.0.1:{api.port}")
            services[PROXY_TARGET] = proxy
            server_tls, client_tls, ca_file = _throwaway_tls(tmp)
            front_door = FrontDoor(server, UserTokens({user_token: ["demo-agent"]}),
                                   ssl_context=server_tls)
            await nursery.start(front_door.serve, "127.0.0.1", 0)
            _say(f"  API server       : stand-in Kubernetes API on http://127.0.0.1:{api.port} "
                 "(behind the agent)")
        _say(f"  revdial server   : {url}")
        if http:
            _say(f"  front door       : https://127.0.0.1:{front_door.port}"
                 "/k8s/clusters/demo-agent/... (certificate from a throw-away CA: "
                 f"{ca_file})")

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
            await _http_walkthrough(api, front_door.port, user_token, client_tls)
            kubeconfig = tmp / "kubeconfig"
            kubeconfig.write_text(make_kubeconfig(
                f"https://127.0.0.1:{front_door.port}", "demo-agent", user_token,
                certificate_authority_data=base64.b64encode(ca_file.read_bytes()).decode(),
            ))
            await _kubectl_step(kubeconfig, tmp)

        _say()
        _say("The same by hand, in two terminals:")
        _say("  revdial server --listen 127.0.0.1:8123 --token s3cret \\")
        _say("      --forward 127.0.0.1:2222=laptop/127.0.0.1:22")
        _say("  revdial agent --server ws://127.0.0.1:8123/connect --id laptop \\")
        _say("      --token s3cret --allow 127.0.0.1:22")
        _say("  ssh -p 2222 localhost      # reaches the agent's sshd through the tunnel")
        if http:
            _say()
            _say("And a cluster behind the agent, reached through the server's HTTPS front door")
            _say("(README, 'Cluster proxy', has every step, certificates included):")
            _say("  revdial server --listen 127.0.0.1:8123 --token s3cret \\")
            _say("      --tls-cert server.pem --tls-key server-key.pem \\")
            _say("      --http-listen 127.0.0.1:8443 --user-tokens users.txt")
            _say("  revdial agent --server wss://127.0.0.1:8123/connect --ca-file server.pem \\")
            _say("      --id laptop --token s3cret --upstream https://10.0.0.1:6443 \\")
            _say("      --upstream-ca ca.crt --upstream-token-file "
                 "/var/run/secrets/kubernetes.io/serviceaccount/token")
            _say("  revdial kubeconfig --server https://127.0.0.1:8443 --cluster laptop \\")
            _say("      --token user-s3cret --certificate-authority server.pem > kubeconfig")
            _say("  kubectl --kubeconfig kubeconfig get pods --watch")
        if getattr(args, "keep_running", False):
            _say()
            _say(f"Still running: try  nc 127.0.0.1 {fwd_port}  (Ctrl-C to stop)")
            if http:
                base = f"https://127.0.0.1:{front_door.port}/k8s/clusters/demo-agent"
                _say(f"  curl --cacert {ca_file} -H 'Authorization: Bearer {user_token}' "
                     f"{base}/version")
                _say(f"  curl -N --cacert {ca_file} -H 'Authorization: Bearer {user_token}' \\")
                _say(f"      '{base}/api/v1/namespaces/default/configmaps?watch=1'")
                _say(f"  kubectl --kubeconfig {kubeconfig} get pods --watch")
            await trio.sleep_forever()
        if http:
            await proxy.aclose()
        nursery.cancel_scope.cancel()


def _throwaway_tls(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext, Path]:
    """A CA made for this run: (server context, client context, CA file in ``tmp``)."""
    ca = trustme.CA(organization_name="revdial demo (throw-away)")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return server_ctx, client_ctx, ca_file


async def _kubectl_step(kubeconfig: Path, tmp: Path) -> None:
    """Step 9: ``kubectl get pods`` through the front door, if kubectl is installed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        _say("9. kubectl is not installed: skipping 'kubectl get pods' "
             "(Debian: apt-get install kubernetes-client)")
        return
    home = tmp / "home"  # no cache or config of the user's is read or written
    home.mkdir(exist_ok=True)
    argv = [kubectl, "--kubeconfig", str(kubeconfig), "--request-timeout", "20s", "get", "pods"]
    with trio.move_on_after(60):
        result = await trio.run_process(
            argv, env={**os.environ, "HOME": str(home)}, capture_stdout=True,
            capture_stderr=True, check=False,
        )
        output = (result.stdout or result.stderr).decode(errors="replace").rstrip()
        _say(f"9. kubectl get pods, through the HTTPS front door (exit status "
             f"{result.returncode}):")
        for line in output.splitlines():
            _say(f"     {line}")
        return
    _say("9. kubectl get pods did not finish within 60 s")


async def _http_walkthrough(
    api: StandInAPIServer, port: int, user_token: str, tls: ssl.SSLContext
) -> None:
    """Steps 6-8: a GET, a streaming watch and the front door's auth, over HTTPS."""
    base = "/k8s/clusters/demo-agent"
    auth = [("Authorization", f"Bearer {user_token}")]
    https = partial(HTTPConnection.open, "127.0.0.1", port, ssl_context=tls)
    async with await https() as conn:
        t = time.perf_counter()
        resp = await conn.request("GET", f"{base}/api/v1/namespaces/default/configmaps",
                                  headers=auth)
        names = ", ".join(item["metadata"]["name"] for item in resp.json()["items"])
        _say(f"6. GET {base}/api/v1/namespaces/default/configmaps -> {resp.status} "
             f"in {_ms(t)}: {names}")
        _say("   (front door -> tunnel -> agent's reverse proxy -> API server; the user's "
             "token stays at the front door)")

    async with await https() as conn, conn.stream_request(
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

    async with await https() as conn:
        no_token = await conn.request("GET", f"{base}/version")
    async with await https() as conn:
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
