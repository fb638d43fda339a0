"""The server-side driver of ``benchmarks.streams`` (one run, one process).

Opens a revdial server in this process, starts ``revdial agent`` (the CLI, as
shipped) as a child process, waits for its session, then dials ``--n`` streams
through ``server.dial`` to the idle/echo targets behind the agent (round robin
over ``--target`` ports, so no loopback 4-tuple space runs out), holds them, and
prints one JSON line on stdout: both processes' VmRSS before and after, the
time to open them, and a spot check that some of them echo. With ``--virtual``
the agent is the library's, dialling in-memory echo streams (for counts beyond
RLIMIT_NOFILE).

    python -m benchmarks.streams_server --n 10000 --target P [--target P2 ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time

import trio

import revdial

from ._util import LOOPBACK, fd_count, module_cmd, revdial_cmd, rss_kib

KEY = "bench"
TOKEN = "bench"  # as benchmarks.revdial_forward


async def run(args: argparse.Namespace) -> dict[str, object]:
    authorize = revdial.token_authorizer(token=TOKEN)
    async with revdial.open_server(authorize, LOOPBACK, 0) as server:
        allow = [a for p in args.target for a in ("--allow", f"{LOOPBACK}:{p}")]
        if args.virtual:
            cmd = module_cmd("benchmarks.revdial_forward", "agent", "--ws-port",
                             str(server.port), "--virtual-echo")
        else:
            cmd = revdial_cmd("agent", "--server", f"ws://{LOOPBACK}:{server.port}/connect",
                              "--id", KEY, "--token", TOKEN, *allow)
        agent = subprocess.Popen(  # noqa: ASYNC220 (starts once, before measuring)
            cmd,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )
        try:
            with trio.fail_after(20):
                await server.wait_client(KEY)
            await trio.sleep(args.settle)
            gc.collect()
            before = {"server": rss_kib(), "agent": rss_kib(agent.pid)}
            agent_fds0 = fd_count(agent.pid)
            streams: list[revdial.TunnelStream] = []
            limiter = trio.CapacityLimiter(args.concurrency)
            targets = [f"{LOOPBACK}:{p}" for p in args.target]
            failures = 0

            async def dial(i: int) -> None:
                nonlocal failures
                async with limiter:
                    try:
                        streams.append(await server.dial(KEY, "tcp", targets[i % len(targets)]))
                    except revdial.DialError:
                        failures += 1

            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(args.n):
                    nursery.start_soon(dial, i)
            open_s = time.perf_counter() - t0
            await trio.sleep(args.settle)
            gc.collect()
            after = {"server": rss_kib(), "agent": rss_kib(agent.pid)}
            agent_fds = fd_count(agent.pid) - agent_fds0
            stats = server.statistics()
            # Spot check: some streams, spread over the set, really carry bytes.
            checked = 0
            step = max(1, len(streams) // 20)
            with trio.fail_after(20):
                for s in streams[::step]:
                    await s.send_all(b"x")
                    if await s.receive_some() == b"x":
                        checked += 1
            for s in streams:
                await s.aclose()
            n = len(streams)
            return {
                "n": args.n,
                "agent": "library agent, in-memory echo targets" if args.virtual
                else "revdial agent CLI, TCP targets",
                "opened": n,
                "failures": failures,
                "open_s": open_s,
                "concurrency": args.concurrency,
                "rss_before_kib": before,
                "rss_after_kib": after,
                "kib_per_stream": {side: (after[side] - before[side]) / max(n, 1)
                                   for side in before},
                "agent_fds_added": agent_fds,
                "server_streams": stats.streams,
                "echo_checked": checked,
                "echo_sampled": len(streams[::step]),
            }
        finally:
            agent.terminate()
            try:
                agent.wait(timeout=10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--target", type=int, action="append", required=True)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--virtual", action="store_true",
                        help="agent dials in-memory echo streams instead of sockets")
    args = parser.parse_args(argv)
    result = trio.run(run, args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
