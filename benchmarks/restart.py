"""How soon a forward works again after the server is killed and restarted.

``revdial server --forward`` and ``revdial agent`` (CLI processes) carry a
forward to an echo target. Each round: ``kill -9`` the server, leave it down
for ``--down`` seconds, start it again on the same ports, and time from that
start until a connection through the forward echoes a byte (polled every
20 ms). Rounds are ``--interval`` seconds apart, so the agent's sessions in
between are short, as in a rolling upgrade of several replicas. With
``REVDIAL_BASE_SRC=<checkout>/src`` the same rounds run against an older
checkout's agent too (``revdial-base``), alternating with the current one.

    python -m benchmarks.restart [--rounds 3] [--down 2] [--interval 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time
from collections.abc import Iterator

from ._tunnels import base_env
from ._util import (
    LOOPBACK,
    Proc,
    free_ports,
    log,
    median,
    module_cmd,
    revdial_cmd,
    save,
    table,
    wait_listening,
)

TOKEN = "bench-token"
KEY = "bench"


def forward_works(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5) as s:
            s.sendall(b"x")
            return s.recv(1) == b"x"
    except OSError:
        return False


def wait_working(port: int, timeout: float) -> float:
    """Seconds until the forward echoes, polling every 20 ms."""
    start = time.monotonic()
    while not forward_works(port):
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"forward on {port} not working after {timeout:g} s")
        time.sleep(0.02)
    return time.monotonic() - start


@contextlib.contextmanager
def setup(env: dict[str, str] | None) -> Iterator[tuple[list[str], int, Proc]]:
    ws_port, fwd_port, echo_port = free_ports(3)
    server_cmd = revdial_cmd(
        "server", "--listen", f"{LOOPBACK}:{ws_port}", "--token", TOKEN,
        "--forward", f"{LOOPBACK}:{fwd_port}={KEY}/{LOOPBACK}:{echo_port}")
    with contextlib.ExitStack() as stack:
        echo = Proc(module_cmd("benchmarks.baselines", "echo", "--port", str(echo_port)))
        stack.callback(echo.stop)
        wait_listening(echo_port)
        agent = Proc(revdial_cmd(
            "agent", "--server", f"ws://{LOOPBACK}:{ws_port}/connect", "--id", KEY,
            "--token", TOKEN, "--allow", f"{LOOPBACK}:{echo_port}"), env)
        stack.callback(agent.stop)
        yield server_cmd, fwd_port, agent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--down", type=float, default=2.0)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--name", default="restart")
    args = parser.parse_args(argv)
    paths: dict[str, dict[str, str] | None] = {"revdial": None}
    if os.environ.get("REVDIAL_BASE_SRC"):
        paths["revdial-base"] = base_env()
    results: dict[str, list[float]] = {p: [] for p in paths}
    for path, env in paths.items():
        with setup(env) as (server_cmd, fwd_port, agent):
            server = Proc(server_cmd)
            try:
                wait_working(fwd_port, 20)
                for i in range(args.rounds):
                    time.sleep(max(0.0, args.interval - args.down))
                    server.popen.kill()
                    server.popen.wait()
                    server.stop()
                    time.sleep(args.down)
                    server = Proc(server_cmd)
                    took = wait_working(fwd_port, 60)
                    results[path].append(took)
                    log(f"{path} round {i + 1}/{args.rounds}: forward working {took:.2f} s "
                        "after the restart")
                agent.check_alive()
            finally:
                server.stop()
    rows = [[p, " / ".join(f"{t:.2f}" for t in ts), median(ts)] for p, ts in results.items()]
    print(f"server kill -9, down {args.down:g} s, restarted; rounds {args.interval:g} s apart; "
          "seconds from the restart until the forward echoes")
    print(table(["agent", "each round", "median"], rows))
    out = save(args.name, {"rounds": args.rounds, "down": args.down, "interval": args.interval,
                           "results": results})
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
