"""Session bookkeeping for one remotedialer WebSocket (sans-I/O).

Theory of operation
-------------------
A :class:`SessionState` is the whole protocol state of one session: the table
of multiplexed connections, their flow-control accounting and the control
frames that must be sent. It does no I/O and reads no clock: the driver
(``_session.py``) feeds it every received WebSocket message with
:meth:`SessionState.receive` (plus the current time, for SyncConnections),
gets back at most one :class:`Event`, and sends whatever
:meth:`take_urgent` and :meth:`take_ordered` return. Tables are always mutated here,
synchronously, before the driver does any I/O (bookkeeping before I/O).

Connection life cycle (one table; either side may open)::

    opener:  open() ---------------------------> OPEN
    dialer:  Connect received ----> DIALING --dial_succeeded()--> OPEN
    any:     close() / Error received / reaped by Sync / overrun --> removed

Outgoing frames wait in two queues: *urgent* ones (Pause, Resume,
SyncConnections) may overtake queued Data; *ordered* ones (Connect, Error)
must keep their place relative to the stream's Data, so the driver appends
them to its Data queue at once. (A ``connection not found`` reply must not
overtake the ``EOF`` Error that closed the id, or the peer would take it for
the reason of the close.)

A removed id is gone for good: late Data for it is answered with Go's
``connection not found`` Error, late Error/Pause/Resume are ignored, exactly
as a Go peer does (PROTOCOL.md 3.4, 3.5). Ids we open are never reused.

Flow control (receive side): every Data payload is counted against its stream
until the application consumes it (:meth:`consumed`). Above
``stream_high_water`` -- or, while the whole session holds more than
``session_high_water``, above twice ``stream_low_water`` -- the stream gets
one Pause; once its reader drains it below ``stream_low_water`` it gets one
Resume. So under session pressure the big holders are paused while a stream
whose reader keeps up keeps flowing, and no stream is paused and resumed
frame after frame. Only halfway from ``session_high_water`` to
``session_max_buffer`` (many medium streams, none big) is every stream that
receives Data paused, as a last resort before resets. A peer that keeps
sending past ``stream_max_buffer`` has ignored Pause: that stream alone is
reset (:class:`Overrun`); past
``session_max_buffer`` the stream holding the most unread bytes is reset
(the frame's own stream, or another one reported by :meth:`take_overruns`).
The reader never waits on a stream, so one slow reader cannot stall the
others.

Flow control (send side): a received Pause sets ``peer_paused`` and a Resume
clears it (Go's flag semantics, PROTOCOL.md 3.6); the driver's writers wait
while it is set. Our two directions are independent: pausing the peer never
stops our own writes (unlike Go's conflated flag, quirk 6.7).

Extension v1 (``extensions >= 1``, negotiated in the handshake; never with
a Go peer): the dialer confirms a dial with CONNECT_OK (:meth:`dial_succeeded`,
event :class:`DialConfirmed`), and either side may half-close with
HALF_CLOSE (:meth:`send_eof`, event :class:`PeerHalfClosed`); an id both
sides half-closed is retired without an Error frame, and Data arriving after
the peer's HALF_CLOSE resets that stream (:class:`Reset`). Without the
extension those frame types are unknown and ignored, exactly as Go does.

A Connect for an id still in use (a broken or hostile peer: openers never
reuse ids) replaces the old connection, as Go does (PROTOCOL.md 3.1): the
old one is removed without an Error frame -- the id now names the new one --
and :class:`ConnectRequested` says ``replaced`` so that the driver fails the
old stream locally. One bad frame costs that stream, never the session.

Deviations from Go, all permitted by PROTOCOL.md section 7 (MAY):
no Error echo, no duplicate ``EOF`` (MAY 3); a refused Connect is answered
with an Error for that id only, never a session teardown (MAY 8); fresh ids
are spared by SyncConnections for ``sync_grace`` seconds (MAY 5); message ids
are a per-session counter from 1 (MAY 1).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ._errors import ProtocolError
from ._frames import (
    ExtType,
    Frame,
    MessageType,
    data_header,
    decode,
    encode,
    encode_sync,
    parse_client,
    parse_connect,
    parse_error_text,
    parse_sync,
)
from ._limits import DEFAULT_LIMITS, Limits

__all__ = [
    "ClientAnnounced",
    "Closed",
    "Conn",
    "ConnectRequested",
    "DataReceived",
    "Event",
    "FlowChanged",
    "Overrun",
    "DialConfirmed",
    "PeerHalfClosed",
    "Reaped",
    "Reset",
    "Role",
    "SessionState",
    "OVERRUN_TEXT",
]

_INT64_MAX = (1 << 63) - 1
#: Ids opened by a client (agent) start here, far beyond any Go server id (MAY 9).
CLIENT_FIRST_CONN_ID = 1 << 62
OVERRUN_TEXT = "revdial: receive buffer overrun (peer ignored Pause)"


class Role(enum.Enum):
    SERVER = "server"
    CLIENT = "client"


class ConnPhase(enum.Enum):
    DIALING = "dialing"  # we are the dialer; our local dial is in progress
    OPEN = "open"


@dataclass(slots=True)
class Conn:
    conn_id: int
    opened_by_us: bool
    target: str
    created_at: float
    phase: ConnPhase = ConnPhase.OPEN
    buffered: int = 0
    pause_sent: bool = False
    peer_paused: bool = False
    received_data: bool = False
    #: extension v1: we sent / received HALF_CLOSE; both -> the id is retired.
    eof_sent: bool = False
    eof_received: bool = False
    confirmed: bool = False


def _buffered(conn: Conn) -> int:
    return conn.buffered


# --- events: what a received frame means to the driver ---------------------


@dataclass(frozen=True, slots=True)
class DataReceived:
    conn_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectRequested:
    conn_id: int
    proto: str
    address: str
    #: The id was still in use: its stream must be failed locally (no Error
    #: frame: the id now belongs to the new connection).
    replaced: bool = False


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer closed ``conn_id``; ``error`` is None for an orderly ``EOF``."""

    conn_id: int
    error: str | None
    received_data: bool


@dataclass(frozen=True, slots=True)
class FlowChanged:
    conn_id: int
    paused: bool


@dataclass(frozen=True, slots=True)
class Overrun:
    """``conn_id`` ignored Pause; it was removed and an Error was queued."""

    conn_id: int


@dataclass(frozen=True, slots=True)
class Reset:
    """``conn_id`` broke the protocol; it was removed and an Error was queued."""

    conn_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class DialConfirmed:
    """Extension v1: the peer's dial for ``conn_id`` (opened by us) succeeded."""

    conn_id: int


@dataclass(frozen=True, slots=True)
class PeerHalfClosed:
    """Extension v1: the peer will send no more Data on ``conn_id``.

    ``retired`` is True when we had half-closed too: the id is gone.
    """

    conn_id: int
    retired: bool


@dataclass(frozen=True, slots=True)
class Reaped:
    """SyncConnections from the peer did not list these ids; they were removed."""

    conn_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ClientAnnounced:
    """Server sessions: the peer announced (AddClient) or withdrew
    (RemoveClient) one of its sessions, ``client_key/session_key``."""

    client_key: str
    session_key: int
    added: bool


Event = (
    DataReceived
    | ClientAnnounced
    | ConnectRequested
    | Closed
    | FlowChanged
    | Overrun
    | Reset
    | DialConfirmed
    | PeerHalfClosed
    | Reaped
)


@dataclass(slots=True)
class SessionState:
    role: Role
    limits: Limits = DEFAULT_LIMITS
    #: How this session names itself in ``connection not found`` replies
    #: (Go: a client session says ``client/0``).
    client_key: str = "client"
    session_key: int = 0
    #: Negotiated revdial extension version (0 = plain remotedialer).
    extensions: int = 0
    conns: dict[int, Conn] = field(default_factory=dict)
    buffered_total: int = 0
    #: Pause frames queued so far (a plain counter for the driver's metrics).
    pauses_sent: int = 0
    _next_msg_id: int = 1
    _next_conn_id: int = 0
    #: Frames that may overtake queued Data (Pause, Resume, Sync, replies to
    #: unknown ids) and frames that must keep their place after a stream's
    #: Data (Connect before it, the closing Error after it).
    #: Lists, not deques: they are only appended to and taken whole, and an
    #: empty list costs 56 bytes where an empty deque costs ~760 (a fleet
    #: server holds thousands of idle sessions).
    _urgent: list[bytes] = field(default_factory=list)
    _ordered: list[bytes] = field(default_factory=list)
    #: Other streams reset by the session cap while handling a frame (see
    #: :meth:`take_overruns`): the largest holder goes, not the frame's stream.
    _overruns: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Go server sessions pre-increment from 1 (first id 2); see PROTOCOL 3.1.
        self._next_conn_id = 2 if self.role is Role.SERVER else CLIENT_FIRST_CONN_ID

    # --- outgoing ---------------------------------------------------------

    def _msg_id(self) -> int:
        mid = self._next_msg_id
        self._next_msg_id = mid + 1 if mid < _INT64_MAX else -(1 << 63)
        return mid

    def _queue(
        self,
        conn_id: int,
        mtype: MessageType | ExtType,
        payload: bytes = b"",
        *,
        urgent: bool = False,
    ) -> None:
        frame = encode(Frame(self._msg_id(), conn_id, mtype, payload))
        (self._urgent if urgent else self._ordered).append(frame)

    def take_urgent(self) -> list[bytes]:
        """Frames that may be sent before any queued Data; the queue is emptied."""
        frames = self._urgent
        self._urgent = []
        return frames

    def take_ordered(self) -> list[bytes]:
        """Connect/Error frames, to be queued behind Data already queued."""
        frames = self._ordered
        self._ordered = []
        return frames

    def take_overruns(self) -> list[int]:
        """Ids reset by the session cap for holding the most unread bytes, to be
        failed by the driver as for :class:`Overrun` (their Error is queued)."""
        ids = self._overruns
        self._overruns = []
        return ids

    @property
    def has_pending(self) -> bool:
        return bool(self._urgent or self._ordered)

    def data_header(self, conn_id: int) -> bytes:
        """Header for one outgoing Data frame on ``conn_id`` (payload follows)."""
        return data_header(self._msg_id(), conn_id)

    def open(self, proto: str, address: str, now: float) -> int:
        """Allocate an id, register it and queue its Connect. Returns the id."""
        if len(self.conns) >= self.limits.max_streams:
            raise ProtocolError(f"stream limit reached ({self.limits.max_streams})")
        conn_id = self._next_conn_id
        while conn_id in self.conns:  # the peer opened this id itself (PROTOCOL 6.12)
            conn_id += 1
        self._next_conn_id = conn_id + 1
        target = f"{proto}/{address}"
        self.conns[conn_id] = Conn(conn_id, True, target, now)
        self._queue(conn_id, MessageType.CONNECT, target.encode())
        return conn_id

    def dial_succeeded(self, conn_id: int) -> None:
        """Our dial for the peer's Connect worked (with v1: tell the peer)."""
        conn = self.conns.get(conn_id)
        if conn is not None and conn.phase is ConnPhase.DIALING:
            conn.phase = ConnPhase.OPEN
            if self.extensions:
                self._queue(conn_id, ExtType.CONNECT_OK)

    def send_eof(self, conn_id: int) -> bool:
        """Extension v1: we will send no more Data on ``conn_id``.

        Queues HALF_CLOSE behind the stream's Data. Once both sides have
        half-closed the id is retired without any Error frame. Returns False
        if the id is unknown or EOF was already sent.
        """
        if not self.extensions:
            raise ProtocolError("half-close needs the revdial extension (peer lacks it)")
        conn = self.conns.get(conn_id)
        if conn is None or conn.eof_sent:
            return False
        conn.eof_sent = True
        self._queue(conn_id, ExtType.HALF_CLOSE)
        if conn.eof_received:
            self._remove(conn_id)
        return True

    def close(self, conn_id: int, error: str | None = None) -> bool:
        """Close ``conn_id`` on our initiative: remove it and queue its Error.

        ``error`` None means an orderly close (``EOF``). Returns False if the id
        was already gone (then nothing is sent).
        """
        conn = self._remove(conn_id)
        if conn is None:
            return False
        self._queue(conn_id, MessageType.ERROR, b"EOF" if error is None else error.encode())
        return True

    def close_all(self) -> list[int]:
        """Forget every connection (the session ended); returns their ids."""
        ids = list(self.conns)
        self.conns.clear()
        self.buffered_total = 0
        return ids

    def consumed(self, conn_id: int, nbytes: int) -> None:
        """The application read ``nbytes`` of ``conn_id``'s buffered data."""
        conn = self.conns.get(conn_id)
        if conn is None:
            return
        conn.buffered -= nbytes
        self.buffered_total -= nbytes
        if conn.pause_sent and conn.buffered <= self.limits.stream_low_water:
            conn.pause_sent = False
            self._queue(conn_id, MessageType.RESUME, urgent=True)

    def announce(self, client_key: str, session_key: int, *, added: bool) -> None:
        """Queue AddClient (``added``) or RemoveClient ``client_key/session_key``
        (a server announcing its sessions to a peer, PROTOCOL 4.2)."""
        mtype = MessageType.ADD_CLIENT if added else MessageType.REMOVE_CLIENT
        self._queue(0, mtype, f"{client_key}/{session_key}".encode(), urgent=True)

    def queue_sync(self) -> None:
        """Queue a SyncConnections listing every id we hold (clients, every 60 s)."""
        self._queue(0, MessageType.SYNC_CONNECTIONS, encode_sync(self.conns), urgent=True)

    def _remove(self, conn_id: int) -> Conn | None:
        conn = self.conns.pop(conn_id, None)
        if conn is not None:
            self.buffered_total -= conn.buffered
        return conn

    # --- incoming ---------------------------------------------------------

    def receive(self, message: bytes, now: float) -> Event | None:
        """Process one received binary WebSocket message.

        Returns what it means for the driver, or None when nothing is to be
        done. Raises :class:`ProtocolError` (a :class:`FrameError` for bad
        bytes) when the session must end.
        """
        frame = decode(message)
        t = frame.type
        if t == MessageType.DATA:
            return self._on_data(frame)
        if t == MessageType.CONNECT:
            return self._on_connect(frame, now)
        if t == MessageType.ERROR:
            conn = self._remove(frame.conn_id)
            if conn is None:
                return None  # never answer an Error for an unknown id
            text = parse_error_text(frame.payload)
            return Closed(frame.conn_id, None if text == "EOF" else text, conn.received_data)
        if t == MessageType.PAUSE or t == MessageType.RESUME:  # noqa: PLR1714
            conn = self.conns.get(frame.conn_id)
            if conn is None:
                return None
            paused = t == MessageType.PAUSE
            if conn.peer_paused == paused:
                return None
            conn.peer_paused = paused
            return FlowChanged(frame.conn_id, paused)
        if t == MessageType.SYNC_CONNECTIONS:
            return self._on_sync(parse_sync(frame.payload), now)
        if self.extensions:
            if t == ExtType.CONNECT_OK:
                conn = self.conns.get(frame.conn_id)
                if conn is None or not conn.opened_by_us or conn.confirmed:
                    return None
                conn.confirmed = True
                return DialConfirmed(frame.conn_id)
            if t == ExtType.HALF_CLOSE:
                conn = self.conns.get(frame.conn_id)
                if conn is None or conn.eof_received:
                    return None
                conn.eof_received = True
                if conn.eof_sent:
                    self._remove(frame.conn_id)
                return PeerHalfClosed(frame.conn_id, retired=conn.eof_sent)
        if (t == MessageType.ADD_CLIENT or t == MessageType.REMOVE_CLIENT) and (  # noqa: PLR1714
            self.role is Role.SERVER
        ):
            # Validated by decode(); as Go, only server sessions record them
            # (a client ignores AddClient). The driver decides what they mean.
            key, session_key = parse_client(frame.payload)
            return ClientAnnounced(key, session_key, t == MessageType.ADD_CLIENT)
        # Unknown types: ignored.
        return None

    def _on_data(self, frame: Frame) -> Event | None:
        conn = self.conns.get(frame.conn_id)
        if conn is None:
            self._queue(
                frame.conn_id,
                MessageType.ERROR,
                f"connection not found {self.client_key}/{self.session_key}/"
                f"{frame.conn_id}".encode(),
            )
            return None
        n = len(frame.payload)
        if n == 0:
            return None
        if conn.eof_received:
            reason = "revdial: Data after half-close"
            self.close(frame.conn_id, reason)
            return Reset(frame.conn_id, reason)
        conn.buffered += n
        conn.received_data = True
        total = self.buffered_total + n
        self.buffered_total = total
        lim = self.limits
        if conn.buffered > lim.stream_max_buffer:
            self.close(frame.conn_id, OVERRUN_TEXT)
            return Overrun(frame.conn_id)
        if total > lim.session_max_buffer:
            # The session cap: reset whoever holds the most unread bytes (the
            # stream that ignores Pause), not a small stream whose frame
            # happened to cross the line.
            largest = max(self.conns.values(), key=_buffered)
            self.close(largest.conn_id, OVERRUN_TEXT)
            if largest is conn:
                return Overrun(frame.conn_id)
            self._overruns.append(largest.conn_id)
        if not conn.pause_sent and (
            conn.buffered > lim.stream_high_water
            or (total > lim.session_high_water and conn.buffered > self._pressure_share())
            # Halfway to the hard cap (many medium streams): pause every stream
            # that receives Data, as a last resort before resets.
            or 2 * total > lim.session_high_water + lim.session_max_buffer
        ):
            conn.pause_sent = True
            self.pauses_sent += 1
            self._queue(frame.conn_id, MessageType.PAUSE, urgent=True)
        return DataReceived(frame.conn_id, frame.payload)

    def _pressure_share(self) -> int:
        """Under session pressure, the unread bytes above which a stream is paused.

        Twice the low-water mark (capped at the high-water mark): a stream with
        little unread data -- a trickle whose reader keeps up -- keeps flowing
        while the big holders are paused, and a paused stream resumed at the
        low-water mark must take in that much again before the next Pause (no
        Pause/Resume per frame).
        """
        lim = self.limits
        return min(2 * lim.stream_low_water, lim.stream_high_water)

    def _on_connect(self, frame: Frame, now: float) -> Event | None:
        proto, address = parse_connect(frame.payload)
        conn_id = frame.conn_id
        # A Connect for an id in use replaces it, as remotedialer does: one bad
        # frame costs that stream, never the session.
        replaced = self._remove(conn_id) is not None
        if len(self.conns) >= self.limits.max_streams:
            self._queue(
                conn_id,
                MessageType.ERROR,
                f"revdial: too many streams ({self.limits.max_streams})".encode(),
            )
            return None
        self.conns[conn_id] = Conn(conn_id, False, f"{proto}/{address}", now, ConnPhase.DIALING)
        return ConnectRequested(conn_id, proto, address, replaced)

    def _on_sync(self, listed: list[int], now: float) -> Event | None:
        keep = set(listed)
        cutoff = now - self.limits.sync_grace
        stale = tuple(
            cid for cid, c in self.conns.items() if cid not in keep and c.created_at <= cutoff
        )
        for cid in stale:
            self._remove(cid)  # Go closes these without sending an Error
        return Reaped(stale) if stale else None
