"""The HTTP path end to end on loopback.

user (HTTP client) -> front door -> revdial server -> tunnel -> agent's
reverse proxy -> stand-in API server over HTTPS (a trustme test CA).

Everything runs in the test process on 127.0.0.1 ports chosen by the kernel;
every test is bounded by ``trio.fail_after`` and waits on events or
answers, never on guessed durations (``wait_until`` polls socket-driven
state, see conftest).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme
from trio_websocket import wrap_client_stream

import revdial
from conftest import (
    TOKEN,
    MiB,
    agent_headers,
    free_port,
    read_until_reset,
    wait_until,
    ws_url,
)
from revdial._cli import main as cli_main
from revdial._standin import (
    HTTPConnection,
    HTTPResponse,
    StandInAPIServer,
    StandInRBAC,
    pattern,
    pattern_sha256,
)

USER = "user-tok-3f9a"  # may reach c1
OTHER = "other-tok-77b1"  # may reach c2 only
ADMIN = "admin-tok-c0de"  # may reach every client
UPSTREAM_TOKEN = "upstream-sa-token-51e2"
#: Size of the streamed bodies: 64 MiB keeps the suite fast and shows the same
#: as 256 MiB (``REVDIAL_TEST_BIG_MIB=256`` runs that: 3 s up, 8 s down on a
#: busy 2-core machine).
BIG = int(os.environ.get("REVDIAL_TEST_BIG_MIB", "64")) * MiB


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context for the stand-in, client context trusting only the test CA)."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


@dataclass
class Cluster:
    """A front door, a server, agent ``c1`` with the proxy, and its upstream."""

    server: revdial.Server
    front_door: revdial.FrontDoor
    api: StandInAPIServer
    proxy: revdial.ReverseProxy
    #: A plain-HTTP stand-in the agent may dial (for /client/...).
    plain_api: StandInAPIServer
    token_file: Path
    nursery: trio.Nursery
    agent_scope: trio.CancelScope

    @property
    def port(self) -> int:
        return self.front_door.port

    async def connect(self) -> HTTPConnection:
        return await HTTPConnection.open("127.0.0.1", self.port)

    async def get(self, target: str, token: str | None = USER, **kw: object) -> HTTPResponse:
        return await self.request("GET", target, token, **kw)

    async def request(self, method: str, target: str, token: str | None = USER,
                      **kw: object) -> HTTPResponse:
        headers = [("Authorization", f"Bearer {token}")] if token else []
        async with await self.connect() as conn:
            return await conn.request(method, target, headers=headers, **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def open_cluster(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
    tmp_path: Path,
    *,
    users: revdial.UserTokens | revdial.UserTokensFile | None = None,
    rbac: StandInRBAC | None = None,
) -> AsyncIterator[Cluster]:
    """The whole path; ``users`` for the front door, ``rbac`` for the stand-in."""
    server_ctx, client_ctx = tls
    token_file = tmp_path / "upstream-token"
    token_file.write_text(UPSTREAM_TOKEN + "\n")
    if users is None:
        users = revdial.UserTokens({USER: ["c1"], OTHER: ["c2"], ADMIN: "*"})
    async with (
        revdial.open_server(revdial.token_authorizer(token=TOKEN)) as server,
        trio.open_nursery() as nursery,
    ):
        api = StandInAPIServer(ssl_context=server_ctx, rbac=rbac)
        plain_api = StandInAPIServer()
        await nursery.start(api.serve, "127.0.0.1", 0)
        await nursery.start(plain_api.serve, "127.0.0.1", 0)
        front_door = revdial.FrontDoor(server, users)
        await nursery.start(front_door.serve, "127.0.0.1", 0)
        proxy = revdial.ReverseProxy(
            f"https://127.0.0.1:{api.port}", ssl_context=client_ctx, token_file=token_file
        )
        agent_scope = trio.CancelScope()

        async def run_agent(*, task_status: trio.TaskStatus[None]) -> None:
            with agent_scope:
                await revdial.connect(
                    ws_url(server),
                    headers=agent_headers("c1"),
                    allow=[f"127.0.0.1:{plain_api.port}"],
                    services={revdial.PROXY_TARGET: proxy},
                    task_status=task_status,
                )

        with trio.fail_after(10):
            await nursery.start(run_agent)
            await server.wait_client("c1")
        async with proxy:
            yield Cluster(server, front_door, api, proxy, plain_api, token_file, nursery,
                          agent_scope)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def cluster(
    tls: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path
) -> AsyncIterator[Cluster]:
    async with open_cluster(tls, tmp_path) as c:
        yield c


K8S = "/k8s/clusters/c1"


# --- requests ---------------------------------------------------------------------------


async def test_get_post_put_delete(cluster: Cluster) -> None:
    with trio.fail_after(20):
        resp = await cluster.get(f"{K8S}/api/v1/namespaces/default/configmaps")
        assert resp.status == 200
        assert resp.json()["kind"] == "ConfigMapList"
        body = json.dumps({"metadata": {"name": "cm1"}, "data": {"a": "1"}}).encode()
        resp = await cluster.request("POST", f"{K8S}/api/v1/namespaces/default/configmaps",
                                     body=body)
        assert resp.status == 201, resp.text
        assert resp.json()["metadata"]["name"] == "cm1"
        body = json.dumps({"metadata": {"name": "cm1"}, "data": {"a": "2"}}).encode()
        resp = await cluster.request("PUT", f"{K8S}/api/v1/namespaces/default/configmaps/cm1",
                                     body=body)
        assert (resp.status, resp.json()["data"]) == (200, {"a": "2"})
        resp = await cluster.request("DELETE", f"{K8S}/api/v1/namespaces/default/configmaps/cm1")
        assert (resp.status, resp.json()["status"]) == (200, "Success")
        resp = await cluster.get(f"{K8S}/api/v1/namespaces/default/configmaps/cm1")
        assert (resp.status, resp.json()["reason"]) == (404, "NotFound")
    assert cluster.api.configmaps() == []
    assert cluster.api.requests[-4:] == [
        "POST /api/v1/namespaces/default/configmaps",
        "PUT /api/v1/namespaces/default/configmaps/cm1",
        "DELETE /api/v1/namespaces/default/configmaps/cm1",
        "GET /api/v1/namespaces/default/configmaps/cm1",
    ]


async def test_what_the_upstream_sees(cluster: Cluster) -> None:
    with trio.fail_after(10):
        async with await cluster.connect() as conn:
            resp = await conn.request("POST", f"{K8S}/revdial/echo?a=1&b=%2F", body=b"hello",
                                      headers=[
                                          ("Authorization", f"Bearer {USER}"),
                                          ("Connection", "X-Private"),
                                          ("X-Private", "hop"),
                                          ("X-Forwarded-Proto", "spoofed"),
                                          ("User-Agent", "test/1"),
                                      ])
    assert resp.status == 200
    seen = resp.json()
    headers = {n.lower(): v for n, v in seen["headers"]}
    assert seen["method"] == "POST"
    assert seen["target"] == "/revdial/echo?a=1&b=%2F"
    assert seen["body_size"] == 5
    assert headers["authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    assert USER not in json.dumps(seen)  # the user's token never leaves the front door
    assert headers["host"] == f"127.0.0.1:{cluster.api.port}"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == f"127.0.0.1:{cluster.port}"
    assert headers["user-agent"] == "test/1"
    assert "x-private" not in headers
    assert not [n for n in headers if n.startswith("impersonate-")]
    assert "connection" not in headers


async def test_upstream_token_is_reread(cluster: Cluster) -> None:
    with trio.fail_after(10):
        new = cluster.token_file.with_suffix(".new")
        new.write_text("rotated-token\n")
        new.replace(cluster.token_file)
        resp = await cluster.get(f"{K8S}/revdial/echo")
    headers = {n.lower(): v for n, v in resp.json()["headers"]}
    assert headers["authorization"] == "Bearer rotated-token"


async def test_big_bodies_stream_both_ways(cluster: Cluster) -> None:
    async def body() -> AsyncIterator[bytes]:
        for block in pattern(7, BIG):
            yield block

    with trio.fail_after(60 * BIG // (64 * MiB)):
        async with await cluster.connect() as conn:
            auth = [("Authorization", f"Bearer {USER}")]
            t0 = time.perf_counter()
            resp = await conn.request("PUT", f"{K8S}/revdial/sha256", headers=auth, body=body())
            up = time.perf_counter() - t0
            assert resp.status == 200
            assert resp.json() == {"size": BIG, "sha256": pattern_sha256(7, BIG)}
            for chunked in ("0", "1"):
                t0 = time.perf_counter()
                h = hashlib.sha256()
                size = 0
                async with conn.stream_request(
                    "GET", f"{K8S}/revdial/bytes?size={BIG}&seed=8&chunked={chunked}",
                    headers=auth,
                ) as (resp, chunks):
                    assert resp.status == 200
                    async for chunk in chunks:
                        h.update(chunk)
                        size += len(chunk)
                down = time.perf_counter() - t0
                assert size == BIG
                assert h.hexdigest() == pattern_sha256(8, BIG)
    print(f"\n{BIG // MiB} MiB up {up:.2f} s, down {down:.2f} s")
    # Both proxies reused one upstream connection for all three requests.
    assert cluster.proxy.statistics().connections_opened == 1
    assert cluster.front_door.statistics().connections_opened == 1


async def test_watch_events_arrive_as_they_happen(cluster: Cluster) -> None:
    cluster.api.create_configmap("default", "before")
    with trio.fail_after(10):
        async with await cluster.connect() as conn, conn.stream_request(
            "GET", f"{K8S}/api/v1/namespaces/default/configmaps?watch=1",
            headers=[("Authorization", f"Bearer {USER}")],
        ) as (resp, chunks):
            assert resp.status == 200
            buf = b""

            async def next_event() -> dict[str, object]:
                nonlocal buf
                while b"\n" not in buf:
                    buf += await chunks.__anext__()
                line, _, buf = buf.partition(b"\n")
                event: dict[str, object] = json.loads(line)
                return event

            first = await next_event()
            assert first["type"] == "ADDED"
            for i in range(3):
                # The next change happens only after the previous event arrived.
                cluster.api.create_configmap("default", f"cm{i}")
                event = await next_event()
                obj = event["object"]
                assert isinstance(obj, dict)
                assert (event["type"], obj["metadata"]["name"]) == ("ADDED", f"cm{i}")
            cluster.api.delete_configmap("default", "cm0")
            assert (await next_event())["type"] == "DELETED"


WATCH = f"{K8S}/api/v1/namespaces/default/configmaps?watch=1"


async def test_agent_killed_mid_watch_aborts_the_client(cluster: Cluster) -> None:
    """The agent dies while a chunked watch streams: the user's connection is
    reset -- never a terminating chunk that would pass for the watch's end."""
    cluster.api.create_configmap("default", "before")
    with trio.fail_after(10):
        client = await trio.open_tcp_stream("127.0.0.1", cluster.port)
        async with client:
            await client.send_all(
                f"GET {WATCH} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {USER}\r\n\r\n".encode()
            )
            got = b""
            while b'"before"' not in got:
                data = await client.receive_some()
                assert data, got
                got += data
            assert got.startswith(b"HTTP/1.1 200 ")
            assert b"transfer-encoding: chunked" in got.lower()
            cluster.agent_scope.cancel()  # the agent dies: its socket closes at once
            rest = await read_until_reset(client)
        assert not (got + rest).endswith(b"0\r\n\r\n")  # no terminating chunk
    stats = cluster.front_door.statistics()
    assert (stats.aborted_responses, stats.active_requests) == (1, 0)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_agent_killed_mid_watch_curl_sees_a_failure(cluster: Cluster) -> None:
    cluster.api.create_configmap("default", "before")
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            curl = await nursery.start(partial(
                trio.run_process,
                ["curl", "-sS", "-N", "--max-time", "10",
                 "-H", f"Authorization: Bearer {USER}",
                 f"http://127.0.0.1:{cluster.port}{WATCH}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=False,
            ))
            assert curl.stdout is not None
            out = b""
            while b'"before"' not in out:
                data = await curl.stdout.receive_some()
                assert data, out
                out += data
            cluster.agent_scope.cancel()
            while await curl.stdout.receive_some():
                pass
        # 18: transfer closed with outstanding read data (partial file);
        # 56: failure receiving (connection reset). 0 would be a clean end.
        assert curl.returncode in (18, 56), curl.returncode
    assert cluster.front_door.statistics().aborted_responses == 1


async def test_completed_watch_still_ends_cleanly(cluster: Cluster) -> None:
    with trio.fail_after(10):
        async with await cluster.connect() as conn:
            resp = await conn.request("GET", f"{WATCH}&timeoutSeconds=1",
                                      headers=[("Authorization", f"Bearer {USER}")])
        assert resp.status == 200
    assert cluster.front_door.statistics().aborted_responses == 0
    assert cluster.proxy.statistics().aborted_responses == 0


async def test_websocket_upgrade_echo(cluster: Cluster) -> None:
    with trio.fail_after(10):
        tcp = await trio.open_tcp_stream("127.0.0.1", cluster.port)
        async with tcp, trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery, tcp, f"127.0.0.1:{cluster.port}", f"{K8S}/revdial/upgrade",
                extra_headers=[(b"Authorization", f"Bearer {USER}".encode())],
            )
            for message in ("hello", b"\x00binary\xff", "x" * 100_000):
                await ws.send_message(message)
                assert await ws.get_message() == message
            await ws.aclose()
            nursery.cancel_scope.cancel()


async def test_raw_upgrade_splice(cluster: Cluster) -> None:
    """An SPDY-style upgrade: after the 101, raw bytes through both proxies."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", cluster.port)
        async with stream:
            await stream.send_all(
                f"POST {K8S}/revdial/upgrade HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {USER}\r\nConnection: Upgrade\r\n"
                "Upgrade: SPDY/3.1\r\n\r\n".encode()
            )
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive_some()
            assert buf.startswith(b"HTTP/1.1 101 ")
            for i in range(20):
                msg = b"frame-%d" % i * 1000
                await stream.send_all(msg)
                got = b""
                while len(got) < len(msg):
                    got += await stream.receive_some()
                assert got == msg


async def test_keep_alive_pools_both_hops(cluster: Cluster) -> None:
    with trio.fail_after(10):
        for _ in range(3):
            async with await cluster.connect() as conn:
                for _ in range(3):
                    resp = await conn.request("GET", f"{K8S}/version",
                                              headers=[("Authorization", f"Bearer {USER}")])
                    assert resp.status == 200
    assert cluster.front_door.statistics().connections_opened == 1
    assert cluster.proxy.statistics().connections_opened == 1


async def test_keep_alive_over_https(
    cluster: Cluster, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """The per-connection reader over TLS: requests in a row on one connection."""
    server_ctx, client_ctx = tls
    users = revdial.UserTokens({USER: ["c1"]})
    https = revdial.FrontDoor(cluster.server, users, ssl_context=server_ctx)
    with trio.fail_after(10):
        await cluster.nursery.start(https.serve, "127.0.0.1", 0)
        async with await HTTPConnection.open("127.0.0.1", https.port,
                                             ssl_context=client_ctx) as conn:
            for _ in range(5):
                resp = await conn.request("GET", f"{K8S}/version",
                                          headers=[("Authorization", f"Bearer {USER}")])
                assert resp.status == 200
                assert resp.json()["gitVersion"]
    stats = https.statistics()
    assert (stats.requests, stats.connections_opened, stats.active_requests) == (5, 1, 0)
    await https.aclose()


# --- the plain /client route -------------------------------------------------------------


async def test_client_route_to_a_plain_http_target(cluster: Cluster) -> None:
    base = f"/client/c1/http/127.0.0.1:{cluster.plain_api.port}"
    with trio.fail_after(10):
        resp = await cluster.get(f"{base}/revdial/echo?q=1")
        assert resp.status == 200
        seen = resp.json()
        headers = {n.lower(): v for n, v in seen["headers"]}
        assert seen["target"] == "/revdial/echo?q=1"
        assert headers["host"] == f"127.0.0.1:{cluster.plain_api.port}"
        assert "authorization" not in headers
        # Not in the agent's --allow list: the agent refuses.
        resp = await cluster.get(f"/client/c1/http/127.0.0.1:{cluster.api.port}/version")
        assert resp.status == 502
        assert "refused" in resp.text
        resp = await cluster.get(f"/client/c1/https/127.0.0.1:{cluster.api.port}/version")
        assert resp.status == 400
        # A host that would split the request head the front door writes by
        # hand (issue 13) is refused before anything is dialled.
        for host in ("evil%0d%0ax-injected", "evil%0d%0a", "evil%00"):
            resp = await cluster.get(f"/client/c1/http/{host}/")
            assert resp.status == 400, host
            assert "invalid request line or header field" in resp.text


# --- auth and failures ------------------------------------------------------------------


async def test_auth_rules(cluster: Cluster) -> None:
    with trio.fail_after(10):
        resp = await cluster.get(f"{K8S}/version", token=None)
        assert resp.status == 401
        assert resp.header("www-authenticate") == 'Bearer realm="revdial"'
        resp = await cluster.get(f"{K8S}/version", token="not-a-token")
        assert resp.status == 401
        resp = await cluster.get(f"{K8S}/version", token=OTHER)
        assert resp.status == 403
        assert "c1" in resp.text
        resp = await cluster.get(f"{K8S}/version", token=ADMIN)
        assert resp.status == 200
        resp = await cluster.get("/client/c1/http/127.0.0.1:80/", token=OTHER)
        assert resp.status == 403
        async with await cluster.connect() as conn:
            resp = await conn.request("GET", f"{K8S}/version",
                                      headers=[("Authorization", f"Basic {USER}")])
            assert resp.status == 401
        resp = await cluster.get("/elsewhere", token=ADMIN)
        assert resp.status == 404
    # Refused before anything reached the agent.
    assert cluster.api.requests == ["GET /version"]


async def test_error_answer_to_an_upload_is_not_lost(cluster: Cluster) -> None:
    """A 401 to a large POST arrives intact (no TCP reset from unread data)."""
    with trio.fail_after(10):
        resp = await cluster.request("POST", f"{K8S}/revdial/sha256", token="bad",
                                     body=b"x" * (8 * MiB))
    assert resp.status == 401


async def test_unknown_and_disconnected_clients_503(cluster: Cluster) -> None:
    with trio.fail_after(10):
        resp = await cluster.get("/k8s/clusters/ghost/version", token=ADMIN)
        assert resp.status == 503
        assert "'ghost' is not connected" in resp.text
        assert (await cluster.get(f"{K8S}/version")).status == 200
        cluster.agent_scope.cancel()  # the agent dies
        await wait_until(lambda: not cluster.server.clients())
        resp = await cluster.get(f"{K8S}/version")
        assert resp.status == 503
        assert "'c1' is not connected" in resp.text


async def test_agent_without_upstream_502(cluster: Cluster) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(revdial.connect, ws_url(cluster.server),
                                        headers=agent_headers("c2")))
            await cluster.server.wait_client("c2")
            resp = await cluster.get("/k8s/clusters/c2/version", token=OTHER)
            nursery.cancel_scope.cancel()
    assert resp.status == 502
    assert "--upstream" in resp.text


async def test_upstream_down_502_and_bad_certificate_502(
    cluster: Cluster, tmp_path: Path
) -> None:
    closed = free_port()
    for key, proxy in (
        ("c2", revdial.ReverseProxy(f"https://127.0.0.1:{closed}")),
        # The system CAs do not trust the test CA.
        ("c3", revdial.ReverseProxy(f"https://127.0.0.1:{cluster.api.port}")),
    ):
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(
                    revdial.connect, ws_url(cluster.server), headers=agent_headers(key),
                    services={revdial.PROXY_TARGET: proxy}))
                await cluster.server.wait_client(key)
                resp = await cluster.get(f"/k8s/clusters/{key}/version", token=ADMIN)
                nursery.cancel_scope.cancel()
        assert resp.status == 502, resp.text
        assert ("refused" if key == "c2" else "certificate") in resp.text


# --- user tokens and the CLI pieces ----------------------------------------------------


def test_user_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("# comment\n\ntok-a c1,c2\ntok-b *\ntok-a c3\n")
    users = revdial.read_user_tokens(path)
    assert users.authorize("tok-a", "c1") is True
    assert users.authorize("tok-a", "c3") is True
    assert users.authorize("tok-a", "c9") is False
    assert users.authorize("tok-b", "anything") is True
    assert users.authorize("tok-c", "c1") is None
    assert "tok-a" not in repr(users)
    path.write_text("secret-token-without-clients\n")
    with pytest.raises(ValueError, match=r":1: expected") as info:
        revdial.read_user_tokens(path)
    assert "secret" not in str(info.value)


def test_kubeconfig_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["kubeconfig", "--server", "https://rd.example:8443/", "--cluster", "c1",
                     "--token", "tok-1"]) == 0
    out = capsys.readouterr().out
    assert 'server: "https://rd.example:8443/k8s/clusters/c1"' in out
    assert 'token: "tok-1"' in out
    assert 'current-context: "c1"' in out


def test_kubeconfig_refuses_plain_http_and_embeds_the_ca(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # kubectl never sends a bearer token over plain HTTP: such a kubeconfig only gets 401s.
    assert cli_main(["kubeconfig", "--server", "http://rd.example:8080", "--cluster", "c1",
                     "--token", "tok-1"]) == 1
    err = capsys.readouterr().err
    assert "refusing an http:// front door" in err
    assert "--insecure-http" in err
    assert "tok-1" not in err
    assert cli_main(["kubeconfig", "--server", "http://rd.example:8080", "--cluster", "c1",
                     "--token", "tok-1", "--insecure-http"]) == 0
    assert 'server: "http://rd.example:8080/k8s/clusters/c1"' in capsys.readouterr().out

    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    assert cli_main(["kubeconfig", "--server", "https://rd.example:8443", "--cluster", "c1",
                     "--token", "tok-1", "--certificate-authority", str(ca_file)]) == 0
    out = capsys.readouterr().out
    expected = base64.b64encode(ca_file.read_bytes()).decode()
    assert f'certificate-authority-data: "{expected}"' in out
    assert cli_main(["kubeconfig", "--server", "https://rd.example:8443", "--cluster", "c1",
                     "--token", "tok-1", "--certificate-authority",
                     str(tmp_path / "missing.pem")]) == 1
    assert "missing.pem" in capsys.readouterr().err


def test_front_door_needs_user_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["server", "--listen", "127.0.0.1:0", "--token", "t",
                     "--http-listen", "127.0.0.1:0"]) == 1
    assert "without --user-tokens" in capsys.readouterr().err


async def test_demo_shows_the_whole_path() -> None:
    """``revdial demo`` (what ``make demo`` runs): every step, exit status 0."""
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-m", "revdial", "demo"], capture_stdout=True,
            capture_stderr=True, check=False,
        )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    for step in ("1. agent 'demo-agent' connected", "3. 200 round trips",
                 "5. the agent refuses", "6. GET /k8s/clusters/demo-agent/", "-> 200",
                 "7. watch opened", "ADDED    job-2", "8. without a token: 401",
                 "front door       : https://127.0.0.1:", "revdial kubeconfig --server https://"):
        assert step in out, out
    if shutil.which("kubectl"):  # kubectl lists the stand-in's pods through the HTTPS front door
        assert "9. kubectl get pods, through the HTTPS front door (exit status 0)" in out, out
        assert "web-0" in out, out
    else:
        assert "9. kubectl is not installed" in out, out


async def test_user_tokens_file_changes_apply_without_restart(
    cluster: Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "users"
    path.write_text(f"{USER} c1\n")
    users = revdial.UserTokensFile(path)
    front_door = revdial.FrontDoor(cluster.server, users)
    await cluster.nursery.start(front_door.serve, "127.0.0.1", 0)

    async def status(token: str) -> int:
        async with await HTTPConnection.open("127.0.0.1", front_door.port) as conn:
            resp = await conn.request("GET", "/k8s/clusters/c1/version",
                                      headers=[("Authorization", f"Bearer {token}")])
            return resp.status

    with trio.fail_after(10):
        assert await status(USER) == 200
        assert await status(OTHER) == 401
        # Rewritten in place: the removed token stops working at the next request.
        path.write_text(f"{OTHER} c1\n")
        assert await status(USER) == 401
        assert await status(OTHER) == 200
        # Replaced atomically (rename over it), as a mounted Secret is.
        (tmp_path / "users.new").write_text(f"{ADMIN} *\n")
        (tmp_path / "users.new").replace(path)
        assert await status(ADMIN) == 200
        assert await status(OTHER) == 401
        # A broken file keeps the last good tokens, with one warning that
        # names the line but not its content (a secret).
        caplog.set_level(logging.WARNING, logger="revdial")
        path.write_text("secret-token-without-clients\n")
        assert await status(ADMIN) == 200
        assert await status(ADMIN) == 200
        warnings = [r.getMessage() for r in caplog.records
                    if "user tokens" in r.getMessage() and r.levelno >= logging.WARNING]
        assert len(warnings) == 1, warnings
        assert ":1:" in warnings[0]
        assert "secret-token" not in warnings[0]
        assert users.reload() is False
    assert "c1" in cluster.server.clients()  # no session was dropped
