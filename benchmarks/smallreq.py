"""Small keep-alive HTTP requests through each path, driven by ``wrk`` against ``nginx``.

The workload the project exists for (Kubernetes API traffic) is many small
requests on kept-alive connections. Load generator and upstream are in C (Debian
``wrk`` and ``nginx-light``), so the two cores go to the code under test; a
Python load generator would compete with it and hide its cost.

Upstream: nginx with a private configuration on loopback (one worker, no
access log) answering ``GET /version`` with a 250-byte JSON body. Paths, all up
for the whole run, rounds interleaved (A B C D, then D C B A, ...):

* ``direct``: wrk -> nginx;
* ``relay``: wrk -> the bare trio TCP relay (one process) -> nginx;
* ``revdial``: wrk -> ``revdial server --forward`` -> tunnel -> ``revdial agent`` -> nginx;
* ``frontdoor``: wrk -> ``revdial server --http-listen`` (front door, plain HTTP, a
  user token) -> tunnel -> the agent's h11 reverse proxy (``--upstream``) -> nginx;
* ``revdial-tls``: ``revdial`` with the WebSocket under TLS (``wss://``);
* ``revdial-base`` / ``frontdoor-base`` / ``revdial-tls-base``: the same through
  an older checkout's CLI (``REVDIAL_BASE_SRC=<checkout>/src``), for A/B in one run.

Each figure is the median over ``--repeat`` rounds; each ratio is the median of
the per-round ratios to ``relay`` (the trio floor for a byte pump). Also the
CPU (user + system) each path's processes spent per request.

    python -m benchmarks.smallreq [--seconds 5] [--repeat 3] [--connections 50]
        [--paths direct relay revdial frontdoor]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ._tunnels import Tunnel, base_env, open_tunnel
from ._util import (
    LOOPBACK,
    Proc,
    cpu_seconds,
    free_ports,
    log,
    median,
    ratio,
    revdial_cmd,
    save,
    table,
    wait_listening,
)

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
BODY = ('{"major":"1","minor":"30","gitVersion":"v1.30.0-bench","gitCommit":'
        '"0000000000000000000000000000000000000000","gitTreeState":"clean",'
        '"buildDate":"2024-01-01T00:00:00Z","goVersion":"go1.22","compiler":"gc",'
        '"platform":"linux/amd64","padding":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}')
KEY = "bench"
ALL_PATHS = ["direct", "relay", "revdial", "frontdoor"]


def unavailable() -> str | None:
    for tool, package in ((NGINX, "nginx-light"), (WRK, "wrk")):
        if not Path(tool).exists():
            return f"{tool} not found (apt-get install -y {package})"
    return None


@contextlib.contextmanager
def nginx(port: int) -> Iterator[Proc]:
    """nginx on 127.0.0.1:``port``, private prefix and config, one worker, stopped by PID."""
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp:
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path {tmp};
    proxy_temp_path {tmp};
    fastcgi_temp_path {tmp};
    uwsgi_temp_path {tmp};
    scgi_temp_path {tmp};
    server {{
        listen {LOOPBACK}:{port};
        location / {{
            default_type application/json;
            return 200 '{BODY}';
        }}
    }}
}}
""")
        proc = Proc([NGINX, "-p", tmp, "-c", str(conf)])
        try:
            wait_listening(port)
            yield proc
        finally:
            proc.stop()


@contextlib.contextmanager
def front_door(upstream: int, *, env: dict[str, str] | None = None) -> Iterator[tuple[Tunnel, str]]:
    """``revdial server --http-listen`` + ``revdial agent --upstream``; (tunnel, user token)."""
    ws_port, http_port = free_ports(2)
    token = secrets.token_urlsafe(16)
    user = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="bench-fd-") as tmp, contextlib.ExitStack() as stack:
        users = Path(tmp) / "users"
        users.write_text(f"{user} {KEY}\n")
        penv = {**(env or {}), "REVDIAL_TOKEN": token}
        server = Proc(revdial_cmd("server", "--listen", f"{LOOPBACK}:{ws_port}",
                                  "--http-listen", f"{LOOPBACK}:{http_port}",
                                  "--user-tokens", str(users), log_level="info"), penv)
        stack.callback(server.stop)
        wait_listening(ws_port)
        agent = Proc(revdial_cmd("agent", "--server", f"ws://{LOOPBACK}:{ws_port}/connect",
                                 "--id", KEY, "--upstream", f"http://{LOOPBACK}:{upstream}"),
                     penv)
        stack.callback(agent.stop)
        server.wait_output(f"client '{KEY}' connected")
        wait_listening(http_port)
        yield Tunnel("frontdoor", [http_port], {"server": server, "agent": agent}), user


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(port: int, target: str, *, seconds: float, connections: int,
        headers: list[str]) -> dict[str, float]:
    """One wrk run: requests/s and latency percentiles (ms); fails on any non-2xx answer."""
    cmd = [WRK, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
           *[a for h in headers for a in ("-H", h)], f"http://{LOOPBACK}:{port}{target}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)
    text = out.stdout
    if out.returncode != 0 or "Requests/sec" not in text:
        raise RuntimeError(f"wrk failed ({out.returncode}): {text[-500:]} {out.stderr[-300:]}")
    if "Non-2xx" in text or "Socket errors" in text:
        raise RuntimeError(f"wrk saw errors through port {port}: {text[-600:]}")
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)\b", text, re.M)
        result[f"p{pct}_ms"] = float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--paths", nargs="+", default=ALL_PATHS,
                        choices=[*ALL_PATHS, "revdial-base", "frontdoor-base", "revdial-tls",
                                 "revdial-tls-base"])
    parser.add_argument("--name", default="smallreq")
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason:
        log(f"smallreq: {reason}")
        return 2

    (upstream,) = free_ports(1)
    tunnels: dict[str, tuple[int, dict[str, int], list[str]]] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(nginx(upstream))
        for path in args.paths:
            if path == "direct":
                tunnels[path] = (upstream, {}, [])
            elif path in ("relay", "revdial", "revdial-base", "revdial-tls", "revdial-tls-base"):
                tunnel = stack.enter_context(open_tunnel(path, [upstream]))
                tunnels[path] = (tunnel.ports[0], tunnel.pids, [])
            else:
                env = base_env() if path == "frontdoor-base" else None
                tunnel, user = stack.enter_context(front_door(upstream, env=env))
                tunnels[path] = (tunnel.ports[0], tunnel.pids, [f"Authorization: Bearer {user}"])
        # Warm every path once (connections, pools, caches), then measure.
        for path, (port, _, headers) in tunnels.items():
            target = f"/k8s/clusters/{KEY}/version" if path.startswith("frontdoor") else "/version"
            wrk(port, target, seconds=1, connections=args.connections, headers=headers)
        runs: dict[str, list[dict[str, float]]] = {p: [] for p in tunnels}
        for i in range(args.repeat):
            order = list(tunnels) if i % 2 == 0 else list(reversed(tunnels))
            for path in order:
                port, pids, headers = tunnels[path]
                target = (f"/k8s/clusters/{KEY}/version" if path.startswith("frontdoor")
                          else "/version")
                before = {role: cpu_seconds(pid) for role, pid in pids.items()}
                result = wrk(port, target, seconds=args.seconds, connections=args.connections,
                             headers=headers)
                requests = result["rps"] * args.seconds
                for role, pid in pids.items():
                    result[f"cpu_us_{role}"] = (cpu_seconds(pid) - before[role]) / requests * 1e6
                runs[path].append(result)
                log(f"round {i + 1}/{args.repeat} {path:14} {result['rps']:9.0f} req/s  "
                    f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms")

    rows = []
    summary: dict[str, dict[str, float]] = {}
    for path, results in runs.items():
        rel = [ratio(r["rps"], runs["relay"][k]["rps"]) for k, r in enumerate(results)] \
            if "relay" in runs else []
        cpu = {key: median([r[key] for r in results])
               for key in results[0] if key.startswith("cpu_us_")}
        summary[path] = {
            "rps": median([r["rps"] for r in results]),
            "p50_ms": median([r["p50_ms"] for r in results]),
            "p99_ms": median([r["p99_ms"] for r in results]),
            "ratio_to_relay": median(rel) if rel else float("nan"),
            **cpu,
        }
        rows.append([path, summary[path]["rps"], summary[path]["ratio_to_relay"],
                     summary[path]["p50_ms"], summary[path]["p99_ms"],
                     " + ".join(f"{v:.0f}" for v in cpu.values()) or "-"])
    print(f"small GET (250-byte body) from nginx, wrk -t1 -c{args.connections}, "
          f"{args.seconds:g} s x {args.repeat} rounds, interleaved (medians)")
    print(table(["path", "req/s", "x relay", "p50 ms", "p99 ms", "CPU µs/req (per process)"],
                rows))
    out = save(args.name, {"seconds": args.seconds, "repeat": args.repeat,
                           "connections": args.connections, "runs": runs, "summary": summary})
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
