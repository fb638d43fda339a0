"""The official Python ``kubernetes`` client through the front door.

The client is synchronous (urllib3), so it runs in a worker thread and hands
what it sees to the test over a trio channel; the stand-in API server, the
server and the agent run in trio (in this process, or as ``revdial``
processes for the CLI test). The kubeconfig is the one ``revdial
kubeconfig`` prints.
"""

from __future__ import annotations

import contextlib
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from conftest import TOKEN, free_port
from revdial._standin import HTTPConnection, StandInAPIServer
from test_frontdoor import ADMIN, UPSTREAM_TOKEN, USER, Cluster, cluster, tls

kubernetes = pytest.importorskip("kubernetes")

__all__ = ["cluster", "tls"]  # fixtures used here


async def write_kubeconfig(tmp_path: Path, port: int, token: str) -> Path:
    """Run ``revdial kubeconfig`` and keep what it prints."""
    with trio.fail_after(20):
        out = await trio.run_process(
            [sys.executable, "-m", "revdial", "kubeconfig", "--server",
             f"http://127.0.0.1:{port}", "--insecure-http", "--cluster", "c1", "--token", token],
            capture_stdout=True, capture_stderr=True,
        )
    path = tmp_path / "kubeconfig"
    path.write_bytes(out.stdout)
    return path


def core_v1(kubeconfig: Path) -> Any:
    api_client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    return kubernetes.client.CoreV1Api(api_client)


async def in_thread(fn: Callable[[], Any]) -> Any:
    # abandon_on_cancel: a hung client cannot outlive the test's fail_after.
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


@asynccontextmanager
async def follow_watch(v1: Any, namespace: str) -> AsyncIterator[trio.MemoryReceiveChannel[Any]]:
    """Run ``kubernetes.watch.Watch().stream(...)`` in a thread; yield its events."""
    send, receive = trio.open_memory_channel[Any](100)
    watch = kubernetes.watch.Watch()
    token = trio.lowlevel.current_trio_token()

    def run() -> None:
        try:
            for event in watch.stream(v1.list_namespaced_config_map, namespace,
                                      timeout_seconds=30, _request_timeout=30):
                trio.from_thread.run_sync(send.send_nowait, event, trio_token=token)
        finally:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(send.close, trio_token=token)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_thread, run)
        try:
            yield receive
        finally:
            watch.stop()
            nursery.cancel_scope.cancel()


async def list_create_and_watch(v1: Any, api: StandInAPIServer) -> None:
    api.create_configmap("default", "existing", {"k": "v"})
    cms = await in_thread(lambda: v1.list_namespaced_config_map("default"))
    assert [cm.metadata.name for cm in cms.items] == ["existing"]
    assert cms.items[0].data == {"k": "v"}
    namespaces = await in_thread(v1.list_namespace)
    assert {ns.metadata.name for ns in namespaces.items} == {"default", "kube-system"}

    async with follow_watch(v1, "default") as events:
        first = await events.receive()
        assert (first["type"], first["object"].metadata.name) == ("ADDED", "existing")
        # A change made by a controller in the cluster ...
        api.create_configmap("default", "from-controller")
        event = await events.receive()
        assert (event["type"], event["object"].metadata.name) == ("ADDED", "from-controller")
        # ... and one made through the front door by the client itself.
        body = kubernetes.client.V1ConfigMap(
            metadata=kubernetes.client.V1ObjectMeta(name="from-client"), data={"x": "1"})
        created = await in_thread(lambda: v1.create_namespaced_config_map("default", body))
        assert created.metadata.name == "from-client"
        event = await events.receive()
        assert (event["type"], event["object"].data) == ("ADDED", {"x": "1"})
        await in_thread(lambda: v1.delete_namespaced_config_map("existing", "default"))
        event = await events.receive()
        assert (event["type"], event["object"].metadata.name) == ("DELETED", "existing")


async def test_kubernetes_client_lists_and_watches(cluster: Cluster, tmp_path: Path) -> None:
    with trio.fail_after(30):
        v1 = core_v1(await write_kubeconfig(tmp_path, cluster.port, USER))
        await list_create_and_watch(v1, cluster.api)
        # A token the front door does not know: the client's ApiException(401).
        bad = core_v1(await write_kubeconfig(tmp_path, cluster.port, "nope"))
        with pytest.raises(kubernetes.client.ApiException) as info:
            await in_thread(lambda: bad.list_namespaced_config_map("default"))
        assert info.value.status == 401


# --- the same through `revdial server` and `revdial agent` processes ------------------


@contextlib.contextmanager
def processes(*commands: list[str], log: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    with log.open("wb") as out:
        try:
            for cmd in commands:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "revdial", "--log-level", "debug", *cmd],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT))
            yield procs
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()


async def wait_ready(port: int, token: str, ssl_context: ssl.SSLContext | None = None) -> None:
    """Poll the front door until the agent's proxy answers (every 50 ms).

    The processes start on their own schedule: first nothing listens, then
    the front door answers 503 until the agent has connected.
    """
    while True:
        try:
            async with await HTTPConnection.open("127.0.0.1", port,
                                                 ssl_context=ssl_context) as conn:
                resp = await conn.request("GET", "/k8s/clusters/c1/version",
                                          headers=[("Authorization", f"Bearer {token}")])
                if resp.status == 200:
                    return
        except OSError:
            pass
        await trio.sleep(0.05)


async def test_kubernetes_client_through_cli_processes(tmp_path: Path) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    (tmp_path / "sa-token").write_text(UPSTREAM_TOKEN + "\n")
    (tmp_path / "users").write_text(f"{ADMIN} *\n{USER} c1\n")
    listen, http = free_port(), free_port()
    api = StandInAPIServer(ssl_context=server_ctx)
    async with trio.open_nursery() as nursery:
        await nursery.start(api.serve, "127.0.0.1", 0)
        with processes(
            ["server", "--listen", f"127.0.0.1:{listen}", "--token", TOKEN,
             "--http-listen", f"127.0.0.1:{http}", "--user-tokens", str(tmp_path / "users")],
            ["agent", "--server", f"ws://127.0.0.1:{listen}/connect", "--id", "c1",
             "--token", TOKEN, "--upstream", f"https://127.0.0.1:{api.port}",
             "--upstream-ca", str(ca_file), "--upstream-token-file",
             str(tmp_path / "sa-token")],
            log=tmp_path / "revdial.log",
        ):
            try:
                with trio.fail_after(30):
                    await wait_ready(http, USER)
                    v1 = core_v1(await write_kubeconfig(tmp_path, http, USER))
                    await list_create_and_watch(v1, api)
                    async with await HTTPConnection.open("127.0.0.1", http) as conn:
                        resp = await conn.request(
                            "GET", "/k8s/clusters/c1/revdial/echo",
                            headers=[("Authorization", f"Bearer {USER}")])
                    seen = {n.lower(): v for n, v in resp.json()["headers"]}
                    assert seen["authorization"] == f"Bearer {UPSTREAM_TOKEN}"
            finally:
                logged = (tmp_path / "revdial.log").read_text(errors="replace")
                print(logged[-3000:])
        nursery.cancel_scope.cancel()
    for secret in (USER, ADMIN, UPSTREAM_TOKEN, TOKEN):
        assert secret not in logged, "a token was logged"
