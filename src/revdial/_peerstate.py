"""Peering bookkeeping between server replicas (sans-I/O: no trio, no clock).

Theory of operation
-------------------
Replicas of a revdial server connect to each other as remotedialer peers
(PROTOCOL.md 4.2). Server A dials server B's WebSocket as a client, with
``X-API-Tunnel-ID: <A's peer id>`` and ``X-API-Tunnel-Token: <peer token>``,
and announces every agent session it holds with ``AddClient
"clientKey/sessionKey"`` (one ``RemoveClient`` when it ends). B keeps, per
incoming peer session, the announced ``clientKey -> {sessionKey}``
(:class:`AnnouncedClients`) and routes a dial for a client it does not hold
itself through that session, as ``Connect(id, "clientKey::proto/address")``;
A splits the network at the first ``::`` (:func:`split_peer_network`) and
dials its own agent. Each pair of replicas so has two WebSockets, one per
direction.

Everything here is pure: the trio side (``_peers.py``, ``_server.py``) feeds
received announcements to :class:`AnnouncedClients` and asks it for routes,
and feeds each DNS answer to :class:`PeerSet` to learn which peers to add and
remove.

Bounds: one peer session records at most ``max_pairs`` announced
``(clientKey, sessionKey)`` pairs; announcements beyond it are dropped (and
counted), so a peer flooding AddClient costs at most ``max_pairs`` entries of
at most 100 payload bytes each (Go reads no more of an AddClient). A
RemoveClient for a pair never announced is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_MAX_ANNOUNCED",
    "AnnouncedClients",
    "PeerSet",
    "announcement_payload",
    "peer_network",
    "split_peer_network",
    "valid_peer_id",
]

#: Announced (clientKey, sessionKey) pairs one peer session may hold. A server
#: holds at most ``Limits.max_sessions`` (16,384) sessions, so a well-behaved
#: peer stays far below this; the bound costs at most ~13 MiB per peer.
DEFAULT_MAX_ANNOUNCED = 65536
#: Go reads at most 100 bytes of an AddClient payload; a peer id or client key
#: longer than this could not be announced intact.
MAX_KEY_BYTES = 80
#: Separator between the client key and the network in a forwarded Connect.
PEER_NETWORK_SEPARATOR = "::"


def announcement_payload(client_key: str, session_key: int) -> bytes:
    """The AddClient/RemoveClient payload ``clientKey/sessionKey`` (PROTOCOL 2.4)."""
    return f"{client_key}/{session_key}".encode()


def peer_network(client_key: str, proto: str) -> str:
    """The network a server sends a peer for a dial of ``client_key``: ``K::proto``."""
    return f"{client_key}{PEER_NETWORK_SEPARATOR}{proto}"


def split_peer_network(network: str) -> tuple[str, str]:
    """``"K::proto"`` -> ``("K", "proto")``, split at the first ``::``.

    Raises ValueError with Go's text (``invalid clientKey/proto: ...``) when
    there is no ``::``, as a Go peer answers such a Connect.
    """
    key, sep, proto = network.partition(PEER_NETWORK_SEPARATOR)
    if not sep:
        raise ValueError(f"invalid clientKey/proto: {network}")
    return key, proto


def valid_peer_id(peer_id: str) -> bool:
    """A peer id must survive an AddClient payload and the ``K::proto`` form:
    non-empty, at most 80 bytes, printable, without ``/`` or ``::``."""
    return (
        0 < len(peer_id.encode()) <= MAX_KEY_BYTES
        and peer_id.isprintable()
        and "/" not in peer_id
        and PEER_NETWORK_SEPARATOR not in peer_id
    )


@dataclass(slots=True)
class AnnouncedClients:
    """What one incoming peer session announced: ``clientKey -> {sessionKey}``.

    ``add``/``remove`` return True when the table changed. Past ``max_pairs``
    pairs, ``add`` drops the announcement and counts it in :attr:`dropped`.
    """

    max_pairs: int = DEFAULT_MAX_ANNOUNCED
    clients: dict[str, set[int]] = field(default_factory=dict)
    pairs: int = 0
    #: AddClient announcements dropped because the table was full.
    dropped: int = 0

    def add(self, client_key: str, session_key: int) -> bool:
        sessions = self.clients.get(client_key)
        if sessions is not None and session_key in sessions:
            return False
        if self.pairs >= self.max_pairs:
            self.dropped += 1
            return False
        if sessions is None:
            sessions = self.clients[client_key] = set()
        sessions.add(session_key)
        self.pairs += 1
        return True

    def remove(self, client_key: str, session_key: int) -> bool:
        sessions = self.clients.get(client_key)
        if sessions is None or session_key not in sessions:
            return False
        sessions.discard(session_key)
        self.pairs -= 1
        if not sessions:
            del self.clients[client_key]
        return True

    def has(self, client_key: str) -> bool:
        return client_key in self.clients

    def clear(self) -> None:
        self.clients.clear()
        self.pairs = 0


@dataclass(slots=True)
class PeerSet:
    """The peers found by DNS: each answer becomes peers to add and to remove.

    Peer ids of discovered peers are their ``HOST:PORT`` (``[v6]:PORT``), as
    Rancher names peers by pod IP. ``own`` ids (this server's) are never
    added. An answer that failed to resolve must not be fed: keep the peers
    one has rather than drop them all on a DNS blip.
    """

    port: int
    own: frozenset[str] = frozenset()
    current: set[str] = field(default_factory=set)

    def address_id(self, host: str) -> str:
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def update(self, hosts: Iterable[str]) -> tuple[list[str], list[str]]:
        """Feed one DNS answer; returns ``(added, removed)`` peer ids, sorted."""
        answer = {self.address_id(h) for h in hosts} - self.own
        added = sorted(answer - self.current)
        removed = sorted(self.current - answer)
        self.current = answer
        return added, removed
