"""Fuzz the h11 reverse proxy with arbitrary request bytes: ``python -m fuzz.fuzz_proxy``.

The agent's proxy and the server's front door share one forwarding core
(``revdial._proxy.HTTPForwarder``). Here a ``ReverseProxy`` serves one
downstream connection whose client sends the input bytes (then EOF), in
virtual time, with an upstream that answers every request it receives.

Inputs: well-formed requests (with bodies by Content-Length or chunked,
pipelined) mutated at the byte level, and heads built from a "header soup"
that favours what request smuggling is made of: Content-Length and
Transfer-Encoding together or twice, lists, obs-fold (a line starting with a
space), bare CR and LF, odd spacing around the colon, long heads.

Invariants (RFC 9112, and h11's own "accepted, or an error, nothing else"):

* nothing escapes the proxy: it returns, within its timeouts;
* the client gets a sequence of well-formed HTTP/1.1 responses (parsed by a
  strict h11 client), each 200 from the upstream or one of 400, 405, 413,
  431, 501 from the proxy, and nothing after an error answer;
* the upstream never sees more requests than a strict parser finds in the
  input before its first error, and each one it sees has the method, target
  and body that the strict parser read: no request is invented out of a
  body, so no smuggling pair reaches it;
* a head with both Content-Length and Transfer-Encoding, Content-Length twice,
  obs-fold or a bare CR never reaches the upstream.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import h11
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from fuzz import FuzzRun, fuzz_settings, main
from revdial._proxy import ProxyLimits, ReverseProxy

UPSTREAM = "http://upstream.example:8080"
LIMITS = ProxyLimits(max_header_bytes=2048, read_size=4096)
PROXY_STATUSES = {400, 405, 413, 431, 501}


@dataclass
class Seen:
    method: bytes
    target: bytes
    body: bytes = b""


@dataclass
class Outcome:
    upstream: list[Seen] = field(default_factory=list)
    response_bytes: bytes = b""


async def _serve_upstream(stream: trio.abc.Stream, seen: list[Seen]) -> None:
    conn = h11.Connection(h11.SERVER)
    current: Seen | None = None
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Request):
                current = Seen(event.method, event.target)
            elif isinstance(event, h11.Data):
                assert current is not None
                current.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert current is not None
                seen.append(current)
                body = b"" if current.method == b"HEAD" else b"ok"
                out = conn.send(h11.Response(status_code=200,
                                             headers=[("content-length", "2")])) or b""
                if body:
                    out += conn.send(h11.Data(data=body)) or b""
                out += conn.send(h11.EndOfMessage()) or b""
                await stream.send_all(out)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
                current = None
            else:
                return
    except h11.RemoteProtocolError as exc:
        if "without sending complete message body" in str(exc):
            return  # the client went away mid-body and the proxy aborted this request
        # What the proxy sends upstream is h11's own framing: never malformed.
        raise AssertionError(f"the proxy sent the upstream a malformed request: {exc}") from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


async def _exchange(data: bytes) -> Outcome:
    outcome = Outcome()
    async with trio.open_nursery() as nursery:

        async def connect() -> trio.abc.Stream:
            ours, theirs = trio.testing.memory_stream_pair()

            async def serve() -> None:
                async with theirs:
                    await _serve_upstream(theirs, outcome.upstream)

            nursery.start_soon(serve)
            return ours

        proxy = ReverseProxy(UPSTREAM, connect=connect, limits=LIMITS)
        client, server_side = trio.testing.memory_stream_pair()
        nursery.start_soon(proxy, server_side)
        await client.send_all(data)
        await client.send_eof()
        received = bytearray()
        try:
            while chunk := await client.receive_some(65536):
                received += chunk
        except trio.BrokenResourceError:
            pass  # an abort: allowed (a failed exchange), checked below
        outcome.response_bytes = bytes(received)
        await proxy.aclose()
        nursery.cancel_scope.cancel()
    return outcome


def _strip_blank_lines(data: bytes) -> bytes:
    while data.startswith((b"\r\n", b"\n")):  # RFC 9112 2.2, as the proxy does
        data = data[2 if data.startswith(b"\r") else 1 :]
    return data


def _one_cycle(rest: bytes) -> h11.Connection:
    """A fresh server-side h11 connection holding ``rest`` and then EOF (one
    request cycle, as the proxy parses each request with its own)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(rest)
    conn.receive_data(b"")
    return conn


def strict_requests(data: bytes) -> list[Seen]:
    """The complete requests a strict parser (h11 plus our framing rules) finds.

    One ``h11.Connection`` per request, blank lines before a request skipped:
    the same cycle as the proxy's, with an independent framing check.
    """
    out: list[Seen] = []
    rest = data
    while True:
        rest = _strip_blank_lines(rest)
        conn = _one_cycle(rest)
        current: Seen | None = None
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return out
            if isinstance(event, h11.Request):
                current = Seen(event.method, event.target)
                raw = [n.lower() for n, _ in event.headers.raw_items()]
                if (b"transfer-encoding" in raw and b"content-length" in raw) or raw.count(
                    b"content-length"
                ) > 1 or event.method == b"CONNECT":
                    return out  # refused (400, 405): nothing further is served
            elif isinstance(event, h11.Data):
                assert current is not None
                current.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert current is not None
                out.append(current)
                break
            else:  # NEED_DATA (incomplete), ConnectionClosed, PAUSED
                return out
        try:
            conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return out
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return out  # the connection ends after this request (close, HTTP/1.0)
        rest = bytes(conn.trailing_data[0])
        if not rest:
            return out


def head_methods(data: bytes) -> list[bytes]:
    """The method of each request in ``data`` in order, as the proxy sees it.

    Requests h11 parses give their method; the first one it cannot parse
    gives the first token of its request line (what the proxy takes to decide
    whether its error answer may have a body).
    """
    methods: list[bytes] = []
    rest = data
    while True:
        rest = _strip_blank_lines(rest)
        conn = _one_cycle(rest)
        done = got_request = False
        while not done:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                break
            if isinstance(event, h11.Request):
                methods.append(event.method)
                got_request = True
            elif isinstance(event, h11.EndOfMessage):
                done = True
            elif not isinstance(event, h11.Data):
                break
        if not done:
            if not got_request:  # the head h11 refused: the proxy reads the first token
                space = rest.find(b" ", 0, 64)
                methods.append(rest[:space] if space > 0 else b"GET")
            return methods
        try:
            conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return methods
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return methods
        rest = bytes(conn.trailing_data[0])


def _responses(raw: bytes, methods: list[bytes]) -> list[int]:
    """Statuses of the responses in ``raw``; AssertionError if malformed.

    ``methods[i]`` is the method of the request the i-th response answers (a
    response to HEAD has no body); GET where the request was not parsed.
    """
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(raw)
    conn.receive_data(b"")  # the proxy closed the connection: we read to EOF
    statuses: list[int] = []
    if not raw:
        return statuses
    while True:
        # One request per expected response, so h11 accepts the response.
        i = len(statuses)
        method = "HEAD" if i < len(methods) and methods[i] == b"HEAD" else "GET"
        conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise AssertionError(f"malformed response after {statuses}: {exc}: "
                                     f"{raw[-200:]!r}") from exc
            if isinstance(event, h11.Response):
                statuses.append(event.status_code)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed) or event is h11.NEED_DATA:
                raise AssertionError(f"truncated response after {statuses}: {raw[-200:]!r}")
        extra, _ = conn.trailing_data
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            assert not extra, f"bytes after a closing response: {extra[:100]!r}"
            return statuses
        if not extra:
            return statuses  # the proxy closed after this response (EOF)
        conn.start_next_cycle()


_HEAD_END = re.compile(rb"\r?\n\r?\n")


def _forbidden_heads(data: bytes) -> bool:
    """Does a head in ``data`` carry obs-fold or a bare CR (never to reach upstream)?"""
    for head in _HEAD_END.split(data)[:1]:
        lines = head.split(b"\n")
        if any(line[:1] in (b" ", b"\t") for line in lines[1:]):
            return True
        if re.search(rb"\r(?!\n)", head + b"\n"):
            return True
    return False


def check(data: bytes) -> None:
    outcome = trio.run(_exchange, data, clock=trio.testing.MockClock(autojump_threshold=0))
    statuses = _responses(outcome.response_bytes, head_methods(data))
    for i, status in enumerate(statuses):
        assert status == 200 or status in PROXY_STATUSES, (status, statuses)
        if status != 200:
            assert i == len(statuses) - 1, f"served after an error answer: {statuses}"
    strict = strict_requests(data)
    seen = outcome.upstream
    assert len(seen) <= len(strict), (seen, strict)
    for got, want in zip(seen, strict, strict=False):
        assert (got.method, got.body) == (want.method, want.body), (got, want)
        assert want.target.endswith(got.target) or got.target.endswith(b"/"), (got, want)
    if _forbidden_heads(data):
        assert not seen, f"obs-fold or a bare CR reached the upstream: {data[:200]!r}"


# --- inputs ----------------------------------------------------------------------------

_METHODS = [b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"CONNECT", b"OPTIONS", b"G\x00T"]
_TARGETS = [b"/", b"/api/v1/pods?watch=1", b"http://h/x", b"*", b"x", b"/%00", b"//a"]
_HEADERS = [
    b"Host: a", b"Host: a\r\nHost: b", b"Content-Length: 5", b"Content-Length: 0",
    b"Content-Length: 5, 5", b"Content-Length: -1", b"Content-Length: 99999999999",
    b"Content-Length:5", b"Content-Length : 5", b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip, chunked", b"Transfer-Encoding: chunked, identity",
    b"Transfer-Encoding: xchunked", b"Transfer-Encoding:\tchunked", b" folded: yes",
    b"\tfolded", b"X-A: b\rc", b"Connection: close", b"Connection: keep-alive, Upgrade",
    b"Upgrade: websocket", b"Expect: 100-continue", b"Te: trailers", b"X-Long: " + b"a" * 3000,
    b"Bad Name: x", b": empty", b"X-Empty:",
]
_BODIES = [b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", b"0\r\n\r\n",
           b"5\r\nhello\r\n0\r\nTrailer: x\r\n\r\n", b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"]


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        method = draw(st.sampled_from(_METHODS))
        target = draw(st.sampled_from(_TARGETS))
        version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.1", b"HTTP/2.0"]))
        headers = draw(st.lists(st.sampled_from(_HEADERS), max_size=6))
        eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
        head = method + b" " + target + b" " + version + eol
        head += b"".join(h + eol for h in headers) + eol
        parts.append(head + draw(st.sampled_from(_BODIES)))
    return b"".join(parts)


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(requests()))
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "flip"]))
        if op == "insert":
            data[pos:pos] = draw(st.sampled_from([b"\r", b"\n", b" ", b":", b"\x00", b"\r\n",
                                                  b"\r\n\r\n", b"0\r\n\r\n"]))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 4))]
        elif pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


inputs = st.one_of(requests(), mutated_requests(), st.binary(max_size=300))


def build(run: FuzzRun) -> Callable[[], None]:
    @fuzz_settings(max_examples=300)
    @given(data=inputs)
    def test(data: bytes) -> None:
        run.record(data.hex, lambda: check(data))

    return test


if __name__ == "__main__":
    sys.exit(main("fuzz_proxy", build))
