"""A stand-in Kubernetes API server, for ``revdial demo`` and the tests.

It is not Kubernetes: it serves just enough of the shape for the official
clients to list and watch -- ``/version``, discovery (``/api``, ``/api/v1``,
``/apis``), namespaces (read-only), config maps (list, get, create,
replace, delete, and watch with ``resourceVersion`` and ``timeoutSeconds``)
and pods (list, get, delete and watch; :meth:`StandInAPIServer.create_pod`
adds them, as a scheduler would),
with Kubernetes' JSON, ``Status`` errors and watch events (one JSON object
per line of a chunked response, each sent the moment it happens). Plus a few
diagnostic endpoints under ``/revdial/``:

* ``/revdial/echo`` (any method): the request as JSON -- method, target,
  headers, body size and SHA-256;
* ``/revdial/sha256`` (POST/PUT): streams the body, answers its size and SHA-256;
* ``/revdial/bytes?size=N&seed=S[&chunked=1]``: :func:`pattern` bytes;
* ``/revdial/upgrade``: with ``Upgrade: websocket`` a WebSocket echo
  (wsproto), with any other protocol (``SPDY/3.1``) a raw byte echo after
  the 101.

With ``rbac=`` (:class:`StandInRBAC`) it authenticates bearer tokens and
honours impersonation (``Impersonate-User``/``Impersonate-Group``) with a
tiny RBAC model, enough to show per-user rights through the front door: 401
for an unknown token, 403 with a Kubernetes ``Forbidden`` Status for what the
(impersonated) user may not do. Without it every request is allowed.

Built on h11 and trio like the rest of revdial, with no other dependency, so
the demo needs nothing beyond the package. Bodies are streamed; memory stays
flat for any size. :class:`HTTPConnection` is the matching minimal client.
"""

from __future__ import annotations

import hashlib
import json
import logging
import ssl
import struct
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Iterable,
    Iterator,
    Mapping,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import generate_accept_token

from ._impersonation import attributes as impersonation_attributes
from ._impersonation import forbidden_status, parse_impersonation

__all__ = [
    "HTTPConnection",
    "HTTPResponse",
    "StandInAPIServer",
    "StandInRBAC",
    "pattern",
    "pattern_sha256",
]

log = logging.getLogger("revdial.standin")

KiB = 1024
_READ = 256 * KiB
_MAX_JSON = 1024 * KiB  # Kubernetes allows 3 MiB objects; a stand-in needs less
_WATCH_QUEUE = 256  # events buffered per watcher before it is dropped (as the apiserver)
_HISTORY = 1000  # events kept for watches that resume from a resourceVersion
_PATTERN_BLOCK = 64 * KiB
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
#: The namespaced resources served, by plural name, with their kinds.
_KINDS = {"configmaps": "ConfigMap", "pods": "Pod"}
_RESOURCES = {kind: resource for resource, kind in _KINDS.items()}


def pattern(seed: int, size: int) -> Iterator[bytes]:
    """``size`` deterministic bytes in 64 KiB blocks (block ``i`` starts with ``i``)."""
    base = hashlib.sha256(b"revdial-%d" % seed).digest() * (_PATTERN_BLOCK // 32)
    sent = 0
    index = 0
    while sent < size:
        n = min(_PATTERN_BLOCK, size - sent)
        yield (struct.pack(">Q", index) + base[8:])[:n]
        sent += n
        index += 1


def pattern_sha256(seed: int, size: int) -> str:
    h = hashlib.sha256()
    for block in pattern(seed, size):
        h.update(block)
    return h.hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure" if code >= 400 else "Success",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass(frozen=True)
class StandInRBAC:
    """The stand-in's authentication and authorization: small, not Kubernetes'.

    * ``tokens`` maps each bearer token to a user name; a request without a
      known token gets 401 ``Unauthorized``.
    * ``impersonators`` are the users allowed to impersonate any user, group,
      uid and extra; others may impersonate what their rules allow (verb
      ``impersonate``, below), as Kubernetes checks it: ``users`` NAME,
      ``groups`` NAME, ``serviceaccounts`` NAME (for
      ``system:serviceaccount:NS:NAME``), ``uids`` and ``userextras/KEY``.
      Anything else sending ``Impersonate-*`` gets 403 with Kubernetes'
      message. ``Impersonate-Group`` needs ``Impersonate-User`` (400). An
      impersonated user is in its groups plus ``system:authenticated``; a
      token's own user is in that group only.
    * ``rules`` maps a subject -- a user name, or ``group:NAME`` -- to rules
      ``"VERB RESOURCE [NAME]"`` (``"list pods"``, ``"get configmaps"``,
      ``"impersonate users bob"``), ``*`` for verb or resource; without NAME
      every name. Verbs: ``get``, ``list``, ``watch``, ``create``,
      ``update``, ``delete``, ``impersonate``; resources: ``pods``,
      ``configmaps``, ``namespaces`` (in every namespace),
      ``subjectaccessreviews`` (``create``: ``POST
      /apis/authorization.k8s.io/v1/subjectaccessreviews``, answered from
      this same model) and the impersonation ones above. What no rule
      allows gets 403 ``Forbidden`` with Kubernetes' message. Version,
      discovery, health and the ``/revdial/`` diagnostics are open to every
      authenticated user.
    """

    tokens: Mapping[str, str]
    impersonators: frozenset[str] = frozenset()
    rules: Mapping[str, Iterable[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str) -> StandInRBAC:
        """Read ``{"tokens": {TOKEN: USER}, "impersonators": [USER],
        "rules": {SUBJECT: ["VERB RESOURCE"]}}`` from a JSON file."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        try:
            tokens = {str(k): str(v) for k, v in data["tokens"].items()}
            impersonators = frozenset(str(u) for u in data.get("impersonators", []))
            rules = {str(k): [str(r) for r in v] for k, v in data.get("rules", {}).items()}
        except (KeyError, AttributeError, TypeError) as exc:
            raise ValueError(f"{path}: expected {{'tokens': {{...}}, 'impersonators': [...], "
                             f"'rules': {{...}}}} ({type(exc).__name__})") from None
        return cls(tokens, impersonators, rules)

    def authenticate(self, headers: Mapping[str, list[str]]) -> tuple[str, tuple[str, ...]]:
        """``(user, groups)`` the request acts as; raises the 400/401/403 answers."""
        auth = headers.get("authorization", [])
        scheme, _, token = (auth[0] if len(auth) == 1 else "").partition(" ")
        user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise _HTTPError(401, "Unauthorized", "Unauthorized")
        raw = [(name.encode("latin-1"), value.encode("latin-1"))
               for name, values in headers.items() for value in values]
        try:
            wanted = parse_impersonation(raw)
        except ValueError as exc:
            raise _HTTPError(400, "BadRequest", str(exc)) from None
        if wanted is None:
            return user, ("system:authenticated",)
        if user not in self.impersonators:
            groups = ("system:authenticated",)
            for attrs in impersonation_attributes(wanted):
                resource = attrs.resource + (f"/{attrs.subresource}" if attrs.subresource
                                             else "")
                if not self.allows(user, groups, "impersonate", resource, attrs.name):
                    status = forbidden_status(user, attrs)
                    raise _HTTPError(403, "Forbidden", status["message"],
                                     details=status["details"])
        return wanted.user, (*wanted.groups, "system:authenticated")

    def allows(
        self, user: str, groups: Iterable[str], verb: str, resource: str,
        name: str | None = None,
    ) -> bool:
        """Whether a rule of ``user`` or one of ``groups`` allows this."""
        if verb == "impersonate" and user in self.impersonators:
            return True
        subjects = [user, *(f"group:{g}" for g in groups)]
        for subject in subjects:
            for rule in self.rules.get(subject, ()):
                rule_verb, rule_resource, *rule_name = rule.split()
                if (rule_verb in ("*", verb) and rule_resource in ("*", resource)
                        and (not rule_name or rule_name[0] == name)):
                    return True
        return False


class _Request:
    """One request being served: head, and the body read on demand."""

    def __init__(self, conn: h11.Connection, stream: trio.abc.Stream, event: h11.Request) -> None:
        self.conn = conn
        self.stream = stream
        self.method = event.method.decode("ascii")
        self.target = event.target.decode("latin-1")
        parts = urlsplit(self.target)
        self.path = parts.path
        self.query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.raw_headers = [(n.decode("latin-1"), v.decode("latin-1"))
                            for n, v in event.headers.raw_items()]
        self.headers = {n.lower(): v for n, v in self.raw_headers}
        self.header_lists: dict[str, list[str]] = {}
        for n, v in self.raw_headers:
            self.header_lists.setdefault(n.lower(), []).append(v)
        #: ``(user, groups)`` the request acts as (with :class:`StandInRBAC`).
        self.user: tuple[str, tuple[str, ...]] | None = None
        self.http_version = event.http_version.decode("ascii")

    async def _next(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(_READ)))
                continue
            assert isinstance(event, h11.Event)
            return event

    async def body(self) -> AsyncIterator[bytes]:
        while self.conn.their_state is h11.SEND_BODY:
            event = await self._next()
            if isinstance(event, h11.Data):
                yield bytes(event.data)

    async def read_json(self) -> Any:
        buf = bytearray()
        async for chunk in self.body():
            buf += chunk
            if len(buf) > _MAX_JSON:
                raise _HTTPError(413, "RequestEntityTooLarge", "request body too large")
        try:
            return json.loads(buf)
        except ValueError:
            raise _HTTPError(400, "BadRequest", "request body is not JSON") from None

    async def send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def respond(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else (json.dumps(body) + "\n").encode()
        out = self.conn.send(h11.Response(status_code=status, headers=[
            ("content-type", content_type), ("content-length", str(len(data)))])) or b""
        if self.method != "HEAD":
            out += self.conn.send(h11.Data(data=data)) or b""
        out += self.conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(out)  # one write, as a real server's buffered writer


class _HTTPError(Exception):
    def __init__(
        self, code: int, reason: str, message: str, *, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.details = details


@dataclass(eq=False)
class _Watcher:
    resource: str
    namespace: str | None
    send: trio.MemorySendChannel[bytes]


class StandInAPIServer:
    """A few Kubernetes-shaped endpoints over HTTP/1.1 (HTTPS with ``ssl_context``).

    ``await nursery.start(api.serve, "127.0.0.1", 0)`` reports the bound
    port. :meth:`create_configmap`, :meth:`replace_configmap` and
    :meth:`delete_configmap` change the store directly (watchers see the
    events), as a controller in a real cluster would.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        namespaces: Iterable[str] = ("default", "kube-system"),
        rbac: StandInRBAC | None = None,
    ) -> None:
        self._ssl_context = ssl_context
        #: Authentication and authorization; ``None``: every request is allowed.
        self.rbac = rbac
        #: ``(user, groups, "METHOD path")`` of each authenticated request (with ``rbac``).
        self.requests_as: list[tuple[str, tuple[str, ...], str]] = []
        self._rv = 1
        self._uid = 0
        self._namespaces = {ns: self._object("Namespace", None, ns) for ns in namespaces}
        for obj in self._namespaces.values():
            obj["status"] = {"phase": "Active"}
        self._configmaps: dict[tuple[str, str], dict[str, Any]] = {}
        self._pods: dict[tuple[str, str], dict[str, Any]] = {}
        #: ``(resourceVersion, event line, resource, namespace)`` of recent changes.
        self._history: deque[tuple[int, bytes, str, str]] = deque(maxlen=_HISTORY)
        self._watchers: set[_Watcher] = set()
        #: Requests served so far, by ``METHOD path``.
        self.requests: list[str] = []
        #: SubjectAccessReviews answered: ``(user, verb, resource, name)``.
        self.reviews: list[tuple[str, str, str, str]] = []
        #: Bound ``(host, port)`` once :meth:`serve` has started.
        self.address: tuple[str, int] | None = None

    @property
    def port(self) -> int:
        if self.address is None:
            raise RuntimeError("not serving yet")
        return self.address[1]

    # --- the store ----------------------------------------------------------

    def _object(self, kind: str, namespace: str | None, name: str) -> dict[str, Any]:
        self._uid += 1
        meta: dict[str, Any] = {
            "name": name,
            "uid": f"00000000-0000-4000-8000-{self._uid:012d}",
            "resourceVersion": str(self._rv),
            "creationTimestamp": _now(),
        }
        if namespace is not None:
            meta["namespace"] = namespace
        return {"kind": kind, "apiVersion": "v1", "metadata": meta}

    def _emit(self, kind: str, obj: dict[str, Any]) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        line = (json.dumps({"type": kind, "object": obj}) + "\n").encode()
        namespace = obj["metadata"].get("namespace")
        resource = _RESOURCES[obj["kind"]]
        self._history.append((rv, line, resource, namespace))
        for watcher in list(self._watchers):
            if watcher.resource != resource or watcher.namespace not in (None, namespace):
                continue
            try:
                watcher.send.send_nowait(line)
            except trio.WouldBlock:  # too slow: end its watch, it will resume
                self._watchers.discard(watcher)
                watcher.send.close()

    def create_configmap(
        self, namespace: str, name: str, data: dict[str, str] | None = None
    ) -> dict[str, Any]:
        if namespace not in self._namespaces:
            raise KeyError(f"namespace {namespace!r} not found")
        if (namespace, name) in self._configmaps:
            raise ValueError(f'configmaps "{name}" already exists')
        self._rv += 1
        obj = self._object("ConfigMap", namespace, name)
        obj["data"] = dict(data or {})
        self._configmaps[namespace, name] = obj
        self._emit("ADDED", obj)
        return obj

    def replace_configmap(self, namespace: str, name: str, data: dict[str, str]) -> dict[str, Any]:
        obj = self._configmaps[namespace, name]
        self._rv += 1
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self._rv)},
               "data": dict(data)}
        self._configmaps[namespace, name] = obj
        self._emit("MODIFIED", obj)
        return obj

    def delete_configmap(self, namespace: str, name: str) -> dict[str, Any]:
        obj = self._configmaps.pop((namespace, name))
        self._rv += 1
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self._rv)}}
        self._emit("DELETED", obj)
        return obj

    def configmaps(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return [o for (ns, _), o in sorted(self._configmaps.items())
                if namespace in (None, ns)]

    def create_pod(
        self, namespace: str, name: str, *, phase: str = "Running", image: str = "nginx:1.27"
    ) -> dict[str, Any]:
        """Add a pod with one container (ready when ``phase`` is ``Running``)."""
        if namespace not in self._namespaces:
            raise KeyError(f"namespace {namespace!r} not found")
        if (namespace, name) in self._pods:
            raise ValueError(f'pods "{name}" already exists')
        self._rv += 1
        obj = self._object("Pod", namespace, name)
        running = phase == "Running"
        obj["spec"] = {"containers": [{"name": "main", "image": image}],
                       "nodeName": "standin-node"}
        obj["status"] = {
            "phase": phase,
            "podIP": f"10.244.0.{len(self._pods) % 250 + 2}",
            "containerStatuses": [{
                "name": "main", "image": image, "imageID": "", "ready": running,
                "restartCount": 0, "started": running,
                "state": {"running": {"startedAt": obj["metadata"]["creationTimestamp"]}}
                if running else {"waiting": {"reason": "ContainerCreating"}},
            }],
        }
        self._pods[namespace, name] = obj
        self._emit("ADDED", obj)
        return obj

    def delete_pod(self, namespace: str, name: str) -> dict[str, Any]:
        obj = self._pods.pop((namespace, name))
        self._rv += 1
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self._rv)}}
        self._emit("DELETED", obj)
        return obj

    def pods(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return [o for (ns, _), o in sorted(self._pods.items()) if namespace in (None, ns)]

    def _store(self, resource: str) -> dict[tuple[str, str], dict[str, Any]]:
        return self._configmaps if resource == "configmaps" else self._pods

    # --- serving ------------------------------------------------------------

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.address = cast("tuple[str, int]", tuple(listeners[0].socket.getsockname()[:2]))
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle_tcp, listeners)
            task_status.started(self.address)

    async def _handle_tcp(self, tcp: trio.SocketStream) -> None:
        stream: trio.abc.Stream = tcp
        if self._ssl_context is not None:
            stream = trio.SSLStream(tcp, self._ssl_context, server_side=True,
                                    https_compatible=True)
        await self.handle(stream)

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one HTTP/1.1 connection (keep-alive) until it closes."""
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req = None
                while req is None:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(bytes(await stream.receive_some(_READ)))
                    elif isinstance(event, h11.Request):
                        req = _Request(conn, stream, event)
                    else:
                        return  # ConnectionClosed
                self.requests.append(f"{req.method} {req.path}")
                try:
                    upgraded = await self._dispatch(req)
                except _HTTPError as exc:
                    if conn.our_state is not h11.SEND_RESPONSE:
                        return
                    status = _status(exc.code, exc.reason, str(exc))
                    if exc.details is not None:
                        status["details"] = exc.details
                    await req.respond(exc.code, status)
                    upgraded = False
                if upgraded:
                    return
                async for _ in req.body():  # drain what the handler did not read
                    pass
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (h11.ProtocolError, *_STREAM_ERRORS):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _dispatch(self, req: _Request) -> bool:
        """Serve ``req``; True if the connection was upgraded (and is now done)."""
        path, method = req.path.rstrip("/") or "/", req.method
        if self.rbac is not None:
            req.user = self.rbac.authenticate(req.header_lists)
            self.requests_as.append((*req.user, f"{method} {req.path}"))
        if path == "/revdial/upgrade":
            return await self._upgrade(req)
        if path == "/revdial/echo":
            h = hashlib.sha256()
            size = 0
            async for chunk in req.body():
                h.update(chunk)
                size += len(chunk)
            await req.respond(200, {
                "method": method, "target": req.target, "http_version": req.http_version,
                "headers": req.raw_headers, "body_size": size, "body_sha256": h.hexdigest(),
            })
            return False
        if path == "/revdial/sha256" and method in ("POST", "PUT"):
            h = hashlib.sha256()
            size = 0
            async for chunk in req.body():
                h.update(chunk)
                size += len(chunk)
            await req.respond(200, {"size": size, "sha256": h.hexdigest()})
            return False
        if path == "/revdial/bytes":
            size, seed = int(req.query.get("size", "0")), int(req.query.get("seed", "0"))
            chunked = req.query.get("chunked") == "1"
            headers = [("content-type", "application/octet-stream")]
            if not chunked:
                headers.append(("content-length", str(size)))
            await req.send(h11.Response(status_code=200, headers=headers))
            if method != "HEAD":
                for block in pattern(seed, size):
                    await req.send(h11.Data(data=block))
            await req.send(h11.EndOfMessage())
            return False
        if path == "/apis/authorization.k8s.io/v1/subjectaccessreviews":
            await self._subject_access_review(req)
            return False
        if path in ("/healthz", "/readyz", "/livez"):
            await req.respond(200, b"ok", "text/plain")
            return False
        await self._kubernetes(req, path, method)
        return False

    # --- Kubernetes ---------------------------------------------------------

    async def _kubernetes(self, req: _Request, path: str, method: str) -> None:
        parts = path.strip("/").split("/")
        if path == "/version":
            await req.respond(200, {
                "major": "1", "minor": "30", "gitVersion": "v1.30.0-revdial-standin",
                "platform": "linux/amd64", "goVersion": "go1.22", "compiler": "gc",
                "gitCommit": "0" * 40, "gitTreeState": "clean",
                "buildDate": "2024-01-01T00:00:00Z",
            })
        elif path == "/api":
            await req.respond(200, {"kind": "APIVersions", "versions": ["v1"],
                                    "serverAddressByClientCIDRs": []})
        elif path == "/apis":
            await req.respond(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
        elif path == "/api/v1":
            await req.respond(200, {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                {"name": "namespaces", "singularName": "namespace", "namespaced": False,
                 "kind": "Namespace", "verbs": ["get", "list"]},
                {"name": "configmaps", "singularName": "configmap", "namespaced": True,
                 "kind": "ConfigMap", "shortNames": ["cm"],
                 "verbs": ["create", "delete", "get", "list", "update", "watch"]},
                {"name": "pods", "singularName": "pod", "namespaced": True,
                 "kind": "Pod", "shortNames": ["po"], "categories": ["all"],
                 "verbs": ["delete", "get", "list", "watch"]},
            ]})
        elif parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
            if method != "GET":
                raise _HTTPError(405, "MethodNotAllowed", f"{method} is not supported here")
            self._authorize(req, "namespaces", None, named=len(parts) == 4)
            if len(parts) == 4:
                ns = self._namespaces.get(parts[3])
                if ns is None:
                    raise _HTTPError(404, "NotFound", f'namespaces "{parts[3]}" not found')
                await req.respond(200, ns)
            else:
                await req.respond(200, self._list("NamespaceList",
                                                  list(self._namespaces.values())))
        elif len(parts) == 3 and parts[:2] == ["api", "v1"] and parts[2] in _KINDS:
            await self._collection(req, parts[2], None)
        elif parts[:3] == ["api", "v1", "namespaces"] and parts[4:5] and parts[4] in _KINDS:
            namespace, resource = parts[3], parts[4]
            if namespace not in self._namespaces:
                raise _HTTPError(404, "NotFound", f'namespaces "{namespace}" not found')
            if len(parts) == 5:
                await self._collection(req, resource, namespace)
            elif len(parts) == 6:
                await self._item(req, resource, namespace, parts[5])
            else:
                raise _HTTPError(404, "NotFound", "the server could not find the requested "
                                 "resource")
        else:
            raise _HTTPError(404, "NotFound", "the server could not find the requested resource")

    async def _subject_access_review(self, req: _Request) -> None:
        """``POST`` a SubjectAccessReview: answered from :class:`StandInRBAC`
        (everything allowed without it), as Kubernetes answers it: 201."""
        if req.method != "POST":
            raise _HTTPError(405, "MethodNotAllowed", f"{req.method} is not supported here")
        if self.rbac is not None and req.user is not None:
            user, groups = req.user
            if not self.rbac.allows(user, groups, "create", "subjectaccessreviews"):
                raise _HTTPError(
                    403, "Forbidden",
                    f'subjectaccessreviews.authorization.k8s.io is forbidden: User "{user}" '
                    'cannot create resource "subjectaccessreviews" in API group '
                    '"authorization.k8s.io" at the cluster scope',
                    details={"group": "authorization.k8s.io", "kind": "subjectaccessreviews"})
        body = await req.read_json()
        spec = body.get("spec") if isinstance(body, dict) else None
        attrs = spec.get("resourceAttributes") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or not isinstance(attrs, dict):
            raise _HTTPError(422, "Invalid", "spec.resourceAttributes: Required value")
        who = spec.get("user")
        groups_in = spec.get("groups") or []
        if not isinstance(who, str) or not who or not isinstance(groups_in, list):
            raise _HTTPError(422, "Invalid", "spec.user: Required value")
        resource = str(attrs.get("resource", ""))
        if attrs.get("subresource"):
            resource += f"/{attrs['subresource']}"
        name = attrs.get("name")
        allowed = self.rbac is None or self.rbac.allows(
            who, [str(g) for g in groups_in], str(attrs.get("verb", "")), resource,
            str(name) if name else None)
        self.reviews.append((who, str(attrs.get("verb", "")), resource, str(name or "")))
        status: dict[str, Any] = {"allowed": allowed}
        if allowed and self.rbac is None:
            status["reason"] = "the stand-in has no RBAC: everything is allowed"
        await req.respond(201, {
            "kind": "SubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": None}, "spec": spec, "status": status})

    def _list(self, kind: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"kind": kind, "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def _authorize(
        self, req: _Request, resource: str, namespace: str | None, *, named: bool
    ) -> None:
        """403 ``Forbidden`` (Kubernetes' wording) unless ``req.user`` may do this."""
        if self.rbac is None or req.user is None:
            return
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete"}.get(req.method, "get")
        if verb == "get" and not named:
            verb = "watch" if req.query.get("watch") in ("1", "true") else "list"
        user, groups = req.user
        if self.rbac.allows(user, groups, verb, resource):
            return
        where = (f'in the namespace "{namespace}"' if namespace is not None
                 else "at the cluster scope")
        raise _HTTPError(403, "Forbidden",
                         f'{resource} is forbidden: User "{user}" cannot {verb} resource '
                         f'"{resource}" in API group "" {where}', details={"kind": resource})

    async def _collection(self, req: _Request, resource: str, namespace: str | None) -> None:
        self._authorize(req, resource, namespace, named=False)
        if req.method == "GET":
            if req.query.get("watch") in ("1", "true"):
                await self._watch(req, resource, namespace)
            else:
                items = [o for (ns, _), o in sorted(self._store(resource).items())
                         if namespace in (None, ns)]
                await req.respond(200, self._list(_KINDS[resource] + "List", items))
        elif req.method == "POST" and namespace is not None and resource == "configmaps":
            body = await req.read_json()
            name = (body.get("metadata") or {}).get("name") if isinstance(body, dict) else None
            if not isinstance(name, str) or not name:
                raise _HTTPError(422, "Invalid", "metadata.name: Required value")
            try:
                obj = self.create_configmap(namespace, name, body.get("data") or {})
            except ValueError as exc:
                raise _HTTPError(409, "AlreadyExists", str(exc)) from None
            await req.respond(201, obj)
        else:
            raise _HTTPError(405, "MethodNotAllowed", f"{req.method} is not supported here")

    async def _item(self, req: _Request, resource: str, namespace: str, name: str) -> None:
        self._authorize(req, resource, namespace, named=True)
        store = self._store(resource)
        if (namespace, name) not in store:
            raise _HTTPError(404, "NotFound", f'{resource} "{name}" not found')
        if req.method == "GET":
            await req.respond(200, store[namespace, name])
        elif req.method == "PUT" and resource == "configmaps":
            body = await req.read_json()
            data = body.get("data") if isinstance(body, dict) else None
            await req.respond(200, self.replace_configmap(namespace, name, data or {}))
        elif req.method == "DELETE":
            delete = self.delete_configmap if resource == "configmaps" else self.delete_pod
            obj = delete(namespace, name)
            status = _status(200, "", "")
            status["details"] = {"name": name, "kind": resource,
                                 "uid": obj["metadata"]["uid"]}
            await req.respond(200, status)
        else:
            raise _HTTPError(405, "MethodNotAllowed", f"{req.method} is not supported here")

    async def _watch(self, req: _Request, resource: str, namespace: str | None) -> None:
        send, receive = trio.open_memory_channel[bytes](_WATCH_QUEUE)
        rv_text = req.query.get("resourceVersion", "")
        initial: list[bytes] = []
        expired = False
        if rv_text in ("", "0"):
            for (ns, _), obj in sorted(self._store(resource).items()):
                if namespace not in (None, ns):
                    continue
                initial.append((json.dumps({"type": "ADDED", "object": obj}) + "\n").encode())
        else:
            try:
                since = int(rv_text)
            except ValueError:
                raise _HTTPError(400, "BadRequest", "bad resourceVersion") from None
            if self._history and since < self._history[0][0] - 1:
                gone = _status(410, "Expired", f"too old resource version: {since}")
                initial.append((json.dumps({"type": "ERROR", "object": gone}) + "\n").encode())
                expired = True
            else:
                initial += [line for rv, line, res, ns in self._history
                            if rv > since and res == resource and namespace in (None, ns)]
        watcher = _Watcher(resource, namespace, send)
        if expired:
            send.close()
        else:
            self._watchers.add(watcher)
        timeout = float(req.query.get("timeoutSeconds", "0") or 0) or float("inf")
        try:
            await req.send(h11.Response(status_code=200, headers=[
                ("content-type", "application/json"), ("cache-control", "no-cache")]))
            for line in initial:
                await req.send(h11.Data(data=line))
            with trio.move_on_after(timeout):
                async with receive:
                    async for line in receive:
                        await req.send(h11.Data(data=line))
            await req.send(h11.EndOfMessage())
        finally:
            self._watchers.discard(watcher)
            send.close()

    # --- upgrades -----------------------------------------------------------

    async def _upgrade(self, req: _Request) -> bool:
        protocol = req.headers.get("upgrade", "")
        if "upgrade" not in req.headers.get("connection", "").lower() or not protocol:
            raise _HTTPError(400, "BadRequest", "this endpoint needs Connection: Upgrade")
        async for _ in req.body():
            pass
        websocket = protocol.lower() == "websocket"
        headers = [("connection", "Upgrade"), ("upgrade", protocol)]
        if websocket:
            key = req.headers.get("sec-websocket-key", "").encode()
            headers.append(("sec-websocket-accept", generate_accept_token(key).decode()))
        await req.send(h11.InformationalResponse(status_code=101, headers=headers))
        extra, _ = req.conn.trailing_data
        stream = req.stream
        if websocket:
            await _websocket_echo(stream, extra)
        else:
            if extra:
                await stream.send_all(extra)
            while data := await stream.receive_some(_READ):
                await stream.send_all(data)
        return True


async def _websocket_echo(stream: trio.abc.Stream, data: bytes) -> None:
    ws = WSConnection(ConnectionType.SERVER)
    while True:
        if data:
            ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, TextMessage | BytesMessage):
                await stream.send_all(ws.send(type(event)(
                    data=event.data,  # type: ignore[arg-type]
                    message_finished=event.message_finished)))
            elif isinstance(event, Ping):
                await stream.send_all(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                await stream.send_all(ws.send(event.response()))
                return
        data = bytes(await stream.receive_some(_READ))
        if not data:
            return


# --- a minimal HTTP/1.1 client ---------------------------------------------------


@dataclass
class HTTPResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        values = [v.decode("latin-1") for n, v in self.headers if n.lower() == key]
        return ", ".join(values) if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


Body = bytes | AsyncIterable[bytes] | None


class HTTPConnection:
    """A minimal keep-alive HTTP/1.1 client on any ``trio.abc.Stream`` (h11).

    ``async with await HTTPConnection.open(host, port) as conn:`` then
    ``await conn.request("GET", "/version")`` (whole body) or ``async with
    conn.stream(...) as (response, chunks):`` to iterate the body as it
    arrives. A body given as an async iterable is sent chunked (or with
    ``content_length``), concurrently with reading the response.
    """

    def __init__(self, stream: trio.abc.Stream, host: str = "localhost") -> None:
        self.stream = stream
        self.host = host
        self._conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(
        cls, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None
    ) -> HTTPConnection:
        tcp = await trio.open_tcp_stream(host, port)
        stream: trio.abc.Stream = tcp
        if ssl_context is not None:
            stream = trio.SSLStream(tcp, ssl_context, server_hostname=host, https_compatible=True)
        return cls(stream, f"{host}:{port}")

    async def __aenter__(self) -> HTTPConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    @property
    def reusable(self) -> bool:
        states = (self._conn.our_state, self._conn.their_state)
        return states in ((h11.IDLE, h11.IDLE), (h11.DONE, h11.DONE))

    async def _send(self, event: h11.Event) -> None:
        data = self._conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def _next(self) -> h11.Event:
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                self._conn.receive_data(bytes(await self.stream.receive_some(_READ)))
                continue
            if not isinstance(event, h11.Event):
                raise h11.RemoteProtocolError("unexpected data after the response")
            return event

    async def request(
        self,
        method: str,
        target: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: Body = None,
        content_length: int | None = None,
    ) -> HTTPResponse:
        async with self.stream_request(method, target, headers=headers, body=body,
                                       content_length=content_length) as (response, chunks):
            buf = bytearray()
            async for chunk in chunks:
                buf += chunk
            response.body = bytes(buf)
            return response

    @asynccontextmanager
    async def stream_request(
        self,
        method: str,
        target: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: Body = None,
        content_length: int | None = None,
    ) -> AsyncIterator[tuple[HTTPResponse, AsyncIterator[bytes]]]:
        """Send a request; yield the response head and an iterator of its body."""
        if self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE:
            self._conn.start_next_cycle()
        all_headers = list(headers)
        names = {n.lower() for n, _ in all_headers}
        if "host" not in names:
            all_headers.insert(0, ("host", self.host))
        if isinstance(body, bytes):
            all_headers.append(("content-length", str(len(body))))
        elif body is not None:
            all_headers.append(("content-length", str(content_length)) if content_length is not None
                               else ("transfer-encoding", "chunked"))
        await self._send(h11.Request(method=method, target=target, headers=all_headers))

        async def upload() -> None:
            if isinstance(body, bytes):
                if body:
                    await self._send(h11.Data(data=body))
            elif body is not None:
                pieces = aiter(body)
                try:
                    async for piece in pieces:
                        await self._send(h11.Data(data=piece))
                finally:  # an early answer cancels the upload: close the generator
                    aclose = getattr(pieces, "aclose", None)
                    if aclose is not None:
                        with trio.CancelScope(shield=True):
                            await aclose()
            await self._send(h11.EndOfMessage())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            event = await self._next()
            while isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                event = await self._next()
            assert isinstance(event, h11.Response | h11.InformationalResponse)
            response = HTTPResponse(event.status_code, list(event.headers.raw_items()))

            async def chunks() -> AsyncGenerator[bytes, None]:
                if isinstance(event, h11.InformationalResponse):
                    return
                while True:
                    ev = await self._next()
                    if isinstance(ev, h11.Data):
                        yield bytes(ev.data)
                    elif isinstance(ev, h11.EndOfMessage):
                        return

            body_chunks = chunks()
            try:
                yield response, body_chunks
            finally:
                await body_chunks.aclose()
            if self._conn.our_state is not h11.DONE:
                nursery.cancel_scope.cancel()  # answered before the upload ended

    def trailing_data(self) -> bytes:
        """Bytes received after a 101 (the switched protocol's first bytes)."""
        return self._conn.trailing_data[0]


def main(argv: list[str] | None = None) -> int:
    """``python -m revdial._standin [--host H] [--port P]``: serve until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m revdial._standin",
                                     description=StandInAPIServer.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6443)
    parser.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this chain")
    parser.add_argument("--tls-key", metavar="FILE")
    parser.add_argument("--rbac", metavar="FILE",
                        help="authenticate and authorize (StandInRBAC) as this JSON file says: "
                        '{"tokens": {TOKEN: USER}, "impersonators": [USER], '
                        '"rules": {"alice" or "group:NAME": ["list pods", ...]}}')
    args = parser.parse_args(argv)
    rbac = StandInRBAC.load(args.rbac) if args.rbac else None
    ctx = None
    if args.tls_cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)

    async def run() -> None:
        api = StandInAPIServer(ssl_context=ctx, rbac=rbac)
        api.create_configmap("default", "example", {"hello": "world"})
        api.create_pod("default", "web-0")
        api.create_pod("default", "web-1")
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(api.serve, args.host, args.port)
            scheme = "https" if ctx else "http"
            print(f"stand-in API server on {scheme}://{host}:{port}", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
