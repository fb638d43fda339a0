"""What h11 itself costs per proxied request on this machine (no I/O).

A reverse proxy hop runs h11 twice per request: as a server (parse the
client's request, write the response) and as a client (write the request
upstream, parse the response). The front door and the agent's proxy each do
both, so this is the floor of their per-request CPU while they use h11.

    python -m benchmarks.h11cost [--count 20000]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time

import h11

REQUEST = (b"GET /k8s/clusters/c1/version HTTP/1.1\r\nHost: 127.0.0.1:8443\r\n"
           b"Authorization: Bearer u\r\nUser-Agent: kubectl/v1.30\r\n"
           b"Accept: application/json\r\n\r\n")
BODY = b"x" * 250
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 02 Dec 2026 10:00:00 GMT\r\n"
            b"Content-Type: application/json\r\nContent-Length: 250\r\n"
            b"Connection: keep-alive\r\n\r\n" + BODY)


def server_side() -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(REQUEST)
    conn.next_event()  # Request
    conn.next_event()  # EndOfMessage
    conn.send(h11.Response(status_code=200, headers=[
        (b"content-type", b"application/json"), (b"content-length", b"250")]))
    conn.send(h11.Data(data=BODY))
    conn.send(h11.EndOfMessage())


def client_side() -> None:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=b"GET", target=b"/version", headers=[
        (b"host", b"127.0.0.1"), (b"authorization", b"Bearer x"),
        (b"accept", b"application/json")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(RESPONSE)
    for _ in range(3):  # Response, Data, EndOfMessage
        conn.next_event()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20000)
    args = parser.parse_args(argv)
    for name, fn in (("server role: parse request, write response", server_side),
                     ("client role: write request, parse response", client_side)):
        fn()
        t0 = time.perf_counter()
        for _ in range(args.count):
            fn()
        us = (time.perf_counter() - t0) / args.count * 1e6
        print(f"h11 {importlib.metadata.version('h11')}, {name}: {us:.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
