"""A real ``kubectl`` through the front door, as the README's cluster-proxy section runs it.

``revdial server`` (wss:// for agents, an HTTPS front door) and ``revdial
agent`` (reverse proxy to the stand-in API server) run as CLI processes; the
kubeconfig is the one ``revdial kubeconfig --certificate-authority`` prints.
kubectl (client-go) sends its bearer token only over TLS, which is why the
front door must be HTTPS for it. Skipped, with the reason, only where no
kubectl is installed (``.ci/run`` installs Debian's ``kubernetes-client``).
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trustme

from conftest import TOKEN, free_port
from revdial._standin import StandInAPIServer
from test_frontdoor import UPSTREAM_TOKEN, USER
from test_kubernetes_client import processes, wait_ready

KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed (Debian: apt-get install kubernetes-client)"
)


class Kubectl:
    """Runs ``kubectl --kubeconfig FILE ...`` with a private HOME (no cache, no config)."""

    def __init__(self, kubeconfig: Path, home: Path) -> None:
        assert KUBECTL is not None
        self.argv = [KUBECTL, "--kubeconfig", str(kubeconfig), "--request-timeout", "20s"]
        home.mkdir(exist_ok=True)
        self.env = {**os.environ, "HOME": str(home), "KUBECONFIG": str(kubeconfig)}

    async def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        with trio.fail_after(60):
            result = await trio.run_process(
                [*self.argv, *args], env=self.env, capture_stdout=True, capture_stderr=True,
                check=False,
            )
        if check:
            assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result


async def read_until(stream: trio.abc.ReceiveStream, needle: bytes, seen: bytearray) -> None:
    """Read ``stream`` into ``seen`` until ``needle`` appears in it."""
    while needle not in seen:
        data = await stream.receive_some(65536)
        assert data, f"kubectl exited before printing {needle!r}: {bytes(seen)!r}"
        seen += data


async def test_kubectl_through_the_https_front_door(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server-key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert_file))
    leaf.private_key_pem.write_to_path(str(key_file))
    api_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(api_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    (tmp_path / "sa-token").write_text(UPSTREAM_TOKEN + "\n")
    (tmp_path / "users").write_text(f"{USER} c1\n")

    api = StandInAPIServer(ssl_context=api_ctx)
    api.create_pod("default", "web-0")
    api.create_pod("default", "web-1", phase="Pending")
    listen, http = free_port(), free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(api.serve, "127.0.0.1", 0)
        with processes(
            ["server", "--listen", f"127.0.0.1:{listen}", "--token", TOKEN,
             "--tls-cert", str(cert_file), "--tls-key", str(key_file),
             "--http-listen", f"127.0.0.1:{http}", "--user-tokens", str(tmp_path / "users")],
            ["agent", "--server", f"wss://127.0.0.1:{listen}/connect", "--ca-file",
             str(ca_file), "--id", "c1", "--token", TOKEN,
             "--upstream", f"https://127.0.0.1:{api.port}", "--upstream-ca", str(ca_file),
             "--upstream-token-file", str(tmp_path / "sa-token")],
            log=tmp_path / "revdial.log",
        ):
            try:
                with trio.fail_after(30):
                    await wait_ready(http, USER, client_ctx)
                kubeconfig = tmp_path / "kubeconfig"
                with trio.fail_after(20):
                    out = await trio.run_process(
                        [sys.executable, "-m", "revdial", "kubeconfig",
                         "--server", f"https://127.0.0.1:{http}", "--cluster", "c1",
                         "--token", USER, "--certificate-authority", str(ca_file)],
                        capture_stdout=True,
                    )
                kubeconfig.write_bytes(out.stdout)
                assert b"certificate-authority-data" in out.stdout
                kubectl = Kubectl(kubeconfig, tmp_path / "home")

                version = await kubectl.run("version")
                assert b"v1.30.0-revdial-standin" in version.stdout  # the server's, via the agent

                pods = await kubectl.run("get", "pods")
                lines = pods.stdout.decode().splitlines()
                assert lines[0].split()[0] == "NAME"
                assert [line.split()[0] for line in lines[1:]] == ["web-0", "web-1"]
                named = await kubectl.run("get", "pod", "web-1", "-o", "jsonpath={.status.phase}")
                assert named.stdout == b"Pending"

                # A watch: the list arrives, then a pod created afterwards, as it happens.
                proc = await trio.lowlevel.open_process(
                    [*kubectl.argv, "get", "pods", "--watch", "-o", "name"],
                    env=kubectl.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                )
                assert proc.stdout is not None
                seen = bytearray()
                try:
                    with trio.fail_after(30):
                        await read_until(proc.stdout, b"pod/web-1\n", seen)
                        api.create_pod("default", "late-0")
                        await read_until(proc.stdout, b"pod/late-0\n", seen)
                finally:
                    proc.kill()
                    with trio.CancelScope(shield=True):
                        await proc.wait()
                        await proc.stdout.aclose()

                # A token the front door does not know: kubectl reports 401.
                denied = Kubectl(tmp_path / "bad-kubeconfig", tmp_path / "home")
                (tmp_path / "bad-kubeconfig").write_text(
                    kubeconfig.read_text().replace(USER, "not-a-user-token"))
                refused = await denied.run("get", "pods", check=False)
                assert refused.returncode != 0
                assert b"You must be logged in to the server" in refused.stderr, refused
            finally:
                logged = (tmp_path / "revdial.log").read_text(errors="replace")
                print(logged[-3000:])
        nursery.cancel_scope.cancel()
    for secret in (USER, UPSTREAM_TOKEN, TOKEN):
        assert secret not in logged, "a token was logged"


async def test_kubectl_users_get_their_own_rbac_rights(tmp_path: Path) -> None:
    """Users through the CLI front door: the cluster's RBAC decides per user and
    whom each may act as (``kubectl --as``), and a removed token stops at once."""
    from test_impersonation import ALICE, BOB, CAROL, RBAC

    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server-key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert_file))
    leaf.private_key_pem.write_to_path(str(key_file))
    api_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(api_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    (tmp_path / "sa-token").write_text(UPSTREAM_TOKEN + "\n")
    users = tmp_path / "users"
    users.write_text(f"{ALICE} c1 user=alice groups=viewers\n{BOB} c1 user=bob\n"
                     f"{CAROL} c1 user=carol\n")

    api = StandInAPIServer(ssl_context=api_ctx, rbac=RBAC)
    api.create_pod("default", "web-0")
    listen, http = free_port(), free_port()
    async with trio.open_nursery() as nursery:
        await nursery.start(api.serve, "127.0.0.1", 0)
        with processes(
            ["server", "--listen", f"127.0.0.1:{listen}", "--token", TOKEN,
             "--tls-cert", str(cert_file), "--tls-key", str(key_file),
             "--http-listen", f"127.0.0.1:{http}", "--user-tokens", str(users)],
            ["agent", "--server", f"wss://127.0.0.1:{listen}/connect", "--ca-file",
             str(ca_file), "--id", "c1", "--token", TOKEN,
             "--upstream", f"https://127.0.0.1:{api.port}", "--upstream-ca", str(ca_file),
             "--upstream-token-file", str(tmp_path / "sa-token")],
            log=tmp_path / "revdial.log",
        ):
            try:
                with trio.fail_after(30):
                    await wait_ready(http, ALICE, client_ctx)
                kubectl: dict[str, Kubectl] = {}
                for name, token in (("alice", ALICE), ("bob", BOB), ("carol", CAROL)):
                    with trio.fail_after(20):
                        out = await trio.run_process(
                            [sys.executable, "-m", "revdial", "kubeconfig",
                             "--server", f"https://127.0.0.1:{http}", "--cluster", "c1",
                             "--token", token, "--certificate-authority", str(ca_file)],
                            capture_stdout=True,
                        )
                    (tmp_path / f"{name}.kubeconfig").write_bytes(out.stdout)
                    kubectl[name] = Kubectl(tmp_path / f"{name}.kubeconfig", tmp_path / name)

                pods = await kubectl["alice"].run("get", "pods", "-o", "name")
                assert pods.stdout == b"pod/web-0\n"
                denied = await kubectl["bob"].run("get", "pods", check=False)
                assert denied.returncode != 0
                assert (b'Error from server (Forbidden): pods is forbidden: User "bob" '
                        b'cannot list resource "pods"') in denied.stderr, denied
                maps = await kubectl["bob"].run("get", "configmaps", "-o", "name")
                assert maps.returncode == 0

                # kubectl --as: the cluster decides whether the user may act as another.
                # alice may be bob: bob's rights apply (config maps yes, pods no) ...
                maps = await kubectl["alice"].run("--as", "bob", "get", "configmaps", "-o", "name")
                assert maps.returncode == 0
                as_bob = await kubectl["alice"].run("--as", "bob", "get", "pods", check=False)
                assert as_bob.returncode != 0
                assert (b'Error from server (Forbidden): pods is forbidden: User "bob" '
                        b'cannot list resource "pods"') in as_bob.stderr, as_bob
                # ... and bob in group auditors, who may list pods.
                audit = await kubectl["alice"].run("--as", "bob", "--as-group", "auditors",
                                                   "get", "pods", "-o", "name")
                assert audit.stdout == b"pod/web-0\n"
                assert api.requests_as[-1][:2] == ("bob", ("auditors", "system:authenticated"))
                # carol may not impersonate; bob may not escalate to alice or system:masters.
                # (kubectl reads the Forbidden Status only where its discovery is cached --
                # with a cold cache it says "Forbidden: unknown", as with a real API server --
                # so carol runs one command as herself first.)
                assert (await kubectl["carol"].run("get", "pods", "-o", "name")).returncode == 0
                before = len([r for r in api.requests_as if "subjectaccessreviews" not in r[2]])
                for who, args, forbidden in (
                    ("carol", ["--as", "bob"], b'users "bob" is forbidden: User "carol" cannot '
                     b'impersonate resource "users" in API group "" at the cluster scope'),
                    ("bob", ["--as", "alice"], b'users "alice" is forbidden: User "bob"'),
                    ("alice", ["--as", "bob", "--as-group", "system:masters"],
                     b'groups "system:masters" is forbidden: User "alice" cannot impersonate'),
                ):
                    refused = await kubectl[who].run(*args, "get", "pods", check=False)
                    assert refused.returncode != 0
                    assert b"Error from server (Forbidden): " + forbidden in refused.stderr, refused
                assert len([r for r in api.requests_as
                            if "subjectaccessreviews" not in r[2]]) == before

                # bob's token removed from the file: his next command is refused (401).
                users.write_text(f"{ALICE} c1 user=alice groups=viewers\n")
                gone = await kubectl["bob"].run("get", "configmaps", check=False)
                assert gone.returncode != 0
                assert b"You must be logged in to the server" in gone.stderr, gone
                assert (await kubectl["alice"].run("get", "pods", "-o", "name")).returncode == 0
            finally:
                logged = (tmp_path / "revdial.log").read_text(errors="replace")
                print(logged[-3000:])
        nursery.cancel_scope.cancel()
    for secret in (ALICE, BOB, UPSTREAM_TOKEN, TOKEN):
        assert secret not in logged, "a token was logged"
