"""The server's monitoring listener: ``/metrics``, ``/healthz``, ``/readyz``, ``/clients``.

A separate, plain-HTTP listener (``revdial server --metrics-listen``), off
unless asked for: it shows who is connected, so bind it to loopback or a
private network. It speaks HTTP/1.1 with h11, one small request at a time:

=============  ==============================================================
``/metrics``   Prometheus text format (see :mod:`revdial._metrics`)
``/healthz``   200 while the process serves this listener
``/readyz``    200 once the server is listening (and the ``ready`` check
               passes), 503 before that and once it stops
``/clients``   JSON: ``{"clients": [...]}``, one object per session
               (:func:`revdial._metrics.client_report`); with peering also
               ``"peers"`` (:func:`revdial._metrics.peer_report`)
=============  ==============================================================

Only ``GET`` and ``HEAD`` (405 otherwise); any other path is 404; a query
string is ignored. A request head is bounded by ``max_request_bytes`` (431
beyond) and a request body is not accepted (413); a connection idle for
``idle_timeout`` is closed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import h11
import trio
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from ._metrics import DEFAULT_CLIENT_SERIES, ServerCollector, client_report, peer_report
from ._server import Server, bound_addresses

__all__ = ["Monitor"]

log = logging.getLogger("revdial.monitor")

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)
_READ_SIZE = 4096
#: The classic text format (what ``generate_latest`` writes): every Prometheus
#: release reads it (newer prometheus-client versions advertise 1.0.0).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Monitor:
    """Health, readiness, metrics and the client list of a :class:`~revdial.Server`.

    ``await nursery.start(monitor.serve, host, port)`` listens and reports
    the bound addresses; :meth:`handle` serves one accepted connection (any
    ``trio.abc.Stream``). ``ready`` is an extra readiness check (``/readyz``
    is 200 only while ``server.listening`` and ``ready()`` are both true).
    :attr:`registry` is this monitor's own prometheus-client registry.
    """

    def __init__(
        self,
        server: Server,
        *,
        ready: Callable[[], bool] | None = None,
        max_client_series: int = DEFAULT_CLIENT_SERIES,
        max_request_bytes: int = 8 * 1024,
        idle_timeout: float = 30.0,
    ) -> None:
        self.server = server
        self._ready = ready
        self.max_request_bytes = max_request_bytes
        self.idle_timeout = idle_timeout
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServerCollector(server, max_client_series=max_client_series))
        #: Bound ``(host, port)`` pairs once :meth:`serve` has started.
        self.addresses: list[tuple[str, int]] = []

    @property
    def port(self) -> int:
        if not self.addresses:
            raise RuntimeError("monitor is not listening yet")
        return self.addresses[0][1]

    def is_ready(self) -> bool:
        return self.server.listening and (self._ready is None or self._ready())

    async def serve(
        self,
        host: str | None,
        port: int,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` and answer until cancelled (``OSError`` if it cannot)."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.addresses = bound_addresses(listeners)
        log.info("metrics and health on %s",
                 ", ".join(f"http://{_fmt(h, p)}" for h, p in self.addresses))
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self.handle, listeners)
            task_status.started(self.addresses)

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve requests on one connection until it closes, then close it.

        Never raises for what the client does. Cancellation closes the
        connection at once.
        """
        try:
            await self._serve_connection(stream)
        except _STREAM_ERRORS:
            pass
        except Exception:
            log.exception("monitor: unexpected error")
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_request_bytes)
        while True:
            request: h11.Request | None = None
            with trio.move_on_after(self.idle_timeout):
                try:
                    request = await self._read_request(conn, stream)
                except h11.RemoteProtocolError as exc:
                    await self._send_error(conn, stream, exc.error_status_hint, str(exc))
                    return
            if request is None:  # closed, timed out, or answered with an error
                return
            status, content_type, body = self.respond(request.method, request.target)
            head_only = request.method == b"HEAD"
            headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store")]
            if status == 405:
                headers.append(("Allow", "GET, HEAD"))
            data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
            if not head_only:
                data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(data)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _read_request(
        self, conn: h11.Connection, stream: trio.abc.Stream
    ) -> h11.Request | None:
        """The next request, its (empty) body read; None if the connection is done."""
        request: h11.Request | None = None
        head_bytes = 0  # received before the head was complete
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(_READ_SIZE)
                if request is None:
                    head_bytes += len(data)
                conn.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Request):
                # h11 bounds an incomplete head; this bounds one that came at once.
                if head_bytes > self.max_request_bytes:
                    await self._send_error(conn, stream, 431, "request header fields too large")
                    return None
                request = event
            elif isinstance(event, h11.Data):
                await self._send_error(conn, stream, 413, "a request body is not accepted")
                return None
            elif isinstance(event, h11.EndOfMessage):
                return request
            else:  # ConnectionClosed or PAUSED (nothing more to read)
                return None

    async def _send_error(
        self, conn: h11.Connection, stream: trio.abc.Stream, status: int, text: str
    ) -> None:
        """Answer ``status`` and end the connection (if no response was started)."""
        body = f"{text}\n".encode()
        headers = [("Content-Type", "text/plain; charset=utf-8"),
                   ("Content-Length", str(len(body))), ("Connection", "close")]
        try:
            data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
            data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:  # a response was already started
            return
        await stream.send_all(data)

    def respond(self, method: bytes, target: bytes) -> tuple[int, str, bytes]:
        """``(status, content type, body)`` for a request (no I/O)."""
        text = "text/plain; charset=utf-8"
        if method not in (b"GET", b"HEAD"):
            return 405, text, b"only GET and HEAD\n"
        path = target.partition(b"?")[0]
        if path == b"/metrics":
            return 200, METRICS_CONTENT_TYPE, generate_latest(self.registry)
        if path == b"/healthz":
            return 200, text, b"ok\n"
        if path == b"/readyz":
            if self.is_ready():
                return 200, text, b"ready\n"
            return 503, text, b"not ready\n"
        if path == b"/clients":
            report: dict[str, object] = {"clients": client_report(self.server)}
            if self.server.peer_id is not None:
                report["peers"] = peer_report(self.server)
            body = json.dumps(report, indent=1) + "\n"
            return 200, "application/json", body.encode()
        return 404, text, b"not found: /metrics, /healthz, /readyz, /clients\n"


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
