"""revdial driven through the library, for settings the CLI does not expose.

    python -m benchmarks.revdial_forward server --listen-port W --forward L=HOST:PORT [...]
        [--frame-size N]
    python -m benchmarks.revdial_forward agent --ws-port W [--frame-size N] [--no-extensions]
        [--virtual-echo]

The server does what ``revdial server --forward`` does (accept, ``server.dial``,
``revdial.splice``) with ``Limits(max_frame_size=N, read_size=N)``; the agent is
``revdial.Agent`` allowing every loopback target, optionally with
``extensions=False`` (plain remotedialer, as a Go agent speaks). Everything
else is revdial's defaults. The client key is ``bench``, the token ``bench``.

``--limit FIELD=VALUE`` (repeatable) sets any integer field of
``revdial.Limits`` on that side, for experiments (for example
``tcp_notsent_lowat=0`` or ``outbox_bytes=262144``).

``--virtual-echo`` gives the agent a dialer that returns an in-memory echo
stream instead of a socket (still spliced to the tunnel stream as a socket
would be): the idle-stream benchmark uses it where the hard RLIMIT_NOFILE
cannot hold one socket per stream.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from collections.abc import Awaitable, Callable

import trio

import revdial

from .baselines import parse_forward

LOOPBACK = "127.0.0.1"
KEY = "bench"
TOKEN = "bench"

log = logging.getLogger("revdial")


class VirtualEcho(trio.abc.HalfCloseableStream):
    """An in-memory stream that echoes what is sent to it (no file descriptor)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lot = trio.lowlevel.ParkingLot()
        self._eof = False
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed or self._eof:
            raise trio.ClosedResourceError("closed")
        self._buffer += data
        self._lot.unpark_all()
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        self._eof = True
        self._lot.unpark_all()
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        while not self._buffer and not self._eof and not self._closed:
            await self._lot.park()
        if self._closed:
            raise trio.ClosedResourceError("closed")
        n = len(self._buffer) if max_bytes is None else max_bytes
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def aclose(self) -> None:
        self._closed = True
        self._lot.unpark_all()
        await trio.lowlevel.checkpoint()


async def virtual_echo_dialer(proto: str, address: str) -> trio.abc.Stream:
    await trio.lowlevel.checkpoint()
    return VirtualEcho()


def limits_for(frame_size: int | None, extra: list[str] | None = None) -> revdial.Limits:
    changes: dict[str, int] = {}
    if frame_size is not None:
        changes.update(max_frame_size=frame_size, read_size=frame_size)
    for item in extra or []:
        name, _, value = item.partition("=")
        changes[name] = int(value)
    return dataclasses.replace(revdial.DEFAULT_LIMITS, **changes)


async def _until_signal(body: Callable[[], object]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(body)  # type: ignore[arg-type]
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return


async def run_server(args: argparse.Namespace) -> None:
    limits = limits_for(args.frame_size, args.limit)
    authorize = revdial.token_authorizer(token=TOKEN)

    def make_handler(
        target: str, server: revdial.Server
    ) -> Callable[[trio.SocketStream], Awaitable[None]]:
        async def handle(local: trio.SocketStream) -> None:
            try:
                tunnel = await server.dial(KEY, "tcp", target, wait=False)
            except revdial.DialError as exc:
                log.warning("dial %s: %s", target, exc)
                await trio.aclose_forcefully(local)
                return
            try:
                await revdial.splice(tunnel, local, read_size=limits.read_size)
            except revdial.TunnelError as exc:
                log.info("forward to %s ended: %s", target, exc)

        return handle

    async def body() -> None:
        async with revdial.open_server(authorize, LOOPBACK, args.listen_port,
                                       limits=limits) as server, trio.open_nursery() as nursery:
            for listen, host, port in args.forward:
                listeners = await trio.open_tcp_listeners(listen, host=LOOPBACK)
                nursery.start_soon(trio.serve_listeners,
                                   make_handler(f"{host}:{port}", server), listeners)
            await server.wait_client(KEY)
            print(f"client '{KEY}' connected", file=sys.stderr, flush=True)

    await _until_signal(body)


async def run_agent(args: argparse.Namespace) -> None:
    async def body() -> None:
        await revdial.connect(
            f"ws://{LOOPBACK}:{args.ws_port}/connect",
            headers={"X-Tunnel-ID": KEY, "Authorization": f"Bearer {TOKEN}"},
            allow=[f"{LOOPBACK}:*"],
            limits=limits_for(args.frame_size, args.limit),
            extensions=not args.no_extensions,
            dialer=virtual_echo_dialer if args.virtual_echo else revdial.default_dialer,
        )

    await _until_signal(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("server")
    srv.add_argument("--listen-port", type=int, required=True)
    srv.add_argument("--forward", type=parse_forward, action="append", default=[])
    srv.add_argument("--frame-size", type=int)
    srv.add_argument("--limit", action="append", default=[], metavar="FIELD=VALUE")
    agt = sub.add_parser("agent")
    agt.add_argument("--ws-port", type=int, required=True)
    agt.add_argument("--frame-size", type=int)
    agt.add_argument("--no-extensions", action="store_true")
    agt.add_argument("--virtual-echo", action="store_true")
    agt.add_argument("--limit", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trio.run(run_server if args.command == "server" else run_agent, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
