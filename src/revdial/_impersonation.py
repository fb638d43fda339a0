"""``kubectl --as`` through the front door: the cluster's RBAC decides.

A front-door user mapped to a Kubernetes identity (``user=alice``) reaches
the cluster as ``Impersonate-User: alice``, sent by the agent's service
account. Kubernetes has no nested impersonation, so when alice's own request
asks to act as someone else (``Impersonate-User: bob``, ``--as-group``,
``--as-uid``, ``Impersonate-Extra-*``) the front door asks the cluster first,
as Rancher does: one ``SubjectAccessReview`` per attribute Kubernetes would
check itself (its ``WithImpersonation`` filter):

* ``Impersonate-User: X``: resource ``users``, name X (for
  ``system:serviceaccount:NS:NAME``: ``serviceaccounts`` NAME in namespace NS);
* ``Impersonate-Group: G``: ``groups``, name G;
* ``Impersonate-Extra-KEY: V``: ``userextras``, subresource KEY, name V, API
  group ``authentication.k8s.io``;
* ``Impersonate-Uid: U``: ``uids``, name U, API group ``authentication.k8s.io``

-- each with verb ``impersonate``, for ``spec.user``/``spec.groups`` = the
mapped identity (its groups plus ``system:authenticated``, as the cluster
sees it). All allowed: the request goes on with the requested headers in
place of the mapping's. One denied: 403 with the ``Forbidden`` Status the API
server itself would have sent. This module holds the pure part (headers in,
attributes, review bodies, answers, a small cache) and the one HTTP/1.1
exchange of a review (h11, over any stream).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import h11
import trio

__all__ = [
    "SAR_PATH",
    "Attributes",
    "ImpersonationRequest",
    "ReviewCache",
    "ReviewError",
    "forbidden_status",
    "parse_impersonation",
    "review",
    "review_body",
]

#: Where a SubjectAccessReview is created (``POST``).
SAR_PATH = b"/apis/authorization.k8s.io/v1/subjectaccessreviews"
_AUTH_GROUP = "authentication.k8s.io"
_SA_PREFIX = "system:serviceaccount:"
#: Most impersonation headers one request may carry (each costs a review).
MAX_ATTRIBUTES = 32
#: Largest review answer read (a SubjectAccessReview is well under 4 KiB).
MAX_REVIEW_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ImpersonationRequest:
    """What a request's own ``Impersonate-*`` headers ask for."""

    user: str
    groups: tuple[str, ...] = ()
    uid: str | None = None
    #: ``(key, value)`` per ``Impersonate-Extra-KEY`` line; KEY percent-decoded, lower-case.
    extras: tuple[tuple[str, str], ...] = ()
    #: The ``Impersonate-*`` headers to send on, as received (lower-case names).
    headers: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Attributes:
    """One ``resourceAttributes`` of a review (verb ``impersonate``)."""

    resource: str
    name: str
    group: str = ""
    subresource: str = ""
    namespace: str = ""

    def as_json(self) -> dict[str, str]:
        out = {"verb": "impersonate", "group": self.group, "resource": self.resource,
               "name": self.name}
        if self.subresource:
            out["subresource"] = self.subresource
        if self.namespace:
            out["namespace"] = self.namespace
        return out


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("impersonation headers must be UTF-8") from None


def parse_impersonation(headers: Iterable[tuple[bytes, bytes]]) -> ImpersonationRequest | None:
    """The request's ``Impersonate-*`` headers (lower-case names), or ``None``.

    Raises ``ValueError`` as Kubernetes refuses them: groups, a uid or extras
    without exactly one ``Impersonate-User``, two uids, or more than
    :data:`MAX_ATTRIBUTES` headers.
    """
    found = [(n, v) for n, v in headers if n.startswith(b"impersonate-")]
    if not found:
        return None
    if len(found) > MAX_ATTRIBUTES:
        raise ValueError(f"more than {MAX_ATTRIBUTES} impersonation headers")
    users: list[str] = []
    groups: list[str] = []
    uids: list[str] = []
    extras: list[tuple[str, str]] = []
    for name, value in found:
        if name == b"impersonate-user":
            users.append(_text(value))
        elif name == b"impersonate-group":
            groups.append(_text(value))
        elif name == b"impersonate-uid":
            uids.append(_text(value))
        elif name.startswith(b"impersonate-extra-") and len(name) > len(b"impersonate-extra-"):
            key = unquote(_text(name[len(b"impersonate-extra-"):])).lower()
            extras.append((key, _text(value)))
        else:
            raise ValueError(f"unknown impersonation header {name[:60].decode('latin-1')!r}")
    if len(users) != 1 or not users[0]:
        raise ValueError("impersonating groups, a uid or extras needs exactly one "
                         "Impersonate-User")
    if len(uids) > 1:
        raise ValueError("at most one Impersonate-Uid")
    return ImpersonationRequest(users[0], tuple(groups), uids[0] if uids else None,
                                tuple(extras), tuple(found))


def attributes(request: ImpersonationRequest) -> list[Attributes]:
    """What the cluster would authorize for ``request``, in Kubernetes' order."""
    out: list[Attributes] = []
    user = request.user
    namespace, _, sa_name = user.removeprefix(_SA_PREFIX).partition(":")
    if user.startswith(_SA_PREFIX) and namespace and sa_name and ":" not in sa_name:
        out.append(Attributes("serviceaccounts", sa_name, namespace=namespace))
    else:
        out.append(Attributes("users", user))
    out += [Attributes("groups", g) for g in request.groups]
    out += [Attributes("userextras", v, group=_AUTH_GROUP, subresource=k)
            for k, v in request.extras]
    if request.uid is not None:
        out.append(Attributes("uids", request.uid, group=_AUTH_GROUP))
    return out


def review_body(user: str, groups: Iterable[str], attrs: Attributes) -> bytes:
    """A ``SubjectAccessReview`` asking whether ``user`` (in ``groups``) may do ``attrs``."""
    return json.dumps({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": list(groups), "resourceAttributes": attrs.as_json()},
    }, separators=(",", ":")).encode()


def forbidden_status(user: str, attrs: Attributes, reason: str = "") -> dict[str, Any]:
    """The ``Forbidden`` Status the API server answers to a denied impersonation."""
    resource = attrs.resource + (f"/{attrs.subresource}" if attrs.subresource else "")
    where = (f'in the namespace "{attrs.namespace}"' if attrs.namespace
             else "at the cluster scope")
    qualified = f"{attrs.resource}.{attrs.group}" if attrs.group else attrs.resource
    message = (f'{qualified} "{attrs.name}" is forbidden: User "{user}" cannot impersonate '
               f'resource "{resource}" in API group "{attrs.group}" {where}')
    if reason:
        message += f": {reason[:200]}"
    details: dict[str, str] = {"name": attrs.name, "kind": attrs.resource}
    if attrs.group:
        details["group"] = attrs.group
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": "Forbidden", "details": details, "code": 403}


class ReviewError(Exception):
    """A review could not be made or its answer was not one (never says a token)."""


async def review(stream: trio.abc.Stream, host: bytes, body: bytes) -> tuple[bool, str]:
    """POST one review on ``stream`` (HTTP/1.1, kept open): ``(allowed, reason)``.

    Raises :class:`ReviewError` for an answer other than 200/201 with a
    review's status, and lets the stream's own errors through. The caller
    bounds the time; cancellation leaves the stream unusable (close it).
    """
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_REVIEW_BYTES)
    data = conn.send(h11.Request(method=b"POST", target=SAR_PATH, headers=[
        (b"host", host), (b"content-type", b"application/json"),
        (b"accept", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"user-agent", b"revdial-frontdoor")]))
    data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    await stream.send_all(data)
    status = 0
    buf = bytearray()
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                chunk = await stream.receive_some(MAX_REVIEW_BYTES)
                if not chunk:
                    raise ReviewError("the connection closed before the answer")
                conn.receive_data(bytes(chunk))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                buf += event.data
                if len(buf) > MAX_REVIEW_BYTES:
                    raise ReviewError("the answer is too large")
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ReviewError("the connection closed before the answer")
    except h11.RemoteProtocolError as exc:
        raise ReviewError(f"a malformed answer ({exc})") from None
    if status not in (200, 201):
        raise ReviewError(f"the cluster answered {status}")
    try:
        answer = json.loads(buf)
        result = answer["status"]
        allowed = result.get("allowed") is True and result.get("denied") is not True
        reason = result.get("reason", "")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ReviewError("the answer is not a SubjectAccessReview") from None
    return allowed, reason if isinstance(reason, str) else ""


class ReviewCache:
    """Recent review answers: ``ttl`` seconds each, at most ``max_entries`` (LRU).

    Keyed by everything the answer depends on (cluster, user, groups,
    attributes). ``ttl`` 0 turns it off. A removed right keeps working for at
    most ``ttl`` seconds -- the same trade the API server's own webhook
    authorizer caches make.
    """

    def __init__(self, ttl: float = 5.0, max_entries: int = 1024) -> None:
        if ttl < 0 or max_entries < 1:
            raise ValueError("ttl must be >= 0 and max_entries positive")
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[object, ...], tuple[float, bool, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[object, ...]) -> tuple[bool, str] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, allowed, reason = entry
        if trio.current_time() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return allowed, reason

    def put(self, key: tuple[object, ...], allowed: bool, reason: str) -> None:
        if self.ttl <= 0:
            return
        self._entries[key] = (trio.current_time() + self.ttl, allowed, reason)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
