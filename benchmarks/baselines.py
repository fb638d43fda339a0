"""Baseline processes, each with the shape of ``revdial server --forward``:
listen on a loopback port and carry each accepted connection to a target.

    python -m benchmarks.baselines echo --port P [--port P2 ...]
    python -m benchmarks.baselines relay --forward L=HOST:PORT [...] [--read-size N]
    python -m benchmarks.baselines ws-server --ws-port W --forward L=HOST:PORT [...] [--msg-size N]
    python -m benchmarks.baselines ws-client --ws-port W [--msg-size N] [--mask c|python]

* ``echo``: a trio echo server (the dial-rate / fairness / idle-stream target).
* ``relay``: the bare trio TCP relay, ``receive_some(read_size)`` (256 KiB) each
  way: the ceiling for any trio byte pump.
* ``ws-server`` + ``ws-client``: the bare trio-websocket pipe, one WebSocket per
  connection and no multiplexing, laid out like revdial: the listening side is
  the WebSocket *server* (as ``revdial server``), the target is dialled by the
  WebSocket *client* (as ``revdial agent``), which keeps ``--spares`` idle
  WebSockets open to the server so that no handshake sits on the data path.
  Each side reads its local socket with ``receive_some(msg_size)`` and sends one
  binary message per read; ``receive_buffer_size`` = ``msg_size`` and
  ``max_message_size`` = 16 MiB, as revdial does. So iperf3 without ``-R``
  ("fwd") sends unmasked server -> client frames, ``-R`` ("rev") masked
  client -> server frames -- the same directions as through revdial.

These processes never import revdial (which patches wsproto when imported):
``--mask c`` (the default) only swaps wsproto's pure-Python XOR masker for the
C ``apply_mask`` of the ``websockets`` package, the smallest change that makes
the masked direction a fair ceiling; ``--mask python`` is stock wsproto.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket,
    serve_websocket,
)

LOOPBACK = "127.0.0.1"
KiB = 1024
MiB = 1024 * KiB

log = logging.getLogger("baseline")


def install_c_masker() -> bool:
    """Give wsproto a masker built on websockets' C ``apply_mask`` (same semantics)."""
    try:
        from websockets.speedups import apply_mask
    except ImportError:
        return False
    from wsproto import frame_protocol

    mask: Callable[[bytes | bytearray, bytes], bytes] = apply_mask

    class CMasker:
        __slots__ = ("_key",)

        def __init__(self, masking_key: bytes | bytearray) -> None:
            self._key = bytes(masking_key)

        def process(self, data: bytes | bytearray) -> bytearray:
            n = len(data)
            if not n:
                return bytearray()
            out = bytearray(mask(data, self._key))
            r = n & 3
            if r:
                self._key = self._key[r:] + self._key[:r]
            return out

    frame_protocol.XorMaskerSimple = CMasker  # type: ignore[misc,assignment]
    return True


def parse_forward(spec: str) -> tuple[int, str, int]:
    listen, _, target = spec.partition("=")
    host, _, port = target.rpartition(":")
    if not listen.isdigit() or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--forward {spec!r}: expected PORT=HOST:PORT")
    return int(listen), host, int(port)


async def pump_bytes(src: trio.abc.Stream, dst: trio.abc.Stream, read_size: int) -> None:
    while data := await src.receive_some(read_size):
        await dst.send_all(data)


# --- echo -----------------------------------------------------------------


async def echo_handler(stream: trio.SocketStream) -> None:
    try:
        while data := await stream.receive_some(64 * KiB):
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def run_echo(args: argparse.Namespace) -> None:
    async with trio.open_nursery() as nursery:
        for port in args.port:
            listeners = await trio.open_tcp_listeners(port, host=LOOPBACK, backlog=4096)
            nursery.start_soon(trio.serve_listeners, echo_handler, listeners)


# --- relay ----------------------------------------------------------------


async def run_relay(args: argparse.Namespace) -> None:
    read_size: int = args.read_size

    def make_handler(host: str, port: int) -> Callable[[trio.SocketStream], Awaitable[None]]:
        async def handle(local: trio.SocketStream) -> None:
            try:
                remote = await trio.open_tcp_stream(host, port)
            except OSError:
                await trio.aclose_forcefully(local)
                return
            try:
                async with trio.open_nursery() as nursery:

                    async def one_way(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
                        with contextlib.suppress(trio.BrokenResourceError,
                                                 trio.ClosedResourceError):
                            await pump_bytes(a, b, read_size)
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(one_way, local, remote)
                    nursery.start_soon(one_way, remote, local)
            finally:
                await trio.aclose_forcefully(local)
                await trio.aclose_forcefully(remote)

        return handle

    async with trio.open_nursery() as nursery:
        for listen, host, port in args.forward:
            listeners = await trio.open_tcp_listeners(listen, host=LOOPBACK, backlog=4096)
            nursery.start_soon(trio.serve_listeners, make_handler(host, port), listeners)


# --- WebSocket pipe -------------------------------------------------------


async def ws_pipe(local: trio.SocketStream, ws: WebSocketConnection, msg_size: int) -> None:
    """Local bytes -> one binary message per read; messages -> local bytes.
    The first end (EOF or error) of either direction ends both, as in remotedialer."""
    try:
        async with trio.open_nursery() as nursery:

            async def up() -> None:
                try:
                    while data := await local.receive_some(msg_size):
                        await ws.send_message(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed):
                    pass
                nursery.cancel_scope.cancel()

            async def down() -> None:
                try:
                    while True:
                        message = await ws.get_message()
                        if isinstance(message, str):
                            message = message.encode()
                        await local.send_all(message)
                except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionClosed):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(up)
            nursery.start_soon(down)
    finally:
        await trio.aclose_forcefully(local)
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await ws.aclose()


async def run_ws_server(args: argparse.Namespace) -> None:
    msg_size: int = args.msg_size
    spare_send, spare_recv = trio.open_memory_channel[tuple[WebSocketConnection, trio.Event]](
        1 << 20
    )
    announced = False

    async def on_websocket(request: WebSocketRequest) -> None:
        nonlocal announced
        ws = await request.accept()
        done = trio.Event()
        await spare_send.send((ws, done))
        if not announced:
            announced = True
            print("ws-server: client ready", file=sys.stderr, flush=True)
        await done.wait()

    def make_handler(host: str, port: int) -> Callable[[trio.SocketStream], Awaitable[None]]:
        async def handle(local: trio.SocketStream) -> None:
            while True:
                ws, done = await spare_recv.receive()
                try:
                    await ws.send_message(f"{host}:{port}")
                except ConnectionClosed:
                    done.set()
                    continue  # a stale spare: take the next one
                break
            try:
                await ws_pipe(local, ws, msg_size)
            finally:
                done.set()

        return handle

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: serve_websocket(
                on_websocket, LOOPBACK, args.ws_port, None,
                max_message_size=16 * MiB, receive_buffer_size=msg_size,
                handler_nursery=nursery,
            )
        )
        for listen, host, port in args.forward:
            listeners = await trio.open_tcp_listeners(listen, host=LOOPBACK, backlog=4096)
            nursery.start_soon(trio.serve_listeners, make_handler(host, port), listeners)


async def run_ws_client(args: argparse.Namespace) -> None:
    msg_size: int = args.msg_size

    async def slot(nursery: trio.Nursery) -> None:
        replaced = False
        try:
            async with open_websocket(
                LOOPBACK, args.ws_port, "/pipe", use_ssl=False,
                max_message_size=16 * MiB, receive_buffer_size=msg_size,
            ) as ws:
                target = await ws.get_message()
                nursery.start_soon(slot, nursery)  # keep a spare ready
                replaced = True
                host, _, port = str(target).rpartition(":")
                try:
                    local = await trio.open_tcp_stream(host, int(port))
                except OSError:
                    return
                await ws_pipe(local, ws, msg_size)
        except Exception as exc:  # one connection's failure never stops the pool
            log.debug("ws-client slot: %r", exc)
            if not replaced:
                await trio.sleep(0.2)
                nursery.start_soon(slot, nursery)

    async with trio.open_nursery() as nursery:
        for _ in range(args.spares):
            nursery.start_soon(slot, nursery)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    echo = sub.add_parser("echo")
    echo.add_argument("--port", type=int, action="append", required=True)
    relay = sub.add_parser("relay")
    relay.add_argument("--forward", type=parse_forward, action="append", required=True)
    relay.add_argument("--read-size", type=int, default=256 * KiB)
    wss = sub.add_parser("ws-server")
    wss.add_argument("--ws-port", type=int, required=True)
    wss.add_argument("--forward", type=parse_forward, action="append", required=True)
    wss.add_argument("--msg-size", type=int, default=256 * KiB)
    wss.add_argument("--mask", choices=["c", "python"], default="c")
    wsc = sub.add_parser("ws-client")
    wsc.add_argument("--ws-port", type=int, required=True)
    wsc.add_argument("--msg-size", type=int, default=256 * KiB)
    wsc.add_argument("--spares", type=int, default=2)
    wsc.add_argument("--mask", choices=["c", "python"], default="c")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if getattr(args, "mask", "python") == "c" and not install_c_masker():
        print("baseline: websockets' C apply_mask is unavailable; pure-Python masking",
              file=sys.stderr)
    commands = {"echo": run_echo, "relay": run_relay, "ws-server": run_ws_server,
                "ws-client": run_ws_client}
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(commands[args.command], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
