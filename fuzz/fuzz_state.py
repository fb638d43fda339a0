"""Fuzz the session state: ``python -m fuzz.fuzz_state --seconds N``.

Each input is a *program*: a role and a list of steps, each either a message
from the peer (a well-formed frame aimed at ids that are likely live, a
mutated Go-recorded message, or random bytes) or a local action the driver
would take (open, close, consume delivered bytes, dial success, queue a sync,
let time pass). Small limits make Pause/Resume, Overrun and Sync reaping
reachable in a few steps.

Invariants, checked after every step:

* ``receive()`` returns an event or None, or raises ProtocolError (the session
  then ends, as the driver would end it); nothing else escapes;
* ``buffered_total == sum(conn.buffered)``, nothing negative, no stream above
  ``stream_max_buffer``, the session not above ``session_max_buffer``;
* the bytes handed to the application (DataReceived minus consumed) equal
  each live conn's ``buffered``;
* every frame the state emits decodes with our own decoder; Pause and Resume
  alternate per id, starting with Pause, and ``pause_sent`` says whether one is
  outstanding;
* ``open()`` never allocates one of our ids twice nor an id that is live, and
  a removed id comes back only through a new Connect or ``open()``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from fuzz import FuzzRun, fuzz_settings, main, mutated, seed_messages
from revdial._errors import ProtocolError
from revdial._frames import ExtType, Frame, MessageType, decode, encode, encode_sync
from revdial._limits import Limits
from revdial._state import (
    CLIENT_FIRST_CONN_ID,
    ClientAnnounced,
    Closed,
    ConnectRequested,
    DataReceived,
    DialConfirmed,
    Event,
    FlowChanged,
    Overrun,
    PeerHalfClosed,
    Reaped,
    Reset,
    Role,
    SessionState,
)

LIMITS = Limits(
    stream_low_water=16,
    stream_high_water=64,
    stream_max_buffer=256,
    session_high_water=512,
    session_max_buffer=1024,
    max_streams=12,
    sync_grace=10.0,
)

#: Conn ids the generated frames use: mostly what a server and a client open
#: first (so frames hit live streams and peer-chosen ids collide with ours),
#: sometimes odd ones.
HOT_IDS = [2, 3, 4, CLIENT_FIRST_CONN_ID, CLIENT_FIRST_CONN_ID + 1]
ID_POOL = [*HOT_IDS, 5, 6, 7, 1, 0, -1, 999]

# --- programs -------------------------------------------------------------------


@dataclass(frozen=True)
class Recv:
    message: bytes

    def __str__(self) -> str:
        return f"recv {self.message.hex()}"


@dataclass(frozen=True)
class Local:
    #: open | close | close_error | consume | dial_ok | send_eof | queue_sync | tick | close_all
    action: str
    pick: int = 0
    amount: int = 0

    def __str__(self) -> str:
        return f"{self.action}({self.pick}, {self.amount})"


Step = Recv | Local


@dataclass(frozen=True)
class Program:
    role: Role
    extensions: int  # 0: plain remotedialer; 1: revdial extension v1 negotiated
    steps: tuple[Step, ...]

    def hex(self) -> str:
        head = f"role={self.role.value} extensions={self.extensions} "
        return head + " ; ".join(str(s) for s in self.steps)


def _frame_bytes(conn_id: int, mtype: int, payload: bytes) -> bytes:
    return encode(Frame(1, conn_id, mtype, payload))


def well_formed() -> st.SearchStrategy[bytes]:
    ids = st.one_of(st.sampled_from(HOT_IDS), st.sampled_from(ID_POOL))
    data = st.builds(_frame_bytes, ids, st.just(MessageType.DATA), st.binary(max_size=120))
    connect = st.builds(
        _frame_bytes,
        ids,
        st.just(MessageType.CONNECT),
        st.sampled_from([b"tcp/127.0.0.1:22", b"unix//x.sock", b"/"]),
    )
    error = st.builds(
        _frame_bytes, ids, st.just(MessageType.ERROR), st.sampled_from([b"EOF", b"boom", b""])
    )
    flow = st.builds(
        _frame_bytes, ids, st.sampled_from([MessageType.PAUSE, MessageType.RESUME]), st.just(b"")
    )
    sync = st.lists(st.sampled_from(ID_POOL), max_size=6).map(
        lambda listed: _frame_bytes(0, MessageType.SYNC_CONNECTIONS, encode_sync(listed))
    )
    peering = st.builds(
        _frame_bytes,
        st.just(0),
        st.sampled_from([MessageType.ADD_CLIENT, MessageType.REMOVE_CLIENT]),
        st.sampled_from([b"c2/77", b"c2", b"c2/x"]),
    )
    unknown = st.builds(_frame_bytes, ids, st.sampled_from([0, 9, 99, -1]), st.binary(max_size=8))
    extension = st.builds(
        _frame_bytes,
        ids,
        st.sampled_from([ExtType.CONNECT_OK, ExtType.HALF_CLOSE]),
        st.one_of(st.just(b""), st.binary(max_size=8)),
    )
    return st.one_of(
        data, data, data, connect, error, flow, flow, sync, peering, unknown, extension
    )


def steps(seeds: list[bytes]) -> st.SearchStrategy[Step]:
    recv = st.one_of(well_formed(), well_formed(), mutated(seeds), st.binary(max_size=40)).map(Recv)
    local = st.builds(
        Local,
        st.sampled_from(
            [
                *("open", "open", "close", "close_error", "consume", "consume"),
                *("dial_ok", "send_eof", "queue_sync", "tick", "close_all"),
            ]
        ),
        st.integers(0, 63),
        st.integers(0, 300),
    )
    return st.one_of(recv, recv, local)


def programs(seeds: list[bytes]) -> st.SearchStrategy[Program]:
    return st.builds(
        Program,
        st.sampled_from([Role.SERVER, Role.CLIENT]),
        st.sampled_from([0, 1]),
        st.lists(steps(seeds), min_size=1, max_size=80).map(tuple),
    )


# --- running a program ------------------------------------------------------------


@dataclass
class Model:
    """What the driver knows: bytes delivered to each conn's reader, pauses sent."""

    state: SessionState
    now: float = 0.0
    delivered: dict[int, int] = field(default_factory=dict)
    pause_out: set[int] = field(default_factory=set)
    #: ids removed since they were last (re)opened; only a (re)open may revive one
    removed: set[int] = field(default_factory=set)
    #: ids we opened: never allocated twice
    ours: set[int] = field(default_factory=set)

    def pick(self, n: int) -> int:
        ids = sorted(self.state.conns) + ID_POOL
        return ids[n % len(ids)]

    def forget(self, conn_id: int) -> None:
        self.delivered.pop(conn_id, None)
        self.pause_out.discard(conn_id)
        self.removed.add(conn_id)

    def apply(self, event: Event | None) -> None:
        match event:
            case DataReceived(cid, data):
                assert cid in self.state.conns
                assert data
                self.delivered[cid] = self.delivered.get(cid, 0) + len(data)
            case ConnectRequested(cid, _, _):
                assert not self.state.conns[cid].opened_by_us
                self.removed.discard(cid)  # the peer chose an id: it may reuse one
                self.delivered[cid] = 0
                # A Connect for a live id replaces that stream (PROTOCOL.md,
                # ids reused): a Pause we sent for the old one is void.
                self.pause_out.discard(cid)
            case Closed(cid, _, _) | Overrun(cid) | Reset(cid, _):
                assert cid not in self.state.conns
                self.forget(cid)
            case DialConfirmed(cid):
                assert self.state.extensions
                assert self.state.conns[cid].opened_by_us
            case PeerHalfClosed(cid, retired):
                assert self.state.extensions
                assert (cid not in self.state.conns) is retired
                if retired:
                    self.forget(cid)
            case Reaped(cids):
                assert cids
                assert not set(cids) & set(self.state.conns)
                for cid in cids:
                    self.forget(cid)
            case FlowChanged(cid, paused):
                assert self.state.conns[cid].peer_paused is paused
            case ClientAnnounced(key, session_key, _):
                # Only server sessions report a peer's announcements (PROTOCOL 4.2).
                assert self.state.role is Role.SERVER
                assert "/" not in key
                assert -(1 << 63) <= session_key < (1 << 63)
            case None:
                pass
            case _:
                raise AssertionError(f"unexpected event {event!r}")

    def local(self, step: Local) -> None:
        state = self.state
        if step.action == "open":
            if len(state.conns) >= LIMITS.max_streams:
                try:
                    state.open("tcp", "127.0.0.1:1", self.now)
                except ProtocolError:
                    return
                raise AssertionError("open() beyond max_streams did not raise")
            live_before = set(state.conns)
            cid = state.open("tcp", "127.0.0.1:1", self.now)
            assert cid not in self.ours, f"our id {cid} allocated twice"
            assert cid not in live_before, f"open() took id {cid}, which is live"
            self.ours.add(cid)
            # an id the *peer* chose and closed may be allocated by us later
            self.removed.discard(cid)
            self.delivered[cid] = 0
        elif step.action in ("close", "close_error"):
            cid = self.pick(step.pick)
            live = cid in state.conns
            text = "boom" if step.action == "close_error" else None
            assert state.close(cid, text) is live
            if live:
                self.forget(cid)
        elif step.action == "consume":
            cid = self.pick(step.pick)
            n = min(step.amount, self.delivered.get(cid, 0))
            if cid in state.conns:
                state.consumed(cid, n)
                self.delivered[cid] -= n
        elif step.action == "dial_ok":
            state.dial_succeeded(self.pick(step.pick))
        elif step.action == "send_eof":
            cid = self.pick(step.pick)
            if not state.extensions:
                try:
                    state.send_eof(cid)
                except ProtocolError:
                    return
                raise AssertionError("send_eof() without the extension did not raise")
            conn = state.conns.get(cid)
            expected = conn is not None and not conn.eof_sent
            sent = state.send_eof(cid)
            assert sent is expected
            if sent and cid not in state.conns:  # both sides half-closed: retired
                self.forget(cid)
        elif step.action == "close_all":
            ids = state.close_all()
            assert state.conns == {}
            assert state.buffered_total == 0
            for cid in ids:
                self.forget(cid)
        elif step.action == "queue_sync":
            state.queue_sync()
        elif step.action == "tick":
            self.now += step.amount / 10

    def check(self) -> None:
        state = self.state
        assert state.buffered_total == sum(c.buffered for c in state.conns.values())
        assert 0 <= state.buffered_total <= LIMITS.session_max_buffer
        assert len(state.conns) <= LIMITS.max_streams
        for cid, conn in state.conns.items():
            assert conn.conn_id == cid
            assert 0 <= conn.buffered <= LIMITS.stream_max_buffer
            assert conn.buffered == self.delivered.get(cid, 0), f"conn {cid}"
        for raw in state.take_urgent() + state.take_ordered():
            frame = decode(raw)  # we never emit what we would reject
            if frame.type in (ExtType.CONNECT_OK, ExtType.HALF_CLOSE):
                assert state.extensions, "extension frame sent to a plain peer"
            if frame.type == MessageType.PAUSE:
                assert frame.conn_id in state.conns
                assert frame.conn_id not in self.pause_out
                self.pause_out.add(frame.conn_id)
            elif frame.type == MessageType.RESUME:
                assert frame.conn_id in self.pause_out, "Resume without a Pause"
                self.pause_out.discard(frame.conn_id)
        for cid, conn in state.conns.items():
            assert conn.pause_sent == (cid in self.pause_out), f"conn {cid}"
        assert not (self.removed & set(state.conns)), "a removed id is back"


def run_program(program: Program) -> int:
    """Run one program; return the number of messages fed."""
    state = SessionState(
        program.role, limits=LIMITS, client_key="fz", session_key=9, extensions=program.extensions
    )
    model = Model(state)
    fed = 0
    for step in program.steps:
        if isinstance(step, Recv):
            fed += 1
            try:
                event = model.state.receive(step.message, model.now)
            except ProtocolError:
                model.check()
                return fed  # the driver ends the session here
            model.apply(event)
        else:
            model.local(step)
        model.check()
    return fed


def build(run: FuzzRun) -> Callable[[], None]:
    seeds = seed_messages()

    @given(programs(seeds))
    @fuzz_settings(max_examples=200)
    def fuzz(program: Program) -> None:
        def check() -> None:
            run_program(program)

        run.record(program.hex, check)

    return fuzz


if __name__ == "__main__":
    sys.exit(main("fuzz_state", build))
