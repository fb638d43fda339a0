"""A fleet of idle agents on one server: memory per session, join time, restarts.

``revdial server --forward`` (the CLI, default limits) and one helper process
running ``--count`` library agents (``revdial.Agent``, each its own client key
``fleet-<i>``, shared token). Agent ``fleet-0`` carries a forward to an echo
target and is connected first; then the other N-1 start at once.

* **server RSS per session**: (median of ``--samples`` VmRSS samples, 0.5 s
  apart, after ``--settle`` seconds with every session up) minus the server's
  RSS before any agent came, divided by N. The helper reports the same for
  itself (the agent side: N sessions in one process).
* **join**: seconds from starting the N-1 agents until every agent has a
  session (the helper polls every 20 ms); meanwhile a probe echoes one byte
  every 20 ms on a connection opened through the forward (and fleet-0's
  session) before, and its worst RTT shows whether the handshakes starve the
  session already up (the helper's own load, 999 agents handshaking in one
  process, is in that figure too).
* **restart** (``--restarts`` rounds, the fleet whole for ``--interval``
  seconds before each): ``kill -9`` the server, leave it down ``--down``
  seconds, start it again on the same ports; seconds from that start
  (including the server's own start-up) until every agent is back *and* the
  forward echoes. Handshakes the
  server refused (503) or that timed out are counted from the agents' logs.

With ``REVDIAL_BASE_SRC=<checkout>/src`` the same runs against an older
checkout (server and helper), path ``revdial-base``.

    python -m benchmarks.sessions [--count 1000] [--restarts 2] [--paths revdial revdial-base]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import socket
import sys
import time
from collections import Counter
from typing import Any

from ._tunnels import base_env
from ._util import (
    LOOPBACK,
    Proc,
    free_ports,
    log,
    median,
    module_cmd,
    raise_nofile,
    revdial_cmd,
    rss_kib,
    save,
    table,
    wait_listening,
)

TOKEN = "bench-token"
ALL_UP = re.compile(r"all up at ([0-9.]+) after ([0-9.]+) s; failures (\{.*\})")


# --- the helper process: N library agents ------------------------------------


class _Failures(logging.Handler):
    """Counts the agents' connection failures by kind instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if not text.startswith("tunnel to"):
            return
        if "HTTP 503" in text:
            self.counts["refused 503"] += 1
        elif "no WebSocket handshake within" in text:
            self.counts["handshake timeout"] += 1
        elif "all attempts to connect" in text or "connection refused" in text.lower():
            self.counts["server down"] += 1
        elif "session" in text:
            self.counts["session lost"] += 1
        else:
            self.counts["other"] += 1


def run_agents(url: str, count: int, allow: str) -> None:
    import trio

    import revdial

    failures = _Failures()
    root = logging.getLogger("revdial")
    root.setLevel(logging.WARNING)
    root.addHandler(failures)
    root.propagate = False

    def make(i: int) -> revdial.Agent:
        return revdial.Agent(
            url,
            headers={"X-Tunnel-ID": f"fleet-{i}", "Authorization": f"Bearer {TOKEN}"},
            allow=[allow] if i == 0 else None,
        )

    async def main() -> None:
        agents = [make(i) for i in range(count)]
        await trio.sleep(0.5)
        print(f"base rss {rss_kib()}", file=sys.stderr, flush=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(agents[0].run)
            # The driver opens its probe connection through fleet-0 meanwhile.
            await trio.sleep(2.0)
            print("fleet starts", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            for agent in agents[1:]:
                nursery.start_soon(agent.run)
            up = False
            since = t0
            while True:
                n = sum(1 for a in agents if a.session is not None and a.session.is_open)
                now = time.monotonic()
                if n == count and not up:
                    up = True
                    print(f"all up at {now:.3f} after {now - since:.3f} s; failures "
                          f"{json.dumps(dict(failures.counts))}", file=sys.stderr, flush=True)
                elif n < count and up:
                    up = False
                    since = now
                await trio.sleep(0.02)

    trio.run(main)


# --- the driver ----------------------------------------------------------------


def echo_rtt(port: int) -> float | None:
    t0 = time.monotonic()
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1.0) as s:
            s.sendall(b"x")
            if s.recv(1) != b"x":
                return None
    except OSError:
        return None
    return time.monotonic() - t0


def all_up_lines(helper: Proc) -> list[tuple[float, float, dict[str, int]]]:
    out = []
    for m in ALL_UP.finditer(helper.stderr_text()):
        out.append((float(m.group(1)), float(m.group(2)), json.loads(m.group(3))))
    return out


def probe_rtt(sock: socket.socket) -> float:
    """One byte echoed on a connection already open through the forward."""
    t0 = time.monotonic()
    sock.sendall(b"x")
    if sock.recv(1) != b"x":
        raise RuntimeError("probe connection broken")
    return time.monotonic() - t0


def wait_all_up(helper: Proc, after: float, timeout: float,
                probe: socket.socket | None = None) -> tuple[float, dict[str, int], list[float]]:
    """Wait for an "all up" line stamped after ``after``; probe the forward meanwhile."""
    deadline = time.monotonic() + timeout
    rtts: list[float] = []
    while True:
        helper.check_alive()
        for at, _, failures in all_up_lines(helper):
            if at > after:
                return at, failures, rtts
        if time.monotonic() > deadline:
            raise TimeoutError(f"fleet not whole after {timeout:g} s: "
                               f"{helper.stderr_text()[-600:]}")
        if probe is not None:
            rtts.append(probe_rtt(probe))
        time.sleep(0.02)


def wait_forward(port: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while echo_rtt(port) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"forward on {port} not working after {timeout:g} s")
        time.sleep(0.02)
    return time.monotonic()


def rss_median(pid: int, samples: int) -> float:
    values = []
    for _ in range(samples):
        values.append(rss_kib(pid))
        time.sleep(0.5)
    return median(values)


def run_path(path: str, env: dict[str, str] | None, args: argparse.Namespace) -> dict[str, Any]:
    ws_port, fwd_port, echo_port = free_ports(3)
    server_cmd = revdial_cmd(
        "server", "--listen", f"{LOOPBACK}:{ws_port}", "--token", TOKEN,
        "--forward", f"{LOOPBACK}:{fwd_port}=fleet-0/{LOOPBACK}:{echo_port}", log_level="info")
    result: dict[str, Any] = {"count": args.count}
    with contextlib.ExitStack() as stack:
        echo = Proc(module_cmd("benchmarks.baselines", "echo", "--port", str(echo_port)))
        stack.callback(echo.stop)
        wait_listening(echo_port)
        servers = [Proc(server_cmd, env)]
        stack.callback(lambda: servers[-1].stop())  # noqa: PLW0108 (the last one)
        wait_listening(ws_port)
        time.sleep(1.0)
        idle = rss_median(servers[-1].pid, 3)
        helper = Proc(module_cmd(
            "benchmarks.sessions", "agents", "--url", f"ws://{LOOPBACK}:{ws_port}/connect",
            "--count", str(args.count), "--allow", f"{LOOPBACK}:{echo_port}"), env)
        stack.callback(helper.stop)
        helper.wait_output("base rss", timeout=30)
        helper_base = int(re.findall(r"base rss (\d+)", helper.stderr_text())[0])
        wait_forward(fwd_port, 30)
        probe = socket.create_connection((LOOPBACK, fwd_port), timeout=10)
        stack.callback(probe.close)
        probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        idle_rtts = [probe_rtt(probe) for _ in range(20)]
        helper.wait_output("fleet starts", timeout=30)
        at, failures, rtts = wait_all_up(helper, 0.0, 120, probe=probe)
        join = all_up_lines(helper)[0][1]
        log(f"{path}: {args.count} agents joined in {join:.2f} s; failures {failures}; "
            f"probe RTT max {max(rtts, default=0) * 1e3:.1f} ms over {len(rtts)} echoes")
        time.sleep(args.settle)
        srv = rss_median(servers[-1].pid, args.samples)
        agt = rss_median(helper.pid, args.samples)
        result.update({
            "server_idle_kib": idle, "server_kib": srv,
            "server_kib_per_session": (srv - idle) / args.count,
            "helper_base_kib": helper_base, "helper_kib": agt,
            "agent_kib_per_session": (agt - helper_base) / args.count,
            "join_s": join, "join_failures": failures,
            "join_probe_rtt_ms": {"max": max(rtts, default=0) * 1e3,
                                  "median": median(rtts) * 1e3, "n": len(rtts),
                                  "idle_median": median(idle_rtts) * 1e3},
        })
        log(f"{path}: server {(srv - idle) / args.count:.1f} KiB/session, "
            f"agent {(agt - helper_base) / args.count:.1f} KiB/session")
        restarts = []
        for i in range(args.restarts):
            time.sleep(args.interval)
            servers[-1].popen.kill()
            servers[-1].popen.wait()
            log503 = servers[-1].stderr_text().count("-> 503")
            servers[-1].stop()
            time.sleep(args.down)
            start = time.monotonic()
            servers.append(Proc(server_cmd, env))
            at, failures, _ = wait_all_up(helper, start, 120)
            fwd_at = wait_forward(fwd_port, 60)
            whole = max(at, fwd_at) - start
            restarts.append({"whole_s": whole, "all_up_s": at - start,
                             "forward_s": fwd_at - start, "failures_total": failures,
                             "server_503_before": log503})
            log(f"{path} restart {i + 1}: whole again {whole:.2f} s after the restart "
                f"(all up {at - start:.2f} s, forward {fwd_at - start:.2f} s); "
                f"agent failures so far {failures}")
        result["restarts"] = restarts
        result["server_503_last"] = servers[-1].stderr_text().count("-> 503")
        result["server_handshake_timeouts_last"] = servers[-1].stderr_text().count(
            "no WebSocket handshake")
        helper.check_alive()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    agents = sub.add_parser("agents", help="(internal) the helper process")
    agents.add_argument("--url", required=True)
    agents.add_argument("--count", type=int, required=True)
    agents.add_argument("--allow", required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--down", type=float, default=2.0)
    parser.add_argument("--interval", type=float, default=5.0,
                        help="seconds the whole fleet stays up between restarts")
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--paths", nargs="+", default=["revdial"],
                        choices=["revdial", "revdial-base"])
    parser.add_argument("--name", default="sessions")
    args = parser.parse_args(argv)
    if args.cmd == "agents":
        run_agents(args.url, args.count, args.allow)
        return 0
    raise_nofile(2 * args.count + 200)
    results = {}
    for path in args.paths:
        results[path] = run_path(path, base_env() if path == "revdial-base" else None, args)
    rows = []
    for path, r in results.items():
        rows.append([
            path, r["server_kib_per_session"], r["agent_kib_per_session"], r["join_s"],
            r["join_probe_rtt_ms"]["max"],
            " / ".join(f"{x['whole_s']:.2f}" for x in r["restarts"]),
            sum(r["restarts"][-1]["failures_total"].get(k, 0)
                for k in ("refused 503", "handshake timeout")) if r["restarts"] else 0,
        ])
    print(f"{args.count} idle agents (library, one helper process) on the CLI server; "
          "KiB of VmRSS per session; seconds")
    print(table(["path", "server KiB/session", "agent KiB/session", "join s",
                 "probe max ms", "restart: whole again s", "refused/timed out"], rows, 1))
    out = save(args.name, {"args": vars(args), "results": results})
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
