"""CPU per request of the HTTP forwarding core alone: no tunnel, one process.

The agent's ``ReverseProxy`` (the front door runs the same ``HTTPForwarder``)
between Unix socket pairs (trio's memory streams cost more than the
forwarder itself): ``--clients`` kept-alive client connections (50, as ``wrk
-c50`` in ``benchmarks.smallreq``) each send small GETs one after the other,
and a scripted upstream answers each with the same nginx-like response
(250-byte body, ``Content-Length``). The clients and the upstream are byte
scripts (no HTTP library), so what is measured is the forwarder -- h11,
routing, header filtering, the pool, its cancel scopes -- plus the sockets'
syscalls and trio's scheduling: process CPU time per request.

Everything runs in this one process, in short batches that alternate
between the paths, so a neighbour's load on a shared machine weighs on all
of them alike: ``direct`` (the clients talk to the upstream script, no proxy
between: the scripts' own cost, subtracted in the last column), ``revdial``
(this checkout) and, with ``--base``, ``revdial-base``: the ``revdial``
package of ``$REVDIAL_BASE_SRC`` imported a second time as ``revdial_base``.

    python -m benchmarks.proxycost [--count 4000] [--rounds 6] [--base]

CPU time on a shared machine moves with the neighbours (±15 % between
batches); the Python function calls per request (``cProfile``, one more
batch per path, ``calls`` column) do not, and are counted too.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import os
import pstats
import statistics
import sys
import time
from typing import Any

import trio

from revdial._proxy import ReverseProxy

BODY = b"x" * 250
REQUEST = (b"GET /api/v1/namespaces/default/pods/web-0 HTTP/1.1\r\nHost: revdial.proxy\r\n"
           b"User-Agent: kubectl/v1.30.0 (linux/amd64) kubernetes/7c48c2b\r\n"
           b"Accept: application/json, */*\r\nAccept-Encoding: gzip\r\n"
           b"Impersonate-User: alice\r\nImpersonate-Group: dev\r\n"
           b"X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: https\r\n"
           b"X-Forwarded-Host: front.example:8443\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Fri, 04 Dec 2026 17:00:00 GMT\r\n"
            b"Content-Type: application/json\r\nContent-Length: 250\r\n"
            b"Connection: keep-alive\r\n\r\n" + BODY)
#: Requests per client before the clock starts (connections open, pool fills).
WARMUP = 10


def load_base() -> Any:
    """``$REVDIAL_BASE_SRC``'s ``ReverseProxy``, its package imported as ``revdial_base``."""
    src = os.environ.get("REVDIAL_BASE_SRC")
    package = os.path.join(src or "", "revdial")
    if not src or not os.path.isdir(package):
        raise SystemExit("--base needs REVDIAL_BASE_SRC=<older checkout>/src")
    spec = importlib.util.spec_from_file_location(
        "revdial_base", os.path.join(package, "__init__.py"),
        submodule_search_locations=[package])
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["revdial_base"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("revdial_base._proxy").ReverseProxy


def pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def upstream(stream: trio.abc.Stream) -> None:
    buf = b""
    while data := await stream.receive_some():
        buf += data
        while b"\r\n\r\n" in buf:
            _, _, buf = buf.partition(b"\r\n\r\n")
            await stream.send_all(RESPONSE)


async def batch(proxy_class: Any, count: int, clients: int) -> float:
    """``count`` requests from ``clients`` connections; CPU µs per request."""
    per_client = max(1, count // clients)
    started = trio.Event()
    ready = done = 0
    t0 = elapsed = 0.0
    async with trio.open_nursery() as nursery:

        async def connect() -> trio.abc.Stream:
            ours, theirs = pair()
            nursery.start_soon(upstream, theirs)
            return ours

        proxy = proxy_class("http://upstream.example", connect=connect) if proxy_class else None

        async def run_client() -> None:
            nonlocal ready, done, t0, elapsed
            client, served = pair()
            nursery.start_soon(proxy or upstream, served)
            for i in range(WARMUP + per_client):
                if i == WARMUP:
                    ready += 1
                    if ready == clients:  # the clock starts with the last one
                        t0 = time.process_time()
                        started.set()
                    await started.wait()
                await client.send_all(REQUEST)
                got = b""
                while not (got.endswith(BODY) and b"\r\n\r\n" in got):
                    got += await client.receive_some()
            done += 1
            if done == clients:
                elapsed = time.process_time() - t0
                nursery.cancel_scope.cancel()

        for _ in range(clients):
            nursery.start_soon(run_client)
    return elapsed / (per_client * clients) * 1e6


def calls_per_request(proxy_class: Any, count: int, clients: int) -> float:
    """Python function calls per request (cProfile over one batch, warm-up included)."""
    profiler = cProfile.Profile()
    profiler.enable()
    trio.run(batch, proxy_class, count, clients)
    profiler.disable()
    total: int = pstats.Stats(profiler).total_calls  # type: ignore[attr-defined]
    return total / (clients * (WARMUP + max(1, count // clients)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=4000, help="requests per batch")
    parser.add_argument("--rounds", type=int, default=6, help="batches per path")
    parser.add_argument("--clients", type=int, default=50,
                        help="client connections sending at once (as wrk -c50)")
    parser.add_argument("--base", action="store_true",
                        help="also $REVDIAL_BASE_SRC's code, as revdial-base")
    args = parser.parse_args(argv)
    paths: dict[str, Any] = {"direct": None, "revdial": ReverseProxy}
    if args.base:
        paths["revdial-base"] = load_base()
    runs: dict[str, list[float]] = {p: [] for p in paths}
    order = list(paths)
    for i in range(args.rounds):
        for path in order if i % 2 == 0 else order[::-1]:
            runs[path].append(trio.run(batch, paths[path], args.count, args.clients))
        print(f"round {i + 1}/{args.rounds}: " + ", ".join(
            f"{p} {runs[p][-1]:.1f}" for p in order) + " µs/request", flush=True)
    calls = {p: calls_per_request(paths[p], args.count, args.clients) for p in order}
    print(f"forwarder alone (ReverseProxy on socket pairs), {args.count} requests from "
          f"{args.clients} connections x {args.rounds} batches per path, alternating:")
    print("  path            CPU µs/request (median)  beyond direct  calls/request")
    scripts = statistics.median(runs["direct"])
    for path, values in runs.items():
        median = statistics.median(values)
        beyond = "" if path == "direct" else f"{median - scripts:.1f}"
        print(f"  {path:14}  {median:23.1f}  {beyond:>13}  {calls[path]:13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
