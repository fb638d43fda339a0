"""Per-user identities through the front door, as Rancher does it.

The user-token file maps each token to a Kubernetes user (and groups); the
front door sends ``Impersonate-User``/``Impersonate-Group`` from that mapping;
the agent's service-account token authenticates. A request carrying its own
``Impersonate-*`` headers (``kubectl --as``) is checked with the cluster first
(SubjectAccessReviews through the agent's proxy): the mapped user's right to
impersonate decides. The stand-in API server (``StandInRBAC``) authenticates
that token, lets the service account impersonate anyone, and gives alice, bob
and carol different rights -- so what each user may do, and whom they may act
as, is decided by the cluster's RBAC, end to end on loopback. (The real
``kubectl`` does the same in ``tests/test_kubectl.py``.)
"""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

import revdial
from revdial._frontdoor import upstream_headers
from revdial._impersonation import ReviewCache, attributes, parse_impersonation, review_body
from revdial._proxy import DEFAULT_PROXY_LIMITS, _Answer
from revdial._standin import HTTPConnection, StandInAPIServer, StandInRBAC
from test_frontdoor import UPSTREAM_TOKEN, Cluster, open_cluster, tls  # noqa: F401

ALICE = "alice-tok-9d1e"  # user alice, group viewers: may list pods and config maps
BOB = "bob-tok-4c77"  # user bob: may list config maps only
CAROL = "carol-tok-71f0"  # user carol: may list pods, may impersonate nobody
LEGACY = "legacy-tok-0b3a"  # no user: acts as the agent's service account
SA = "system:serviceaccount:revdial:agent"
RBAC = StandInRBAC(
    tokens={UPSTREAM_TOKEN: SA, "direct-bob": "bob"},
    impersonators=frozenset({SA}),
    rules={
        SA: ["create subjectaccessreviews"],
        # alice may act as bob (kubectl --as bob), in group auditors, with scope "view".
        "alice": ["list pods", "get pods", "watch pods", "impersonate users bob",
                  "impersonate groups auditors", "impersonate userextras/scopes view"],
        "bob": ["list configmaps"],
        "carol": ["list pods"],
        "group:viewers": ["get configmaps", "list configmaps"],
        "group:auditors": ["list pods"],
    },
)
USERS = f"""\
# token       clients  identity
{ALICE} c1 user=alice groups=viewers
{BOB} c1 user=bob
{CAROL} c1 user=carol
{LEGACY} c1
"""
PODS = "/k8s/clusters/c1/api/v1/namespaces/default/pods"
CONFIGMAPS = "/k8s/clusters/c1/api/v1/namespaces/default/configmaps"


@pytest.fixture
async def cluster(
    tls: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path  # noqa: F811
) -> AsyncIterator[Cluster]:
    path = tmp_path / "users"
    path.write_text(USERS)
    async with open_cluster(tls, tmp_path, users=revdial.UserTokensFile(path),
                            rbac=RBAC) as c:
        c.api.create_pod("default", "web-0")
        yield c


# --- the file format --------------------------------------------------------------------


def test_user_tokens_file_with_identities(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(USERS + f"{ALICE} c2\n{BOB} c3 user=bob\nadmin-tok * user=root groups=a,b,\n")
    users = revdial.read_user_tokens(path)
    alice = users.lookup(ALICE)
    assert alice is not None
    assert alice.identity == revdial.Identity("alice", ("viewers",))
    assert alice.clients == frozenset({"c1", "c2"})  # lines of one token add up
    bob = users.lookup(BOB)
    assert bob is not None
    assert bob.identity == revdial.Identity("bob")
    legacy = users.lookup(LEGACY)
    assert legacy is not None
    assert legacy.identity is None
    admin = users.lookup("admin-tok")
    assert admin is not None
    assert admin.clients is None
    assert admin.allows("any")
    assert admin.identity == revdial.Identity("root", ("a", "b"))
    assert users.lookup("nobody") is None
    assert users.authorize(BOB, "c3") is True
    assert users.authorize(BOB, "c2") is False
    assert ALICE not in repr(users)
    assert ALICE not in repr(alice)


@pytest.mark.parametrize(("line", "error"), [
    ("secret-tok-1 c1 groups=dev", "groups= needs user="),
    ("secret-tok-1 c1 user=", "user name"),
    ("secret-tok-1 c1 user=al\u00efce", "user name"),
    ("secret-tok-1 c1 role=admin", "expected"),
    ("secret-tok-1 user=alice", "expected"),  # the client keys were forgotten
    ("secret-tok-1 c1 user=a user=b", "expected"),
    ("secret-tok-1 c1 user=alice\nsecret-tok-1 c2 user=bob", "second, different identity"),
])
def test_user_tokens_file_errors_name_the_line_only(
    tmp_path: Path, line: str, error: str
) -> None:
    path = tmp_path / "users"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=error) as info:
        revdial.read_user_tokens(path)
    assert f"{path}:" in str(info.value)
    assert "secret-tok" not in str(info.value)


def test_identity_names_are_header_safe() -> None:
    for bad in ("", "a b", "a\r\nX-Evil: 1", "caf\u00e9"):
        with pytest.raises(ValueError, match="user name"):
            revdial.Identity(bad)
    with pytest.raises(ValueError, match="group"):
        revdial.Identity("alice", ("a,b",))
    with pytest.raises(ValueError, match="without client keys"):
        revdial.UserTokens({"t": "*"}, identities={"u": revdial.Identity("alice")})


def test_upstream_headers_replace_identity_and_drop_client_impersonation() -> None:
    sent = [(b"accept", b"*/*"), (b"authorization", b"Bearer user"), (b"host", b"fd"),
            (b"impersonate-user", b"system:admin"), (b"impersonate-group", b"system:masters"),
            (b"impersonate-extra-scopes", b"x"), (b"impersonate-uid", b"0")]
    assert upstream_headers(sent, b"up", revdial.Identity("bob", ("dev", "ops"))) == [
        (b"host", b"up"), (b"accept", b"*/*"), (b"impersonate-user", b"bob"),
        (b"impersonate-group", b"dev"), (b"impersonate-group", b"ops")]
    assert upstream_headers(sent, b"up", None) == [(b"host", b"up"), (b"accept", b"*/*")]


# --- the stand-in's RBAC, directly ------------------------------------------------------


async def test_standin_rbac_directly() -> None:
    api = StandInAPIServer(rbac=RBAC)
    api.create_pod("default", "web-0")
    async with trio.open_nursery() as nursery:
        await nursery.start(api.serve, "127.0.0.1", 0)
        with trio.fail_after(10):
            async with await HTTPConnection.open("127.0.0.1", api.port) as conn:

                async def get(target: str, *headers: tuple[str, str]) -> tuple[int, Any]:
                    resp = await conn.request("GET", target, headers=list(headers))
                    return resp.status, resp.json()

                pods = "/api/v1/namespaces/default/pods"
                status, body = await get(pods)
                assert (status, body["reason"]) == (401, "Unauthorized")
                sa = ("Authorization", f"Bearer {UPSTREAM_TOKEN}")
                status, body = await get(pods, sa)
                assert (status, body["reason"]) == (403, "Forbidden")  # the SA itself may not
                assert body["message"] == (
                    f'pods is forbidden: User "{SA}" cannot list resource "pods" in API '
                    'group "" in the namespace "default"')
                status, body = await get(pods, sa, ("Impersonate-User", "alice"))
                assert (status, body["kind"]) == (200, "PodList")
                status, body = await get("/api/v1/pods", sa, ("Impersonate-User", "alice"),
                                         ("Impersonate-Group", "x"))
                assert status == 200  # cluster scope: allowed in every namespace
                status, body = await get(pods, sa, ("Impersonate-Group", "viewers"))
                assert status == 400  # a group needs a user
                # Only the service account may impersonate: bob cannot become alice.
                bob = ("Authorization", "Bearer direct-bob")
                status, body = await get(pods, bob, ("Impersonate-User", "alice"))
                assert (status, body["reason"]) == (403, "Forbidden")
                assert body["details"] == {"name": "alice", "kind": "users"}
                assert 'User "bob" cannot impersonate' in body["message"]
                status, body = await get("/version", bob)
                assert status == 200  # non-resource URLs: any authenticated user
        nursery.cancel_scope.cancel()
    assert api.requests_as[1] == ("alice", ("system:authenticated",),
                                  "GET /api/v1/namespaces/default/pods")


# --- through the front door -------------------------------------------------------------


async def _get(cluster: Cluster, target: str, token: str,
               *extra: tuple[str, str]) -> tuple[int, str]:
    async with await cluster.connect() as conn:
        resp = await conn.request("GET", target,
                                  headers=[("Authorization", f"Bearer {token}"), *extra])
    return resp.status, resp.text


async def test_each_user_gets_their_own_rights(cluster: Cluster) -> None:
    with trio.fail_after(20):
        status, text = await _get(cluster, PODS, ALICE)
        assert status == 200, text
        assert [p["metadata"]["name"] for p in json.loads(text)["items"]] == ["web-0"]
        status, text = await _get(cluster, PODS, BOB)
        assert status == 403
        assert json.loads(text)["message"].startswith('pods is forbidden: User "bob" cannot list')
        # Groups count: alice reads config maps as a member of "viewers", bob by his own rule.
        assert (await _get(cluster, CONFIGMAPS, ALICE))[0] == 200
        assert (await _get(cluster, CONFIGMAPS, BOB))[0] == 200
        assert (await _get(cluster, f"{CONFIGMAPS}?watch=1&timeoutSeconds=1", BOB))[0] == 403
        # A token without user= acts as the agent's service account (the old behaviour).
        status, text = await _get(cluster, PODS, LEGACY)
        assert status == 403
        assert f'User "{SA}" cannot list' in json.loads(text)["message"]
    seen = [(user, groups) for user, groups, _ in cluster.api.requests_as]
    assert seen[:2] == [("alice", ("viewers", "system:authenticated")),
                        ("bob", ("system:authenticated",))]
    assert seen[-1] == (SA, ("system:authenticated",))


def forwarded(api: StandInAPIServer) -> list[tuple[str, tuple[str, ...], str]]:
    """What reached the cluster as requests, not as the front door's reviews."""
    return [r for r in api.requests_as if not r[2].endswith("/subjectaccessreviews")]


def _forbidden(user: str, resource: str, name: str, group: str = "") -> str:
    qualified = f"{resource.partition('/')[0]}.{group}" if group else resource
    return (f'{qualified} "{name}" is forbidden: User "{user}" cannot impersonate resource '
            f'"{resource}" in API group "{group}" at the cluster scope')


async def test_kubectl_as_is_decided_by_the_clusters_rbac(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="revdial")
    as_bob = ("Impersonate-User", "bob")
    with trio.fail_after(20):
        # alice may impersonate bob: her request runs with bob's rights, not hers.
        assert (await _get(cluster, CONFIGMAPS, ALICE, as_bob))[0] == 200
        status, text = await _get(cluster, PODS, ALICE, as_bob)
        assert status == 403
        assert json.loads(text)["message"].startswith('pods is forbidden: User "bob" cannot list')
        # ... and as bob in group auditors (which may list pods), with an extra she may set.
        status, text = await _get(cluster, PODS, ALICE, as_bob,
                                  ("Impersonate-Group", "auditors"),
                                  ("Impersonate-Extra-Scopes", "view"))
        assert status == 200, text
        ran_as = forwarded(cluster.api)[-1]
        assert ran_as[:2] == ("bob", ("auditors", "system:authenticated"))
        # carol may not impersonate: the API server's own Forbidden Status, nothing forwarded.
        before = len(forwarded(cluster.api))
        status, text = await _get(cluster, PODS, CAROL, as_bob)
        assert status == 403
        assert json.loads(text) == {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": _forbidden("carol", "users", "bob"), "reason": "Forbidden",
            "details": {"name": "bob", "kind": "users"}, "code": 403}
        assert len(forwarded(cluster.api)) == before  # only the review reached the cluster
        # A group, an extra or a uid alice may not set: denied, naming it as Kubernetes does.
        for extra, message in (
            (("Impersonate-Group", "system:masters"),
             _forbidden("alice", "groups", "system:masters")),
            (("Impersonate-Extra-Scopes", "admin"),
             _forbidden("alice", "userextras/scopes", "admin", "authentication.k8s.io")),
            (("Impersonate-Uid", "0"), _forbidden("alice", "uids", "0", "authentication.k8s.io")),
        ):
            status, text = await _get(cluster, PODS, ALICE, as_bob, extra)
            assert (status, json.loads(text)["message"]) == (403, message), text
        status, text = await _get(cluster, PODS, ALICE, ("Impersonate-User", "root"))
        assert (status, json.loads(text)["message"]) == (403, _forbidden("alice", "users", "root"))
        # A service account name is checked as Kubernetes does: serviceaccounts in its namespace.
        status, text = await _get(cluster, PODS, ALICE,
                                  ("Impersonate-User", "system:serviceaccount:kube-system:x"))
        assert status == 403
        assert json.loads(text)["message"] == (
            'serviceaccounts "x" is forbidden: User "alice" cannot impersonate resource '
            '"serviceaccounts" in API group "" in the namespace "kube-system"')
    # The reviews asked about the mapped user, with the groups the cluster knows her by.
    assert ("alice", "impersonate", "users", "bob") in cluster.api.reviews
    assert ("carol", "impersonate", "users", "bob") in cluster.api.reviews
    logged = caplog.text
    assert "'carol' may not impersonate users 'bob' on 'c1'" in logged
    for secret in (ALICE, CAROL, UPSTREAM_TOKEN):
        assert secret not in logged


async def test_impersonation_answers_are_cached_briefly(cluster: Cluster) -> None:
    as_bob = ("Impersonate-User", "bob")
    with trio.fail_after(20):
        for _ in range(3):
            assert (await _get(cluster, CONFIGMAPS, ALICE, as_bob))[0] == 200
            assert (await _get(cluster, CONFIGMAPS, CAROL, as_bob))[0] == 403
    # One review each: alice's "yes" and carol's "no" were both reused.
    assert cluster.api.reviews == [("alice", "impersonate", "users", "bob"),
                                   ("carol", "impersonate", "users", "bob")]
    assert len(cluster.front_door.reviews) == 2


async def test_impersonation_without_a_mapped_user_or_malformed_is_refused(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="revdial")
    with trio.fail_after(20):
        # A token without user= acts as the agent's service account, whose own
        # (broad) right to impersonate would decide: refused, never forwarded.
        for extra in ([("Impersonate-User", "alice")],
                      [("Impersonate-User", "system:admin"),
                       ("Impersonate-Group", "system:masters")]):
            status, text = await _get(cluster, PODS, LEGACY, *extra)
            assert status == 403, text
            assert "needs a token mapped to a user" in text
        # Groups, a uid or extras without a user: 400, as Kubernetes refuses them.
        for extra in ([("Impersonate-Group", "viewers")], [("Impersonate-Uid", "0")],
                      [("impersonate-extra-scopes", "all")],
                      [("Impersonate-User", "a"), ("Impersonate-User", "b")],
                      [("Impersonate-User", "bob"), ("Impersonate-Nonsense", "x")]):
            status, text = await _get(cluster, PODS, ALICE, *extra)
            assert status == 400, (extra, text)
        # /client/ routes reach plain HTTP services: no impersonation there.
        plain = f"/client/c1/http/127.0.0.1:{cluster.plain_api.port}/revdial/echo"
        assert (await _get(cluster, plain, ALICE, ("Impersonate-User", "bob")))[0] == 403
        # An unknown token is still 401 first: the 403 tells nothing to strangers.
        assert (await _get(cluster, PODS, "nobody", ("Impersonate-User", "a")))[0] == 401
    assert cluster.api.requests_as == []  # none of it reached the cluster
    assert cluster.api.reviews == []
    logged = caplog.text
    assert "Impersonate-* headers and a token mapped to no user -> 403" in logged
    assert LEGACY not in logged
    assert "system:admin" not in logged


async def test_impersonation_check_fails_closed(cluster: Cluster) -> None:
    """The agent's service account may not create reviews: 502, nothing forwarded."""
    cluster.api.rbac = StandInRBAC(tokens=RBAC.tokens, impersonators=RBAC.impersonators,
                                   rules={k: v for k, v in RBAC.rules.items() if k != SA})
    with trio.fail_after(20):
        status, text = await _get(cluster, PODS, ALICE, ("Impersonate-User", "bob"))
    assert status == 502
    assert "cannot check impersonation" in text
    assert "the cluster answered 403" in text
    assert "subjectaccessreviews" in text
    assert cluster.api.requests_as[-1][2].endswith("/subjectaccessreviews")


def test_impersonation_attributes() -> None:
    wanted = parse_impersonation([(b"accept", b"*/*"), (b"impersonate-user", b"bob"),
                                  (b"impersonate-group", b"g1"), (b"impersonate-uid", b"u"),
                                  (b"impersonate-extra-acme.com%2fproject", b"p")])
    assert wanted is not None
    assert [(a.resource, a.subresource, a.name, a.group) for a in attributes(wanted)] == [
        ("users", "", "bob", ""), ("groups", "", "g1", ""),
        ("userextras", "acme.com/project", "p", "authentication.k8s.io"),
        ("uids", "", "u", "authentication.k8s.io")]
    assert json.loads(review_body("alice", ["system:authenticated"], attributes(wanted)[2])) == {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": "alice", "groups": ["system:authenticated"], "resourceAttributes": {
            "verb": "impersonate", "group": "authentication.k8s.io", "resource": "userextras",
            "subresource": "acme.com/project", "name": "p"}}}
    assert upstream_headers([(b"impersonate-user", b"bob"), (b"accept", b"*/*")], b"up",
                            revdial.Identity("alice"), wanted) == [
        (b"host", b"up"), (b"accept", b"*/*"), *wanted.headers]
    assert parse_impersonation([(b"accept", b"*/*")]) is None


async def test_review_cache_is_bounded_and_expires(autojump_clock: trio.abc.Clock) -> None:
    cache = ReviewCache(ttl=5.0, max_entries=2)
    cache.put(("a",), True, "")
    cache.put(("b",), False, "no")
    assert cache.get(("a",)) == (True, "")  # a is now the most recent
    cache.put(("c",), True, "")  # bounded: b, the least recent, goes
    assert (len(cache), cache.get(("b",))) == (2, None)
    await trio.sleep(4.9)
    assert cache.get(("c",)) == (True, "")
    await trio.sleep(0.1)
    assert cache.get(("a",)) is None  # expired after 5 s
    off = ReviewCache(ttl=0)
    off.put(("a",), True, "")
    assert len(off) == 0


async def test_token_file_changes_apply_to_the_next_request(cluster: Cluster,
                                                            tmp_path: Path) -> None:
    path = tmp_path / "users"
    with trio.fail_after(20):
        assert (await _get(cluster, PODS, ALICE))[0] == 200
        # alice's token removed: her very next request is 401 (no restart, no reload call).
        path.write_text(f"{BOB} c1 user=bob\n")
        assert (await _get(cluster, PODS, ALICE))[0] == 401
        assert (await _get(cluster, PODS, BOB))[0] == 403
        # bob's token now maps to alice: his next request runs with her rights.
        path.write_text(f"{BOB} c1 user=alice groups=viewers\n")
        assert (await _get(cluster, PODS, BOB))[0] == 200
    assert cluster.api.requests_as[-1][0] == "alice"


async def test_standin_command_line_serves_with_an_rbac_file(tmp_path: Path) -> None:
    """``python -m revdial._standin --rbac FILE``, as the README's walk-through runs it."""
    rbac = tmp_path / "rbac.json"
    rbac.write_text(json.dumps({"tokens": {"sa-tok": SA}, "impersonators": [SA],
                                "rules": {"alice": ["list pods"]}}))
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "revdial._standin", "--port", "0", "--rbac", str(rbac)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        with trio.fail_after(20):
            line = bytearray()
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                assert chunk, "the stand-in exited"
                line += chunk
            port = int(line.decode().rsplit(":", 1)[1])
            async with await HTTPConnection.open("127.0.0.1", port) as conn:
                pods = "/api/v1/namespaces/default/pods"
                sa = ("Authorization", "Bearer sa-tok")
                alice = await conn.request("GET", pods, headers=[sa, ("Impersonate-User", "alice")])
                bob = await conn.request("GET", pods, headers=[sa, ("Impersonate-User", "bob")])
        assert alice.status == 200
        assert [p["metadata"]["name"] for p in alice.json()["items"]] == ["web-0", "web-1"]
        assert (bob.status, bob.json()["reason"]) == (403, "Forbidden")
    finally:
        proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
            await proc.stdout.aclose()


def test_standin_rbac_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "rbac.json"
    path.write_text('{"rules": {}}')
    with pytest.raises(ValueError, match="expected"):
        StandInRBAC.load(str(path))


# --- the check itself, against a scripted agent (memory streams, MockClock) ---------------


class _ScriptedCluster:
    """Stands in for the Server: each dial gets a memory stream whose far end
    ``answer`` serves (or, with ``answer=None``, never answers)."""

    def __init__(self, nursery: trio.Nursery, answer: bytes | None) -> None:
        self.nursery = nursery
        self.answer = answer
        self.requests: list[bytes] = []
        self.closed = 0

    async def dial(self, client_key: str, proto: str, address: str, *,
                   connect_timeout: float) -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._serve, theirs)
        return ours

    async def _serve(self, stream: trio.abc.Stream) -> None:
        buf = bytearray()
        while data := await stream.receive_some():
            buf += data
            if self.answer is not None and buf.endswith(b"}"):
                self.requests.append(bytes(buf))
                buf.clear()
                await stream.send_all(self.answer)
        self.closed += 1  # the front door closed its end


def _reply(status: int, body: bytes) -> bytes:
    return (b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (status, len(body)) + body)


async def _check(cluster: _ScriptedCluster, *headers: tuple[bytes, bytes]) -> None:
    front_door = revdial.FrontDoor(cast(Any, cluster), revdial.UserTokens({"t": "*"}))
    wanted = parse_impersonation(headers)
    assert wanted is not None
    await front_door._check_impersonation("c1", revdial.Identity("alice", ("dev",)), wanted,
                                          "192.0.2.1")


async def test_impersonation_check_answers_and_closes_its_stream(
    autojump_clock: trio.abc.Clock,
) -> None:
    allowed = _reply(201, b'{"kind":"SubjectAccessReview","status":{"allowed":true}}')
    async with trio.open_nursery() as nursery:
        cluster = _ScriptedCluster(nursery, allowed)
        await _check(cluster, (b"impersonate-user", b"bob"), (b"impersonate-group", b"ops"))
        await trio.testing.wait_all_tasks_blocked()
        # Two reviews, on one tunnel stream, closed afterwards.
        assert [json.loads(r.partition(b"\r\n\r\n")[2])["spec"]["resourceAttributes"]["resource"]
                for r in cluster.requests] == ["users", "groups"]
        assert cluster.requests[0].startswith(
            b"POST /apis/authorization.k8s.io/v1/subjectaccessreviews HTTP/1.1\r\n")
        assert json.loads(cluster.requests[0].partition(b"\r\n\r\n")[2])["spec"]["groups"] == [
            "dev", "system:authenticated"]
        assert cluster.closed == 1
        for answer, expected in (
            (_reply(403, b'{"kind":"Status"}'), "the cluster answered 403"),
            (_reply(201, b'{"kind":"Status"}'), "not a SubjectAccessReview"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nnot a", "not a SubjectAccessReview"),
            (b"garbage\r\n\r\n", "malformed answer"),
        ):
            cluster = _ScriptedCluster(nursery, answer)
            with pytest.raises(_Answer) as info:
                await _check(cluster, (b"impersonate-user", b"bob"))
            assert info.value.status == 502
            assert expected in info.value.message
            await trio.testing.wait_all_tasks_blocked()
            assert cluster.closed == 1
        denied = _reply(201, b'{"status":{"allowed":false,"reason":"no rule"}}')
        with pytest.raises(_Answer) as info:
            await _check(_ScriptedCluster(nursery, denied), (b"impersonate-user", b"bob"))
        assert info.value.status == 403
        assert info.value.content_type == "application/json"
        assert json.loads(info.value.message)["message"] == (
            _forbidden("alice", "users", "bob") + ": no rule")


async def test_impersonation_check_that_hangs_is_504_at_connect_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = _ScriptedCluster(nursery, None)  # reads the review, never answers
        t0 = trio.current_time()
        with pytest.raises(_Answer) as info:
            await _check(cluster, (b"impersonate-user", b"bob"))
        assert info.value.status == 504
        assert trio.current_time() - t0 == DEFAULT_PROXY_LIMITS.connect_timeout
        await trio.testing.wait_all_tasks_blocked()
        assert cluster.closed == 1  # the tunnel stream was closed, not leaked
