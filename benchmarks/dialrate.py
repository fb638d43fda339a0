"""Dial rate: ``--count`` sequential connect -> 1-byte echo -> close, TCP_NODELAY,
through each path to a trio echo server; p50 / p99 in ms.

Paths: plain (the echo server directly), the bare trio relay, ``ssh -R`` (if
sshd is installed), revdial's CLI forward (the agent negotiates the revdial
extension: the server's ``dial()`` waits for the agent's confirmed connect) and
revdial with ``extensions=False`` on the agent (plain remotedialer: ``dial()``
returns at once and the first byte travels right behind the Connect).
Interleaved rounds (each path runs ``--count`` dials per round), medians of the
per-round percentiles; ratios are revdial / baseline.

    python -m benchmarks.dialrate [--count 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import time

from ._tunnels import DESCRIPTIONS, open_tunnel, ssh_unavailable
from ._util import (
    LOOPBACK,
    cpu_seconds,
    free_port,
    log,
    median,
    module_cmd,
    percentile,
    ratio,
    running,
    save,
    table,
    wait_listening,
)

PATHS = {
    "plain": ("plain", {}),
    "relay": ("relay", {}),
    "ssh": ("ssh", {}),
    "revdial": ("revdial", {}),
    "revdial-noext": ("revdial-lib", {"extensions": False}),
    "revdial-base": ("revdial-base", {}),
}
REVDIAL = ["revdial", "revdial-noext", "revdial-base"]
BASELINES = ["plain", "relay", "ssh"]


def dial_once(port: int) -> float:
    """Seconds for connect -> send 1 byte -> receive it -> close."""
    t0 = time.perf_counter()
    s = socket.create_connection((LOOPBACK, port), timeout=10)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"x")
        if s.recv(1) != b"x":
            raise RuntimeError(f"no echo through port {port}")
    finally:
        s.close()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--paths", nargs="+", choices=list(PATHS),
                        default=[k for k in PATHS if k != "revdial-base"],
                        help="revdial-base: an older checkout, REVDIAL_BASE_SRC=<it>/src")
    parser.add_argument("--name", default="dialrate", help="results/<name>.json")
    args = parser.parse_args(argv)
    paths = list(args.paths)
    skipped: dict[str, str] = {}
    if "ssh" in paths and (why := ssh_unavailable()):
        print(f"skipping ssh -R: {why}", file=sys.stderr)
        skipped["ssh"] = why
        paths.remove("ssh")
    samples: dict[str, list[list[float]]] = {k: [] for k in paths}
    #: CPU (user + system) of the path's own processes per dial, microseconds.
    cpu_us: dict[str, list[float]] = {k: [] for k in paths}
    echo = free_port()
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(module_cmd("benchmarks.baselines", "echo", "--port",
                                               str(echo))))
        wait_listening(echo)
        tunnels = {}
        for k in paths:
            kind, kw = PATHS[k]
            tunnels[k] = stack.enter_context(open_tunnel(kind, [echo], **kw))  # type: ignore[arg-type]
        for k in paths:  # warm up (imports, first session paths, caches)
            for _ in range(50):
                dial_once(tunnels[k].ports[0])
        for rnd in range(args.repeat):
            for k in paths if rnd % 2 == 0 else paths[::-1]:
                port = tunnels[k].ports[0]
                # ssh: the forwarding runs in a per-session sshd child, not counted.
                pids = [] if k == "ssh" else list(tunnels[k].pids.values())
                cpu0 = sum(cpu_seconds(pid) for pid in pids)
                t0 = time.perf_counter()
                ms = [dial_once(port) * 1e3 for _ in range(args.count)]
                samples[k].append(ms)
                if pids:
                    used = sum(cpu_seconds(pid) for pid in pids) - cpu0
                    cpu_us[k].append(used / args.count * 1e6)
                log(f"round {rnd + 1} {k:14s} p50 {percentile(ms, 50):.3f} ms "
                    f"p99 {percentile(ms, 99):.3f} ms ({time.perf_counter() - t0:.1f} s)")
                tunnels[k].check_alive()
    results: dict[str, object] = {}
    p50 = {k: [percentile(r, 50) for r in v] for k, v in samples.items()}
    p99 = {k: [percentile(r, 99) for r in v] for k, v in samples.items()}
    rows = []
    for k in paths:
        ratios = {}
        if k in REVDIAL:
            for b in BASELINES:
                if b in paths:
                    ratios[b] = {
                        "p50": median([ratio(a, c) for a, c in zip(p50[k], p50[b], strict=True)]),
                        "p99": median([ratio(a, c) for a, c in zip(p99[k], p99[b], strict=True)]),
                    }
        results[k] = {"p50_ms": median(p50[k]), "p99_ms": median(p99[k]),
                      "p50_rounds": p50[k], "p99_rounds": p99[k],
                      "mean_ms": median([sum(r) / len(r) for r in samples[k]]),
                      "cpu_us_per_dial": median(cpu_us[k]) if cpu_us[k] else None,
                      "ratio": ratios}
        rows.append([k, median(p50[k]), median(p99[k]),
                     f"{median(cpu_us[k]):.0f}" if cpu_us[k] else "-",
                     *(f"{ratios[b]['p50']:.2f} / {ratios[b]['p99']:.2f}"
                       if b in ratios else "-" for b in BASELINES)])
    targets: dict[str, object] = {}
    for k in REVDIAL:
        res = results.get(k)
        if isinstance(res, dict):
            targets[f"dial {k} p50 <= 0.4 ms"] = {"value": res["p50_ms"],
                                                  "met": res["p50_ms"] <= 0.4}
            targets[f"dial {k} p99 <= 2 ms"] = {"value": res["p99_ms"],
                                                "met": res["p99_ms"] <= 2.0}
    print(f"dial rate: {args.count} x connect -> 1-byte echo -> close, {args.repeat} rounds, ms")
    print(table(["path", "p50", "p99", "CPU µs/dial",
                 *(f"rd/{b} p50 / p99" for b in BASELINES)], rows, 3))
    for name, t in targets.items():
        assert isinstance(t, dict)
        print(f"  target {name}: {t['value']:.3f} {'MET' if t['met'] else 'MISSED'}")
    for k, why in skipped.items():
        print(f"  skipped {k}: {why}")
    save(args.name, {"args": vars(args),
                      "paths": {k: DESCRIPTIONS.get(k, k) for k in paths},
                      "skipped": skipped, "results": results, "targets": targets})
    return 0


if __name__ == "__main__":
    sys.exit(main())
