"""Memory under sustained bulk: VmRSS of the server and agent processes sampled
every second during one long iperf3 run (``--seconds``, 15 s by default; 60 s
with ``--long``), per direction. Reported: idle RSS before the run, then over
the samples after a ``--warmup`` (the first seconds, while buffers are first
allocated): min, median, max, and the spread max/median and min/median; the
target is flat within +-10 % of the median. The bare trio-websocket pipe runs
the same way, interleaved, as the reference.

    python -m benchmarks.memory [--long | --seconds 15] [--warmup 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from typing import Any

from ._tunnels import open_tunnel
from ._util import (
    LOOPBACK,
    free_port,
    have_iperf3,
    log,
    median,
    rss_kib,
    running,
    save,
    table,
    wait_listening,
)

PATHS = ["revdial", "wspipe"]


def sample_run(port: int, pids: dict[str, int], seconds: float,
               reverse: bool) -> tuple[dict[str, list[int]], float]:
    samples: dict[str, list[int]] = {role: [] for role in pids}
    cmd = ["iperf3", "-c", LOOPBACK, "-p", str(port), "-t", f"{seconds:g}", "-J",
           *(["-R"] if reverse else [])]
    bulk = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        n = 1
        while bulk.poll() is None:
            time.sleep(max(0.0, t0 + n - time.monotonic()))
            n += 1
            if bulk.poll() is not None:
                break
            for role, pid in pids.items():
                samples[role].append(rss_kib(pid))
        out, err = bulk.communicate(timeout=30)
    finally:
        if bulk.poll() is None:
            bulk.kill()
            bulk.wait()
    result = json.loads(out or b"{}")
    if "end" not in result:
        raise RuntimeError(f"iperf3: {result.get('error')} {err[-300:]!r}")
    return samples, float(result["end"]["sum_received"]["bits_per_second"]) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--long", action="store_true", help="60 s runs (the issue's setting)")
    parser.add_argument("--warmup", type=int, default=3, help="samples to skip")
    parser.add_argument("--direction", nargs="+", choices=["fwd", "rev"], default=["fwd", "rev"])
    args = parser.parse_args(argv)
    if args.long:
        args.seconds = 60.0
    if not have_iperf3():
        print("iperf3 is not installed (apt-get install iperf3)", file=sys.stderr)
        return 2
    results: dict[str, object] = {}
    rows = []
    target = free_port()
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(["iperf3", "-s", "-p", str(target), "-B", LOOPBACK]))
        wait_listening(target)
        tunnels = {k: stack.enter_context(open_tunnel(k, [target])) for k in PATHS}
        time.sleep(1.0)
        for d in args.direction:
            for k in PATHS:
                t = tunnels[k]
                idle = {role: rss_kib(pid) for role, pid in t.pids.items()}
                samples, gbps = sample_run(t.ports[0], t.pids, args.seconds, d == "rev")
                t.check_alive()
                for role, vals in samples.items():
                    steady = vals[args.warmup:] or vals
                    med = median(steady)
                    entry: dict[str, Any] = {
                        "idle_kib": idle[role], "samples_kib": vals,
                        "min_kib": min(steady), "median_kib": med, "max_kib": max(steady),
                        "max_over_median": max(steady) / med, "min_over_median": min(steady) / med,
                        "bulk_gbps": gbps,
                    }
                    entry["flat"] = (entry["max_over_median"] <= 1.10
                                     and entry["min_over_median"] >= 0.90)
                    results[f"{d}-{k}-{role}"] = entry
                    rows.append([d, k, role, idle[role] / 1024, min(steady) / 1024,
                                 med / 1024, max(steady) / 1024, entry["max_over_median"],
                                 entry["min_over_median"], gbps])
                    log(f"{d} {k} {role}: idle {idle[role]} KiB, steady {min(steady)}.."
                        f"{max(steady)} KiB, {gbps:.2f} Gbit/s")
    targets: dict[str, object] = {}
    for d in args.direction:
        for role in ("server", "agent"):
            e = results.get(f"{d}-revdial-{role}")
            if isinstance(e, dict):
                worst = max(e["max_over_median"] - 1, 1 - e["min_over_median"])
                targets[f"memory {d} {role} RSS flat +-10% over {args.seconds:g} s"] = {
                    "value": worst, "met": bool(e["flat"])}
    print(f"RSS during a {args.seconds:g} s iperf3 run (1 s samples, first {args.warmup} "
          f"skipped), MiB")
    print(table(["dir", "path", "side", "idle", "min", "median", "max", "max/med", "min/med",
                 "Gbit/s"], rows))
    for name, tgt in targets.items():
        assert isinstance(tgt, dict)
        print(f"  target {name}: {100 * tgt['value']:.1f} % {'MET' if tgt['met'] else 'MISSED'}")
    save("memory", {"args": vars(args), "results": results, "targets": targets})
    return 0


if __name__ == "__main__":
    sys.exit(main())
