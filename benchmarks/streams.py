"""Stream count: N idle streams held on one session; memory per stream on each
side (VmRSS delta / N) and the time to open them.

revdial: ``benchmarks.streams_server`` runs the server in-process, starts the
``revdial agent`` CLI, and dials N streams through ``server.dial`` (at most
``--concurrency`` dials in flight) to an echo server in a third process; the
agent holds one TCP connection and its splice per stream. Baseline: the bare
trio TCP relay holding N connections (client sockets in this process, echo
server behind it) -- one process, both directions, so compare it with each
revdial side and with their sum. Fresh processes for every run; rounds
interleave relay and revdial. OpenSSH is left out (67 KiB and ~70 s per 5,000
connections in PERFORMANCE.md).

File descriptors: the agent holds one socket per stream and the relay two per
connection, and RLIMIT_NOFILE's hard limit may be below that (20,000 on the
reference machine, and raising it needs CAP_SYS_RESOURCE). Counts the agent
cannot hold as sockets run with the library agent dialling in-memory echo
streams (``--virtual``: same session, handler, splice and stream objects, no
socket), and the relay baseline is measured at the largest count that fits and
reported per connection. Both are marked in the output.

    python -m benchmarks.streams [--counts 1000 10000 50000] [--repeat 3]
                                 [--repeat-largest 1] [--concurrency 100]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import time

from ._util import (
    LOOPBACK,
    fd_count,
    free_ports,
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

PER_PORT = 10_000  # connections per destination port (the ephemeral range holds ~28k)


def run_revdial(n: int, concurrency: int, virtual: bool) -> dict[str, object]:
    ports = free_ports(n // PER_PORT + 1)
    with running(module_cmd("benchmarks.baselines", "echo",
                            *(a for p in ports for a in ("--port", str(p))))):
        for p in ports:
            wait_listening(p)
        cmd = module_cmd("benchmarks.streams_server", "--n", str(n), "--concurrency",
                         str(concurrency), *(a for p in ports for a in ("--target", str(p))),
                         *(["--virtual"] if virtual else []))
        out = subprocess.run(cmd, capture_output=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"streams_server failed: {out.stderr.decode()[-2000:]}")
    result: dict[str, object] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result


def run_relay(n: int) -> dict[str, object]:
    targets = free_ports(n // PER_PORT + 1)
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(module_cmd(
            "benchmarks.baselines", "echo", *(a for p in targets for a in ("--port", str(p))))))
        for p in targets:
            wait_listening(p)
        listens = free_ports(len(targets))
        relay = stack.enter_context(running(module_cmd(
            "benchmarks.baselines", "relay",
            *(a for lp, tp in zip(listens, targets, strict=True)
              for a in ("--forward", f"{lp}={LOOPBACK}:{tp}")))))
        for p in listens:
            wait_listening(p)
        time.sleep(1.0)
        before = rss_kib(relay.pid)
        fds0 = fd_count(relay.pid)
        socks: list[socket.socket] = []

        def close_all() -> None:
            for s in socks:
                s.close()

        stack.callback(close_all)
        t0 = time.perf_counter()
        for i in range(n):
            socks.append(socket.create_connection((LOOPBACK, listens[i % len(listens)])))
        deadline = time.monotonic() + 120
        while fd_count(relay.pid) - fds0 < 2 * n:  # accepted and dialled the target
            if time.monotonic() > deadline:
                raise RuntimeError("relay did not open all connections")
            time.sleep(0.01)
        open_s = time.perf_counter() - t0
        time.sleep(1.0)
        after = rss_kib(relay.pid)
        checked = 0
        for s in socks[:: max(1, n // 20)]:
            s.sendall(b"x")
            if s.recv(1) == b"x":
                checked += 1
        return {"n": n, "opened": n, "open_s": open_s, "rss_before_kib": before,
                "rss_after_kib": after, "kib_per_stream": (after - before) / n,
                "echo_checked": checked}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10_000, 50_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--repeat-largest", type=int, default=1,
                        help="rounds for the largest count (default 1: it is slow)")
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args(argv)
    limit = raise_nofile(3 * max(args.counts) + 1000)
    relay_cap = (limit - 200) // 2
    results: dict[str, object] = {}
    rows = []
    largest = max(args.counts)
    for n in args.counts:
        rounds = args.repeat_largest if n == largest and len(args.counts) > 1 else args.repeat
        rev: list[dict[str, object]] = []
        rel: list[dict[str, object]] = []
        virtual = n + 200 > limit
        relay_n = min(n, relay_cap)
        for rnd in range(rounds):
            for kind in ("relay", "revdial") if rnd % 2 == 0 else ("revdial", "relay"):
                r = (run_relay(relay_n) if kind == "relay"
                     else run_revdial(n, args.concurrency, virtual))
                (rel if kind == "relay" else rev).append(r)
                log(f"{n} streams round {rnd + 1} {kind}: {json.dumps(r)}")

        def per(runs: list[dict[str, object]], side: str | None = None) -> list[float]:
            vals = []
            for r in runs:
                v = r["kib_per_stream"]
                vals.append(float(v[side]) if isinstance(v, dict) and side else float(v))  # type: ignore[arg-type]
            return vals

        srv, agt, rly = per(rev, "server"), per(rev, "agent"), per(rel)
        both = [a + b for a, b in zip(srv, agt, strict=True)]
        open_rev = [float(r["open_s"]) for r in rev]  # type: ignore[arg-type]
        open_rel = [float(r["open_s"]) for r in rel]  # type: ignore[arg-type]
        entry = {
            "revdial_runs": rev, "relay_runs": rel,
            "server_kib_per_stream": median(srv), "agent_kib_per_stream": median(agt),
            "revdial_total_kib_per_stream": median(both),
            "relay_kib_per_stream": median(rly),
            "server_over_relay": median([ratio(a, b) for a, b in zip(srv, rly, strict=True)]),
            "agent_over_relay": median([ratio(a, b) for a, b in zip(agt, rly, strict=True)]),
            "total_over_relay": median([ratio(a, b) for a, b in zip(both, rly, strict=True)]),
            "revdial_open_s": median(open_rev), "relay_open_s": median(open_rel),
            "open_over_relay": median([ratio(a, b) for a, b in
                                       zip(open_rev, open_rel, strict=True)]),
            "all_opened": all(r["opened"] == n and r.get("failures", 0) == 0 for r in rev),
            "rounds": rounds,
            "agent_targets": "in-memory echo (library agent)" if virtual else "TCP (CLI agent)",
            "relay_n": relay_n,
        }
        results[str(n)] = entry
        rows.append([n, rounds, "memory" if virtual else "TCP",
                     f"{relay_n}", entry["server_kib_per_stream"], entry["agent_kib_per_stream"],
                     entry["relay_kib_per_stream"], entry["server_over_relay"],
                     entry["agent_over_relay"], entry["revdial_open_s"],
                     entry["relay_open_s"], "yes" if entry["all_opened"] else "NO"])
    targets: dict[str, object] = {}
    if "10000" in results:
        e = results["10000"]
        assert isinstance(e, dict)
        worst = max(e["server_kib_per_stream"], e["agent_kib_per_stream"])
        targets["10k idle streams <= 12 KiB/stream/side"] = {"value": worst,
                                                             "met": worst <= 12.0}
    if "50000" in results:
        e = results["50000"]
        assert isinstance(e, dict)
        targets["50k streams work"] = {"value": float(e["all_opened"]),
                                       "met": bool(e["all_opened"])}
    print(f"idle streams: KiB per stream (VmRSS delta / N), time to open "
          f"(concurrency {args.concurrency})")
    print(f"RLIMIT_NOFILE {limit}: agent targets in memory where N + 200 > {limit}; "
          f"relay measured at <= {relay_cap} connections")
    print(table(["N", "rounds", "targets", "relay N", "server", "agent", "relay", "srv/relay",
                 "agt/relay", "open s", "relay open s", "all ok"], rows))
    for name, t in targets.items():
        assert isinstance(t, dict)
        print(f"  target {name}: {t['value']:.2f} {'MET' if t['met'] else 'MISSED'}")
    save("streams", {"args": vars(args), "results": results, "targets": targets})
    return 0


if __name__ == "__main__":
    sys.exit(main())
