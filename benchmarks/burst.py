"""N connections opened in a burst through a path, then held idle.

The shape of a busy front end after a restart, or of a client pool warming
up: N TCP clients connect to the forwarded port at once (at most
``--in-flight`` connects outstanding, below the kernel's listen backlog), each
sends one byte and waits for its echo -- so every stream is up end to end --
then all are held open. The clients are a small C program
(``benchmarks/c/burst_client.c``, built with ``cc`` into ``benchmarks/.build``
on first use), so the load generator leaves the two cores to the code under
test; ``--client python`` uses a trio client instead (a second opinion).
Reported per path: the time until the last echo (``open s``), and each
tunnel process's VmRSS growth divided by N (KiB per stream), sampled after a
settle. The client process is started fresh for
every round, the echo target (``benchmarks.baselines echo``) runs in another;
paths and rounds interleave:

* ``plain``: straight to the echo target (the floor: its own accept rate);
* ``relay``: the bare trio TCP relay (one process; it holds both sockets of a
  connection, so compare it with each revdial side and with their sum);
* ``revdial``: ``revdial server --forward`` -> tunnel -> ``revdial agent`` (CLI
  processes, both measured);
* ``revdial-base``: the same through an older checkout's CLI
  (``REVDIAL_BASE_SRC=<checkout>/src``), for A/B in one run.

    python -m benchmarks.burst [--n 5000] [--repeat 3] [--in-flight 512]
        [--paths relay revdial] [--client c|python]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import trio

from ._tunnels import open_tunnel
from ._util import (
    LOOPBACK,
    free_port,
    log,
    median,
    module_cmd,
    raise_nofile,
    ratio,
    rss_kib,
    running,
    save,
    table,
    wait_listening,
)

SETTLE_S = 1.0
C_SOURCE = Path(__file__).with_name("c") / "burst_client.c"
BUILD_DIR = Path(__file__).with_name(".build")


def c_client() -> str:
    """Path of the C client, built from ``C_SOURCE`` when missing or stale."""
    binary = BUILD_DIR / "burst_client"
    if binary.exists() and binary.stat().st_mtime >= C_SOURCE.stat().st_mtime:
        return str(binary)
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (apt-get install -y gcc), or use --client python")
    BUILD_DIR.mkdir(exist_ok=True)
    subprocess.run([cc, "-O2", "-o", str(binary), str(C_SOURCE)], check=True)
    return str(binary)
OPEN_TIMEOUT_S = 60.0


async def _clients(port: int, n: int, in_flight: int, hold: trio.Event) -> float:
    """Open ``n`` echoed connections to ``port``; return the seconds it took."""
    limit = trio.CapacityLimiter(in_flight)
    streams: list[trio.SocketStream] = []
    t0 = trio.current_time()

    async def one() -> None:
        async with limit:
            stream = await trio.open_tcp_stream(LOOPBACK, port)
            await stream.send_all(b"x")
            if await stream.receive_some(1) != b"x":
                raise RuntimeError("no echo")
            streams.append(stream)

    with trio.move_on_after(OPEN_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
    elapsed = trio.current_time() - t0
    print(json.dumps({"open_s": elapsed, "opened": len(streams)}), flush=True)
    await hold.wait()
    return elapsed


def client_main(argv: list[str]) -> int:
    """``benchmarks.burst client PORT N IN_FLIGHT``: open, report, hold until stdin closes."""
    port, n, in_flight = (int(a) for a in argv)
    raise_nofile(n + 100)

    async def run() -> None:
        hold = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_clients, port, n, in_flight, hold)

            async def wait_stdin() -> None:
                await trio.to_thread.run_sync(sys.stdin.read)
                hold.set()

            nursery.start_soon(wait_stdin)

    trio.run(run)
    return 0


def one_round(path: str, n: int, in_flight: int, client_cmd: list[str]) -> dict[str, object]:
    target = free_port()
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(module_cmd("benchmarks.baselines", "echo", "--port",
                                               str(target))))
        wait_listening(target)
        tunnel = stack.enter_context(open_tunnel(path, [target]))
        time.sleep(SETTLE_S)
        before = {role: rss_kib(pid) for role, pid in tunnel.pids.items()}
        client = subprocess.Popen(
            [*client_cmd, str(tunnel.ports[0]), str(n), str(in_flight)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout is not None
            line = client.stdout.readline()
            if not line:
                raise RuntimeError(f"{path}: the client failed")
            report = json.loads(line)
            if report["opened"] != n:
                raise RuntimeError(f"{path}: only {report['opened']} of {n} connections "
                                   f"echoed within {OPEN_TIMEOUT_S:g} s")
            time.sleep(SETTLE_S)
            after = {role: rss_kib(pid) for role, pid in tunnel.pids.items()}
        finally:
            assert client.stdin is not None
            client.stdin.close()
            client.wait(timeout=60)
    per = {role: (after[role] - before[role]) / n for role in before}
    return {"path": path, "n": n, "open_s": report["open_s"], "opened": report["opened"],
            "kib_per_stream": per, "rss_before_kib": before, "rss_after_kib": after}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=512)
    parser.add_argument("--paths", nargs="+", default=["relay", "revdial"],
                        choices=["plain", "relay", "revdial", "revdial-base"])
    parser.add_argument("--client", default="c", choices=["c", "python"])
    parser.add_argument("--name", default="burst")
    args = parser.parse_args(argv)
    client_cmd = ([c_client()] if args.client == "c"
                  else module_cmd("benchmarks.burst", "client"))
    raise_nofile(2 * args.n + 200)  # children inherit it
    runs: list[dict[str, object]] = []
    for r in range(args.repeat):
        order = args.paths if r % 2 == 0 else list(reversed(args.paths))
        for path in order:
            result = one_round(path, args.n, args.in_flight, client_cmd)
            runs.append(result)
            per = result["kib_per_stream"]
            assert isinstance(per, dict)
            log(f"round {r + 1}/{args.repeat} {path:14} open {result['open_s']:.2f} s  "
                + "  ".join(f"{role} {v:.1f} KiB" for role, v in per.items()))
    rows = []
    relay_open = median([float(x["open_s"]) for x in runs  # type: ignore[arg-type]
                         if x["path"] == "relay"]) if "relay" in args.paths else float("nan")
    for path in args.paths:
        mine = [x for x in runs if x["path"] == path]
        open_s = median([float(x["open_s"]) for x in mine])  # type: ignore[arg-type]
        roles = list(mine[0]["kib_per_stream"])  # type: ignore[call-overload]
        kib = {role: median([x["kib_per_stream"][role] for x in mine])  # type: ignore[index]
               for role in roles}
        rows.append([path, f"{open_s:.2f}", f"{ratio(open_s, relay_open):.2f}",
                     " / ".join(f"{role} {v:.1f}" for role, v in kib.items())])
    print(f"{args.n} connections in a burst (at most {args.in_flight} connecting, "
          f"{args.client} client), each echoed once, then idle; {args.repeat} rounds, medians")
    print(table(["path", "open s", "x relay", "KiB per stream (RSS growth / N)"], rows))
    save(args.name, {"args": vars(args), "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
