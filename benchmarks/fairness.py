"""Fairness / latency under load: while one stream runs iperf3 at full speed
through a path, a second stream through the *same* path (same tunnel, same
session) does 1-byte echoes (send, wait for the echo, pause ``--interval``);
p50 / p99 round trip in ms. The same echoes with no bulk running are measured
first in each round ("idle").

Paths: plain loopback, the bare trio relay, the bare trio-websocket pipe (one
WebSocket per connection, so the echo does not share a WebSocket with the bulk
stream), ``ssh -R`` (one multiplexed TCP connection, as revdial) and revdial's
CLI. Bulk directions: ``fwd`` (server -> agent) and ``rev`` (``iperf3 -R``).
Interleaved rounds, medians of per-round percentiles.

    python -m benchmarks.fairness [--seconds 5] [--repeat 3] [--interval 0.001]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import time

from ._tunnels import DESCRIPTIONS, open_tunnel, ssh_unavailable
from ._util import (
    LOOPBACK,
    free_port,
    have_iperf3,
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

ALL_PATHS = ["plain", "relay", "wspipe", "ssh", "revdial"]
BASELINES = ["plain", "relay", "wspipe", "ssh"]
#: Experiments, only with --paths: revdial through the library
#: (benchmarks.revdial_forward) with one of its Limits changed on both sides.
EXPERIMENTS: dict[str, tuple[str, dict[str, object]]] = {
    "revdial-base": ("revdial-base", {}),
    "revdial-lib": ("revdial-lib", {}),
    "revdial-no-lowat": ("revdial-lib", {"limits": {"tcp_notsent_lowat": 0}}),
    "revdial-64k-frames": ("revdial-lib", {"msg_size": 64 * 1024}),
}


def echo_rtts(sock: socket.socket, seconds: float, interval: float) -> list[float]:
    out = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        sock.sendall(b"x")
        if sock.recv(1) != b"x":
            raise RuntimeError("echo stream closed")
        out.append((time.perf_counter() - t0) * 1e3)
        if interval:
            time.sleep(interval)
    return out


def one_round(bulk_port: int, echo_port: int, seconds: float, interval: float,
              reverse: bool, *, bulk_streams: int = 1) -> dict[str, object]:
    sock = socket.create_connection((LOOPBACK, echo_port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        echo_rtts(sock, 0.2, interval)  # warm up
        idle = echo_rtts(sock, 1.0, interval)
        cmd = ["iperf3", "-c", LOOPBACK, "-p", str(bulk_port), "-t", f"{seconds + 1.5:g}",
               "-J", "-P", str(bulk_streams), *(["-R"] if reverse else [])]
        bulk = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            time.sleep(1.0)  # let the bulk stream ramp up
            loaded = echo_rtts(sock, seconds, interval)
            out, err = bulk.communicate(timeout=seconds + 30)
        finally:
            if bulk.poll() is None:
                bulk.kill()
                bulk.wait()
    finally:
        sock.close()
    result = json.loads(out or b"{}")
    if "error" in result or "end" not in result:
        raise RuntimeError(f"iperf3: {result.get('error')} {err[-300:]!r}")
    gbps = float(result["end"]["sum_received"]["bits_per_second"]) / 1e9
    return {"idle_p50": percentile(idle, 50), "idle_p99": percentile(idle, 99),
            "p50": percentile(loaded, 50), "p99": percentile(loaded, 99),
            "samples": len(loaded), "bulk_gbps": gbps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--interval", type=float, default=0.001,
                        help="pause between echoes (s)")
    parser.add_argument("--direction", nargs="+", choices=["fwd", "rev"], default=["fwd", "rev"])
    parser.add_argument("--bulk-streams", type=int, default=1,
                        help="parallel iperf3 streams in the bulk transfer (-P)")
    parser.add_argument("--paths", nargs="+", choices=[*ALL_PATHS, *EXPERIMENTS],
                        default=ALL_PATHS)
    parser.add_argument("--name", default="fairness", help="results/<name>.json")
    args = parser.parse_args(argv)
    if not have_iperf3():
        print("iperf3 is not installed (apt-get install iperf3)", file=sys.stderr)
        return 2
    paths = list(args.paths)
    skipped: dict[str, str] = {}
    if "ssh" in paths and (why := ssh_unavailable()):
        print(f"skipping ssh -R: {why}", file=sys.stderr)
        skipped["ssh"] = why
        paths.remove("ssh")
    runs: dict[str, dict[str, list[dict[str, object]]]] = {
        d: {k: [] for k in paths} for d in args.direction}
    bulk_target, echo_target = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(["iperf3", "-s", "-p", str(bulk_target), "-B", LOOPBACK]))
        stack.enter_context(running(module_cmd("benchmarks.baselines", "echo", "--port",
                                               str(echo_target))))
        wait_listening(bulk_target)
        wait_listening(echo_target)
        tunnels = {}
        for k in paths:
            kind, kw = EXPERIMENTS.get(k, (k, {}))
            tunnels[k] = stack.enter_context(
                open_tunnel(kind, [bulk_target, echo_target], **kw))
        for rnd in range(args.repeat):
            for d in args.direction:
                for k in paths if rnd % 2 == 0 else paths[::-1]:
                    t = tunnels[k]
                    t.check_alive()
                    r = one_round(t.ports[0], t.ports[1], args.seconds, args.interval,
                                  d == "rev", bulk_streams=args.bulk_streams)
                    runs[d][k].append(r)
                    log(f"round {rnd + 1} {d} {k:8s} idle p50/p99 {r['idle_p50']:.3f}/"
                        f"{r['idle_p99']:.3f} ms, loaded {r['p50']:.3f}/{r['p99']:.3f} ms, "
                        f"bulk {r['bulk_gbps']:.2f} Gbit/s")
                    time.sleep(0.5)

    def col(rs: list[dict[str, object]], key: str) -> list[float]:
        return [float(r[key]) for r in rs]  # type: ignore[arg-type]

    results: dict[str, object] = {}
    rows = []
    for d in args.direction:
        for k in paths:
            rs = runs[d][k]
            entry: dict[str, object] = {
                key: median(col(rs, key))
                for key in ("idle_p50", "idle_p99", "p50", "p99", "bulk_gbps")}
            entry["runs"] = rs
            if k == "revdial":
                entry["p99_ratio"] = {
                    b: median([ratio(a, c) for a, c in
                               zip(col(rs, "p99"), col(runs[d][b], "p99"), strict=True)])
                    for b in BASELINES if b in paths}
            results[f"{d}-{k}"] = entry
            rows.append([d, k, entry["idle_p50"], entry["idle_p99"], entry["p50"],
                         entry["p99"], entry["bulk_gbps"]])
    targets: dict[str, object] = {}
    for d in args.direction:
        e = results.get(f"{d}-revdial")
        if isinstance(e, dict):
            targets[f"fairness {d}: echo p99 <= 5 ms under bulk"] = {
                "value": e["p99"], "met": e["p99"] <= 5.0}
    print(f"latency under load: 1-byte echo RTT on a 2nd stream while iperf3 saturates "
          f"the 1st, {args.seconds:g} s x {args.repeat}, ms")
    print(table(["bulk", "path", "idle p50", "idle p99", "p50", "p99", "bulk Gbit/s"], rows, 3))
    for d in args.direction:
        e = results.get(f"{d}-revdial")
        if isinstance(e, dict):
            rr = e["p99_ratio"]
            assert isinstance(rr, dict)
            print(f"  revdial p99 / baseline p99 ({d}): " +
                  ", ".join(f"{b} {v:.2f}" for b, v in rr.items()))
    for name, tgt in targets.items():
        assert isinstance(tgt, dict)
        print(f"  target {name}: {tgt['value']:.3f} {'MET' if tgt['met'] else 'MISSED'}")
    for k, why in skipped.items():
        print(f"  skipped {k}: {why}")
    save(args.name, {"args": vars(args), "paths": {k: DESCRIPTIONS.get(k, k) for k in paths},
                      "skipped": skipped, "results": results, "targets": targets})
    return 0


if __name__ == "__main__":
    sys.exit(main())
