"""Bulk throughput: iperf3 through ``revdial server --forward`` and every baseline.

Paths (see ``benchmarks/_tunnels.py``): plain loopback, the bare trio TCP relay,
the bare trio-websocket pipe, OpenSSH ``ssh -R`` (when sshd is installed) and
revdial's CLI. Directions: ``fwd`` = iperf3 client -> server side -> agent side
(the WebSocket server sends, unmasked), ``rev`` = ``iperf3 -R`` (the agent sends,
masked). All paths stay up for the whole run; every round runs each path once
per configuration (A B C ... then reversed, so no path always goes first), and
the figure is the median over ``--repeat`` rounds. Ratios are medians of the
per-round ratios revdial / baseline.

    python -m benchmarks.iperf [--seconds 5] [--repeat 3] [--parallel 1 8]
                               [--direction fwd rev] [--paths ...]
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from ._tunnels import DESCRIPTIONS, open_tunnel, ssh_unavailable
from ._util import (
    LOOPBACK,
    cpu_seconds,
    free_port,
    have_iperf3,
    iperf,
    log,
    median,
    ratio,
    running,
    save,
    table,
    wait_listening,
)

ALL_PATHS = ["plain", "relay", "wspipe", "ssh", "revdial"]
BASELINES = ["plain", "relay", "wspipe", "ssh"]
#: Experiments, only with --paths: the revdial CLI with glibc's malloc tuned
#: (what PERFORMANCE.md measured for the ws pipe; revdial itself is always
#: measured as shipped, without it).
MALLOC_TUNED = {"MALLOC_MMAP_THRESHOLD_": "4194304", "MALLOC_TRIM_THRESHOLD_": "67108864"}
EXPERIMENTS: dict[str, tuple[str, dict[str, object]]] = {
    "revdial-base": ("revdial-base", {}),
    # The WebSocket under TLS (--tls-cert / wss://), this checkout and the older one.
    "revdial-tls": ("revdial-tls", {}),
    "revdial-tls-base": ("revdial-tls-base", {}),
    "revdial-malloc": ("revdial", {"env": MALLOC_TUNED}),
    "wspipe-malloc": ("wspipe", {"env": MALLOC_TUNED}),
    # revdial through the library (benchmarks.revdial_forward), default Limits
    # or without TCP_NOTSENT_LOWAT on the WebSocket socket.
    "revdial-lib": ("revdial-lib", {}),
    "revdial-no-lowat": ("revdial-lib", {"limits": {"tcp_notsent_lowat": 0}}),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--direction", nargs="+", choices=["fwd", "rev"], default=["fwd", "rev"])
    parser.add_argument("--paths", nargs="+", choices=[*ALL_PATHS, *EXPERIMENTS],
                        default=ALL_PATHS)
    parser.add_argument("--name", default="iperf", help="results/<name>.json")
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
    configs = [(d, p) for p in args.parallel for d in args.direction]
    gbps: dict[str, dict[str, list[float]]] = {f"{d}-P{p}": {k: [] for k in paths}
                                              for d, p in configs}
    cpu: dict[str, dict[str, list[float]]] = {f"{d}-P{p}": {k: [] for k in paths}
                                             for d, p in configs}
    target = free_port()
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(["iperf3", "-s", "-p", str(target), "-B", LOOPBACK]))
        wait_listening(target)
        tunnels = {}
        for k in paths:
            kind, kw = EXPERIMENTS.get(k, (k, {}))
            tunnels[k] = stack.enter_context(open_tunnel(kind, [target], **kw))
        for rnd in range(args.repeat):
            for d, p in configs:
                order = paths if rnd % 2 == 0 else paths[::-1]
                for k in order:
                    t = tunnels[k]
                    t.check_alive()
                    before = sum(cpu_seconds(pid) for pid in t.pids.values())
                    g = iperf(t.ports[0], args.seconds, p, d == "rev")
                    used = sum(cpu_seconds(pid) for pid in t.pids.values()) - before
                    gbps[f"{d}-P{p}"][k].append(g)
                    # CPU seconds of the tunnel processes per GB carried.
                    cpu[f"{d}-P{p}"][k].append(used / (g * args.seconds / 8) if g else 0.0)
                    log(f"round {rnd + 1}/{args.repeat} {d} -P{p} {k:8s} {g:6.2f} Gbit/s")
    results: dict[str, object] = {}
    rows = []
    shown = [k for k in [*ALL_PATHS, *EXPERIMENTS] if k in paths]
    for d, p in configs:
        name = f"{d}-P{p}"
        runs = gbps[name]
        med = {k: median(v) for k, v in runs.items()}
        ratios: dict[str, float] = {}
        if "revdial" in runs:
            for b in BASELINES:
                if b in runs:
                    ratios[b] = median([ratio(r, x) for r, x in
                                        zip(runs["revdial"], runs[b], strict=True)])
        results[name] = {
            "gbps": runs,
            "median_gbps": med,
            "revdial_ratio": ratios,
            "cpu_s_per_gb": {k: median(v) for k, v in cpu[name].items()},
        }
        rows.append([d, p, *(med.get(k, float("nan")) for k in shown),
                     *(ratios.get(b, float("nan")) for b in BASELINES)])
    targets: dict[str, object] = {}
    for d in args.direction:
        one = results.get(f"{d}-P1")
        eight = results.get(f"{d}-P8")
        if isinstance(one, dict) and "wspipe" in one["revdial_ratio"]:
            r = one["revdial_ratio"]["wspipe"]
            targets[f"bulk {d} P1 >= 0.60 x wspipe"] = {"value": r, "met": r >= 0.6}
        if isinstance(one, dict) and isinstance(eight, dict) and "revdial" in one["gbps"]:
            r = median([ratio(a, b) for a, b in zip(eight["gbps"]["revdial"],
                                                      one["gbps"]["revdial"], strict=True)])
            targets[f"bulk {d} P8 >= P1"] = {"value": r, "met": r >= 1.0}
    headers = ["dir", "-P", *shown, *(f"rd/{b}" for b in BASELINES)]
    print(f"iperf3 {args.seconds:g} s x {args.repeat} rounds, Gbit/s (median) and revdial ratios")
    print(table(headers, rows))
    for name, tgt in targets.items():
        assert isinstance(tgt, dict)
        print(f"  target {name}: {tgt['value']:.2f} {'MET' if tgt['met'] else 'MISSED'}")
    for k, why in skipped.items():
        print(f"  skipped {k}: {why}")
    save(args.name, {"args": vars(args), "paths": {k: DESCRIPTIONS.get(k, k) for k in paths},
                   "skipped": skipped, "results": results, "targets": targets})
    return 0


if __name__ == "__main__":
    sys.exit(main())
