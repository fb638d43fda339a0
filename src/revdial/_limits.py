"""Every bound revdial enforces, in one frozen dataclass, each with its reason.

Memory bound that follows from the defaults (see README, "Limits"):

* per stream: at most ``stream_max_buffer`` (16 MiB) of received, unread bytes;
  a well-behaved peer stays under ``stream_high_water`` + what was in flight
  when our Pause reached it (about 3.4 MB seen from a Go peer on loopback);
* per session: at most ``session_max_buffer`` (64 MiB) of received, unread
  bytes across all its streams, plus one WebSocket message being reassembled
  (``max_message_size``) and a bounded outbox (``outbox_bytes`` of bulk Data,
  as much again of small frames, plus ``max_control_frames`` control frames);
* per server: ``max_sessions`` sessions (16,384: ~250 MiB of RSS while idle,
  ~15.5 KiB each), at most ``max_sessions_per_client`` (32) for one client key,
  at most ``max_concurrent_handshakes`` of them handshaking.
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True, slots=True)
class Limits:
    #: Send Pause when a stream holds more unread bytes than this. Go uses 2 MiB;
    #: 1 MiB keeps a 1 GiB/s stream busy for a millisecond, which is plenty.
    stream_high_water: int = 1 * MiB
    #: Send Resume once the reader has drained the stream below this (Go: 256 KiB).
    stream_low_water: int = 256 * KiB
    #: Reset a stream whose peer ignores Pause and overruns this. A Go peer keeps
    #: sending until our Pause reaches it: up to one TCP connection's in-flight
    #: bytes (Linux autotuning: tcp_wmem 4 MiB + tcp_rmem 6 MiB at most; 3.4 MB
    #: seen on loopback). 16 MiB never resets a well-behaved peer.
    stream_max_buffer: int = 16 * MiB
    #: While the session holds more unread bytes than this, every stream that
    #: receives Data is paused, so many half-full streams cannot add up.
    session_high_water: int = 32 * MiB
    #: Hard bound for the whole session: the stream whose Data crosses it is reset.
    session_max_buffer: int = 64 * MiB
    #: Largest WebSocket message accepted. Go agents send <= 32 KiB Data; a Go
    #: server sends one frame per application write, so leave room.
    max_message_size: int = 16 * MiB
    #: Largest Data payload we send in one frame: 256 KiB reads and frames are
    #: where a trio byte pump stops being dominated by per-message overhead.
    max_frame_size: int = 256 * KiB
    #: Bytes read from a local socket at once (same reasoning).
    read_size: int = 256 * KiB
    #: Data bytes queued for the WebSocket writer before senders block.
    outbox_bytes: int = 1 * MiB
    #: Data bytes one stream may have queued for the writer: one frame waits
    #: while another is written, so a bulk stream keeps the pipe full, but a
    #: small frame of another stream never queues behind more than that.
    stream_outbox_bytes: int = 256 * KiB
    #: Data frames up to this size (and below ``max_frame_size``: a full
    #: frame is bulk), from a stream with nothing else in the outbox, skip
    #: ahead of queued bulk Data (one such frame per stream at a
    #: time; at most ``small_frame_budget`` bytes of them in a row while bulk
    #: Data waits). Keystrokes and requests do not wait behind a transfer on
    #: another stream. ``0`` disables it.
    small_frame_bytes: int = 16 * KiB
    #: Small-frame bytes the writer sends in a row before one queued bulk frame.
    small_frame_budget: int = 64 * KiB
    #: Unsent bytes the kernel may hold for the WebSocket's TCP socket
    #: (TCP_NOTSENT_LOWAT, Linux). Without it the kernel queues megabytes of
    #: bulk data ahead of everything else; 128 KiB keeps the link busy.
    tcp_notsent_lowat: int = 128 * KiB
    #: Queued control frames (Pause, Resume, Error replies) before the session
    #: is declared stuck: a peer that stops reading while provoking replies.
    max_control_frames: int = 65536
    #: Streams open at once on one session.
    max_streams: int = 65536
    #: Sessions a server holds at once; the next agent is refused with 503
    #: (and a warning is logged) until one ends. Chosen from a memory budget:
    #: an idle session costs ~15.5 KiB of server RSS (benchmarks/sessions.py,
    #: 1,000 sessions), so 16,384 idle sessions take ~250 MiB -- a fleet of
    #: every downstream cluster of a large Rancher install on a 1 GiB server,
    #: with room for the active ones' buffers (bounded per session above). It
    #: also needs as many file descriptors: raise ``ulimit -n`` to match.
    max_sessions: int = 16384
    #: Sessions one client key may hold at once; the next is refused with 503
    #: (and a warning is logged). Several sessions per key are normal -- an
    #: agent with replicas, or one reconnecting before the server noticed its
    #: old session die (up to ``ping_timeout`` later) -- but one key, its
    #: token leaked or its agent looping, must not take the whole
    #: ``max_sessions`` budget from every other cluster. 32 leaves room for
    #: any sane deployment.
    max_sessions_per_client: int = 32
    #: Agents ping this often (Go: 5 s). Servers do not ping (as Go): they
    #: watch the agents' pings arrive. Only one side pinging means only one
    #: side's reader ever writes (pongs), so two writers blocked on each
    #: other cannot deadlock the keepalive.
    ping_interval: float = 5.0
    #: A session whose peer has not answered a ping for this long is dead.
    #: Go's read deadline is 60 s; we fail faster, still far above any RTT.
    ping_timeout: float = 30.0
    #: Agents send SyncConnections this often (Go: 60 s).
    sync_interval: float = 60.0
    #: Streams younger than this are never reaped by SyncConnections (race 6.11).
    sync_grace: float = 10.0
    #: Agent-side dial timeout (Go: 60 s).
    dial_timeout: float = 30.0
    #: Agent side: dials in progress at once. Each holds a socket and a task
    #: for up to ``dial_timeout``; a server that sends Connects for a target
    #: that never answers (a blackhole) would otherwise pile up thousands of
    #: them and exhaust the agent's file descriptors (often 1,024). Beyond
    #: this, a Connect is refused at once with ``revdial: too many dials in
    #: progress`` (the server raises ``DialRefusedError``); established
    #: streams are not counted.
    max_pending_dials: int = 256
    #: Server side, with a revdial agent: dials of one session whose outcome
    #: is not known yet. Further dials wait (within ``connect_timeout``, in
    #: order) instead of being sent, so a burst never meets the agent's
    #: ``max_pending_dials`` refusal; keep it at most the agent's value. A
    #: Go agent has no such limit and is not paced.
    max_dials_in_flight: int = 256
    #: Server side: how long ``dial()`` waits for the agent's answer. With the
    #: revdial extension that is the confirmation; with a Go agent it bounds
    #: the wait for the first byte or error of the stream. A little above
    #: ``dial_timeout`` so the agent's own, more specific, error arrives first.
    #: ``0`` disables it.
    connect_timeout: float = 35.0
    #: WebSocket opening handshake timeout (Go: 10 s client, 5 s server). On
    #: the server it also bounds the wait for a handshake slot (below).
    handshake_timeout: float = 10.0
    #: Opening handshakes a server works on at once; further connections wait
    #: (unread, not refused) within ``handshake_timeout``. trio runs every
    #: ready task once per scheduler round, so with a whole fleet handshaking
    #: at once (1,000 agents back after a restart) the sessions already up
    #: wait behind every handshake step. Measured (benchmarks/sessions.py,
    #: 1,000 agents joining): a byte echoed through a session already up took
    #: 246 ms (median) with 128 slots, 55 ms with 32, 15 ms with 8; the fleet
    #: joined in 2.8, 1.9 and 2.3 s. 32 keeps enough handshakes in flight to
    #: hide the agents' round trips. A slot is held only while there is work
    #: (TLS crypto, parsing, authorization, the 101): a connection waiting
    #: for the peer's bytes -- a dribbled ClientHello or request head --
    #: holds none (``revdial._handshake``), so slow-loris clients delay nobody.
    max_concurrent_handshakes: int = 32
    #: Graceful part of closing a session before it is closed forcefully.
    close_timeout: float = 2.0
    #: A spliced connection (``revdial server --forward``, the agent's dialled
    #: targets) with no byte in either direction for this long is reset on
    #: both sides, with ``revdial: idle for N s`` as the reason. ``0`` (the
    #: default) disables it: quiet connections -- an ssh session, a database
    #: pool's spare connections -- are legitimate, Go's remotedialer has no
    #: such timeout, and every stream is already bounded in memory; set it
    #: where idle connections should not hold a file descriptor for ever.
    idle_stream_timeout: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.stream_low_water < self.stream_high_water < self.stream_max_buffer:
            raise ValueError("need 0 < stream_low_water < stream_high_water < stream_max_buffer")
        if not 0 < self.session_high_water < self.session_max_buffer:
            raise ValueError("need 0 < session_high_water < session_max_buffer")
        if min(self.max_frame_size, self.read_size, self.outbox_bytes,
               self.stream_outbox_bytes) <= 0:
            raise ValueError("frame, read and outbox sizes must be positive")
        if self.small_frame_bytes < 0 or self.small_frame_budget <= 0:
            raise ValueError("small_frame_bytes must be >= 0 and small_frame_budget > 0")
        if min(self.max_sessions, self.max_sessions_per_client,
               self.max_concurrent_handshakes, self.max_streams, self.max_pending_dials,
               self.max_dials_in_flight, self.max_message_size) <= 0:
            raise ValueError("max_sessions, max_sessions_per_client, max_concurrent_handshakes, "
                             "max_streams, max_pending_dials, max_dials_in_flight and "
                             "max_message_size must be positive")
        if self.idle_stream_timeout < 0 or self.handshake_timeout <= 0:
            raise ValueError("idle_stream_timeout must be >= 0 and handshake_timeout positive")
        if self.ping_interval <= 0 or self.ping_timeout <= 0:
            raise ValueError("ping_interval and ping_timeout must be positive")


DEFAULT_LIMITS = Limits()
