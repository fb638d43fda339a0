"""Bulk throughput: iperf3 through ``revdial server --forward`` versus plain loopback.

Runs A (plain) and B (tunnel) interleaved, ``--repeat`` times each, and reports
medians and the ratio B/A. Needs Debian's ``iperf3``.

    python -m benchmarks.iperf [--seconds 5] [--repeat 3] [--parallel 1] [--reverse]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

from ._util import free_port, median, revdial_cmd, running, save, wait_listening, wait_output


def iperf(port: int, seconds: float, parallel: int, reverse: bool) -> float:
    cmd = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J",
           "-P", str(parallel)]
    if reverse:
        cmd.append("-R")
    out = subprocess.run(cmd, capture_output=True, check=False, timeout=seconds + 30)
    if out.returncode != 0 or not out.stdout:
        raise RuntimeError(f"iperf3 failed: {out.stdout[-500:]!r} {out.stderr[-500:]!r}")
    try:
        result = json.loads(out.stdout)
    except ValueError:
        raise RuntimeError(f"iperf3 printed no JSON: {out.stdout[:300]!r}") from None
    if "error" in result:
        raise RuntimeError(f"iperf3: {result['error']}")
    return float(result["end"]["sum_received"]["bits_per_second"]) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--reverse", action="store_true", help="agent -> server direction")
    args = parser.parse_args(argv)
    if shutil.which("iperf3") is None:
        print("iperf3 is not installed (apt-get install iperf3)", file=sys.stderr)
        return 2
    target, listen, fwd = free_port(), free_port(), free_port()
    token = "bench-token"
    with running(["iperf3", "-s", "-p", str(target)]), running(
        revdial_cmd("server", "--listen", f"127.0.0.1:{listen}", "--token", token,
                    "--forward", f"127.0.0.1:{fwd}=bench/127.0.0.1:{target}", log_level="info")
    ) as server, running(
        revdial_cmd("agent", "--server", f"ws://127.0.0.1:{listen}/connect", "--id", "bench",
                    "--token", token, "--allow", f"127.0.0.1:{target}")
    ):
        wait_listening(target)
        wait_output(server, "client 'bench' connected")
        wait_listening(fwd)
        plain: list[float] = []
        tunnel: list[float] = []
        for _ in range(args.repeat):
            plain.append(iperf(target, args.seconds, args.parallel, args.reverse))
            tunnel.append(iperf(fwd, args.seconds, args.parallel, args.reverse))
    direction = "rev (agent->server)" if args.reverse else "fwd (server->agent)"
    a, b = median(plain), median(tunnel)
    print(f"iperf3 {direction}, -P {args.parallel}, {args.seconds:g} s x {args.repeat}")
    print(f"  plain loopback : {a:7.2f} Gbit/s  (runs: {', '.join(f'{x:.2f}' for x in plain)})")
    print(f"  revdial forward: {b:7.2f} Gbit/s  (runs: {', '.join(f'{x:.2f}' for x in tunnel)})")
    print(f"  ratio          : {b / a:.3f}")
    save(
        f"iperf-{'rev' if args.reverse else 'fwd'}-P{args.parallel}",
        {"plain_gbps": plain, "tunnel_gbps": tunnel, "ratio": b / a, "args": vars(args)},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
