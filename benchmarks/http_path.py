"""Request rate through the whole HTTP path versus straight to the upstream.

Small GETs (``/version``, about 250 bytes) from ``--clients`` concurrent
keep-alive clients, for ``--seconds`` each run, alternating:

* direct: clients -> stand-in API server;
* path:   clients -> ``revdial server --http-listen`` (front door) -> tunnel ->
  ``revdial agent --upstream`` (reverse proxy) -> the same stand-in.

The stand-in, the server and the agent are separate processes (``python -m
revdial._standin``, the ``revdial`` CLI); the load generator is this process
(trio + h11, one task per client). Reports the median requests/s of each
mode over ``--repeat`` runs, the ratio path/direct and the CPU seconds each
process spent per 1,000 requests (where the time goes).

    python -m benchmarks.http_path [--clients 50] [--seconds 5] [--repeat 3]

Caveat: on a 2-core machine the load generator competes with the processes it
measures; both modes pay for it alike.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import trio

from revdial._standin import HTTPConnection

from ._util import (
    cpu_seconds,
    free_ports,
    log,
    median,
    module_cmd,
    revdial_cmd,
    running,
    save,
    wait_listening,
)


async def _load(port: int, target: str, headers: list[tuple[str, str]], *, clients: int,
                seconds: float, warmup: float) -> int:
    """Requests completed by ``clients`` keep-alive clients in ``seconds`` (after warm-up)."""
    counted = 0
    measuring = False

    async def client() -> None:
        nonlocal counted
        async with await HTTPConnection.open("127.0.0.1", port) as conn:
            while True:
                resp = await conn.request("GET", target, headers=headers)
                if resp.status != 200:
                    raise RuntimeError(f"GET {target}: {resp.status} {resp.text[:200]}")
                if measuring:
                    counted += 1

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)
        await trio.sleep(warmup)
        measuring = True
        await trio.sleep(seconds)
        measuring = False
        nursery.cancel_scope.cancel()
    return counted


def _wait_ready(port: int, target: str, headers: list[tuple[str, str]]) -> None:
    async def poll() -> None:
        with trio.fail_after(20):
            while True:
                try:
                    async with await HTTPConnection.open("127.0.0.1", port) as conn:
                        if (await conn.request("GET", target, headers=headers)).status == 200:
                            return
                except OSError:
                    pass
                await trio.sleep(0.05)

    trio.run(poll)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    api_port, ws_port, http_port = free_ports(3)
    agent_token, user_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    auth = [("Authorization", f"Bearer {user_token}")]
    direct_target = "/version"
    path_target = "/k8s/clusters/bench/version"
    with tempfile.TemporaryDirectory() as tmp:
        users = Path(tmp) / "users"
        users.write_text(f"{user_token} bench\n")
        env = {"REVDIAL_TOKEN": agent_token}
        with (
            running(module_cmd("revdial._standin", "--port", str(api_port))) as api,
            running(revdial_cmd("server", "--listen", f"127.0.0.1:{ws_port}",
                                "--http-listen", f"127.0.0.1:{http_port}",
                                "--user-tokens", str(users)), env=env) as server,
            running(revdial_cmd("agent", "--server", f"ws://127.0.0.1:{ws_port}/connect",
                                "--id", "bench", "--upstream", f"http://127.0.0.1:{api_port}"),
                    env=env) as agent,
        ):
            wait_listening(api_port)
            _wait_ready(http_port, path_target, auth)
            procs = {"stand-in": api.pid, "server": server.pid, "agent": agent.pid}
            rates: dict[str, list[float]] = {"direct": [], "path": []}
            cpu: dict[str, dict[str, list[float]]] = {m: {p: [] for p in procs} for m in rates}
            for i in range(args.repeat):
                for mode, port, target, headers in (
                    ("direct", api_port, direct_target, []),
                    ("path", http_port, path_target, auth),
                ):
                    before = {name: cpu_seconds(pid) for name, pid in procs.items()}
                    t0 = time.perf_counter()
                    n = trio.run(partial(_load, port, target, headers, clients=args.clients,
                                         seconds=args.seconds, warmup=args.warmup))
                    elapsed = time.perf_counter() - t0
                    rate = n / args.seconds
                    rates[mode].append(rate)
                    for name, pid in procs.items():
                        # CPU per 1,000 requests over the whole run (warm-up included).
                        total = n * elapsed / args.seconds
                        cpu[mode][name].append(
                            (cpu_seconds(pid) - before[name]) / max(total, 1) * 1000)
                    log(f"run {i + 1}/{args.repeat} {mode:6}: {rate:8.0f} requests/s")
            for proc in (api, server, agent):
                proc.check_alive()

    direct, path = median(rates["direct"]), median(rates["path"])
    print(f"small GET, {args.clients} concurrent keep-alive clients, {args.seconds:g} s x "
          f"{args.repeat} (medians)")
    print(f"  direct to the upstream            : {direct:8.0f} requests/s")
    print(f"  front door -> tunnel -> agent proxy: {path:8.0f} requests/s")
    print(f"  ratio path/direct                 : {path / direct:8.2f}")
    print("  CPU seconds per 1,000 requests (direct / path):")
    for name in procs:
        print(f"    {name:9}: {median(cpu['direct'][name]):.3f} / {median(cpu['path'][name]):.3f}")
    out = save("http_path", {
        "clients": args.clients, "seconds": args.seconds, "repeat": args.repeat,
        "direct_rps": rates["direct"], "path_rps": rates["path"],
        "direct_median": direct, "path_median": path, "ratio": path / direct,
        "cpu_per_1000": {m: {p: median(v) for p, v in d.items()} for m, d in cpu.items()},
    })
    print(f"  saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
