"""Throughput by message size: one iperf3 stream through the bare trio relay
(``read_size`` = N), the bare trio-websocket pipe (messages of N, reads of N)
and revdial driven through the library with ``Limits(max_frame_size=N,
read_size=N)``, both directions. Interleaved rounds per size, medians.

    python -m benchmarks.msgsize [--sizes 16 64 256 1024] [--seconds 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from ._tunnels import open_tunnel
from ._util import (
    LOOPBACK,
    KiB,
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

IMPLS = {"relay": "relay", "wspipe": "wspipe", "revdial": "revdial-lib"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024],
                        help="message / frame / read sizes in KiB")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--direction", nargs="+", choices=["fwd", "rev"], default=["fwd", "rev"])
    args = parser.parse_args(argv)
    if not have_iperf3():
        print("iperf3 is not installed (apt-get install iperf3)", file=sys.stderr)
        return 2
    impls = list(IMPLS)
    runs: dict[str, dict[str, dict[str, list[float]]]] = {}
    target = free_port()
    with running(["iperf3", "-s", "-p", str(target), "-B", LOOPBACK]):
        wait_listening(target)
        for size in args.sizes:
            per = runs[str(size)] = {d: {k: [] for k in impls} for d in args.direction}
            with contextlib.ExitStack() as stack:
                tunnels = {k: stack.enter_context(open_tunnel(IMPLS[k], [target],
                                                              msg_size=size * KiB))
                           for k in impls}
                for rnd in range(args.repeat):
                    for d in args.direction:
                        for k in impls if rnd % 2 == 0 else impls[::-1]:
                            tunnels[k].check_alive()
                            g = iperf(tunnels[k].ports[0], args.seconds, 1, d == "rev")
                            per[d][k].append(g)
                            log(f"{size:5d} KiB round {rnd + 1} {d} {k:8s} {g:6.2f} Gbit/s")
    rows = []
    results: dict[str, object] = {}
    for size in args.sizes:
        for d in args.direction:
            r = runs[str(size)][d]
            med = {k: median(v) for k, v in r.items()}
            rv_ws = median([ratio(a, b) for a, b in zip(r["revdial"], r["wspipe"], strict=True)])
            rv_rl = median([ratio(a, b) for a, b in zip(r["revdial"], r["relay"], strict=True)])
            results[f"{size}-{d}"] = {"size_kib": size, "direction": d, "gbps": r,
                                      "median_gbps": med, "revdial_over_wspipe": rv_ws,
                                      "revdial_over_relay": rv_rl}
            rows.append([size, d, med["relay"], med["wspipe"], med["revdial"], rv_rl, rv_ws])
    print(f"throughput by message size, one stream, {args.seconds:g} s x {args.repeat}, Gbit/s")
    print(table(["KiB", "dir", "relay", "wspipe", "revdial", "rd/relay", "rd/wspipe"], rows))
    save("msgsize", {"args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
