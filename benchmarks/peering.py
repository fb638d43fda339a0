"""A dial through a peer replica against a dial through the agent's own server.

Two ``revdial server`` processes peered with each other (``--peer-id``,
``--peer``), one ``revdial agent`` connected to the first. Each server has a
``--forward`` to an echo server and one to an ``iperf3 -s`` behind the agent:
through server 0 the dial is *direct* (its own agent session), through server
1 it is *forwarded* (``Connect "c1::tcp/..."`` over the peer link, relayed by
server 0 into the agent's session). Interleaved rounds, medians:

* dial latency: connect -> 1-byte echo -> close, p50 and p99 (ms), and the
  extra p50 of the peer hop;
* bulk throughput: ``iperf3 -c`` (Gbit/s) and the ratio peer / direct.

    python -m benchmarks.peering [--count 500] [--seconds 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from ._util import (
    LOOPBACK,
    free_ports,
    have_iperf3,
    iperf,
    log,
    median,
    module_cmd,
    percentile,
    ratio,
    revdial_cmd,
    running,
    save,
    table,
    wait_listening,
)
from .dialrate import dial_once

TOKEN = "bench-agent-token"
PEER_TOKEN = "bench-peer-token"
PATHS = ("direct", "peer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500, help="dials per path per round")
    parser.add_argument("--seconds", type=float, default=3.0, help="iperf3 seconds per run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--name", default="peering", help="results/<name>.json")
    args = parser.parse_args(argv)
    if not have_iperf3():
        print("iperf3 is not installed (apt-get install iperf3)", file=sys.stderr)
        return 1
    echo, target, listen0, listen1, *fwd = free_ports(8)
    forwards = {"direct": {"echo": fwd[0], "iperf": fwd[1]},
                "peer": {"echo": fwd[2], "iperf": fwd[3]}}
    env = {"REVDIAL_TOKEN": TOKEN, "REVDIAL_PEER_TOKEN": PEER_TOKEN}
    url = [f"ws://{LOOPBACK}:{p}/connect" for p in (listen0, listen1)]
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(module_cmd("benchmarks.baselines", "echo", "--port",
                                               str(echo))))
        stack.enter_context(running(["iperf3", "-s", "-p", str(target), "-B", LOOPBACK]))
        wait_listening(echo)
        wait_listening(target)
        for i, name in enumerate(PATHS):
            me, other = (listen0, 1) if i == 0 else (listen1, 0)
            cmd = revdial_cmd("server", "--listen", f"{LOOPBACK}:{me}", "--peer-id", f"s{i}",
                              "--peer", f"s{other}={url[other]}")
            for what, port in (("echo", echo), ("iperf", target)):
                cmd += ["--forward", f"{LOOPBACK}:{forwards[name][what]}=c1/{LOOPBACK}:{port}"]
            stack.enter_context(running(cmd, env=env))
        agent = stack.enter_context(running(revdial_cmd(
            "agent", "--server", url[0], "--id", "c1", "--allow", f"{LOOPBACK}:{echo}",
            "--allow", f"{LOOPBACK}:{target}", log_level="info"), env={"REVDIAL_TOKEN": TOKEN}))
        agent.wait_output("connected to")
        for name in PATHS:  # up, and warm (imports, first session paths)
            for f in forwards[name].values():
                wait_listening(f)
        warm = 0
        while warm < 50:  # the peer learns of the agent shortly after it connects
            try:
                for name in PATHS:
                    dial_once(forwards[name]["echo"])
                warm += 1
            except (OSError, RuntimeError):
                warm = 0
        dial_ms: dict[str, list[list[float]]] = {k: [] for k in PATHS}
        gbps: dict[str, list[float]] = {k: [] for k in PATHS}
        for rnd in range(args.repeat):
            order = PATHS if rnd % 2 == 0 else PATHS[::-1]
            for name in order:
                ms = [dial_once(forwards[name]["echo"]) * 1e3 for _ in range(args.count)]
                dial_ms[name].append(ms)
                log(f"round {rnd + 1} {name:6s} dial p50 {percentile(ms, 50):.3f} ms "
                    f"p99 {percentile(ms, 99):.3f} ms")
            for name in order:
                g = iperf(forwards[name]["iperf"], args.seconds)
                gbps[name].append(g)
                log(f"round {rnd + 1} {name:6s} iperf3 {g:.2f} Gbit/s")
    p50 = {k: [percentile(r, 50) for r in v] for k, v in dial_ms.items()}
    p99 = {k: [percentile(r, 99) for r in v] for k, v in dial_ms.items()}
    extra_p50 = median([a - b for a, b in zip(p50["peer"], p50["direct"], strict=True)])
    tput_ratio = median([ratio(a, b) for a, b in zip(gbps["peer"], gbps["direct"], strict=True)])
    results = {k: {"dial_p50_ms": median(p50[k]), "dial_p99_ms": median(p99[k]),
                   "gbps": median(gbps[k]), "p50_rounds": p50[k], "gbps_rounds": gbps[k]}
               for k in PATHS}
    print(f"peering: {args.count} dials and iperf3 {args.seconds:g} s per path, "
          f"{args.repeat} rounds (medians)")
    print(table(["path", "dial p50 ms", "dial p99 ms", "iperf3 Gbit/s"],
                [[k, median(p50[k]), median(p99[k]), median(gbps[k])] for k in PATHS], 3))
    print(f"  extra dial latency through a peer (p50): {extra_p50:.3f} ms")
    print(f"  throughput through a peer / direct: {tput_ratio:.2f}")
    save(args.name, {"args": vars(args), "results": results,
                     "extra_dial_p50_ms": extra_p50, "throughput_ratio": tput_ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
