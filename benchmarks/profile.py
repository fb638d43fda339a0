"""Where the CPU goes: py-spy samples of a path's processes under a workload.

    python -m benchmarks.profile [--path revdial] [--workload bulk|dial|http]
                                 [--direction fwd|rev] [--seconds 5]

``bulk``: one iperf3 stream; ``dial``: sequential connect -> 1-byte echo -> close;
``http``: small keep-alive GETs (``wrk -c50``, as ``benchmarks.smallreq``) from an
nginx upstream, through ``--path frontdoor`` (front door -> agent proxy) or ``revdial``
(``--forward``); ``frontdoor-base`` profiles ``$REVDIAL_BASE_SRC``'s front door.
Writes py-spy's folded stacks to ``results/profile-<path>-<workload>-<dir>-<role>.txt``
and prints, per process, the hottest functions by own time and by inclusive
time, as a share of the non-idle samples (``epoll_wait`` in trio's run loop is
idle). Needs py-spy (``pip install py-spy``); run as root or with ptrace rights.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import smallreq
from ._tunnels import base_env, open_tunnel
from ._util import (
    LOOPBACK,
    RESULTS_DIR,
    free_port,
    iperf,
    module_cmd,
    running,
    wait_listening,
)
from .dialrate import dial_once

IDLE_LEAVES = ("EpollIOManager.get_events", "_epoll_wait", "select.epoll.poll")


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path(sys.executable).with_name("py-spy")
    return str(candidate) if candidate.exists() else None


def summarize(path: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        if any(frames[-1].startswith(leaf) for leaf in IDLE_LEAVES):
            idle += n
            continue
        own[frames[-1]] += n
        for f in {f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0] + ")"
                  if " (" in f else f for f in frames}:
            incl[f] += n
    busy = max(total - idle, 1)
    lines = [f"{path.name}: {total} samples, {100 * idle / max(total, 1):.0f} % idle "
             f"(epoll wait); shares below are of the {busy} busy samples",
             "  own time:"]
    lines += [f"    {100 * c / busy:5.1f} %  {f}" for f, c in own.most_common(top)]
    lines.append("  inclusive (by function):")
    lines += [f"    {100 * c / busy:5.1f} %  {f}" for f, c in incl.most_common(top)
              if c < busy * 0.995]
    return "\n".join(lines)


_FORWARDER = ("revdial/_proxy.py", "revdial/_frontdoor.py")
#: Layers for ``by_layer``, tried in order: (name, leaf only?, substrings). Only
#: the frames below the innermost forwarder frame count (at the agent the
#: forwarder itself runs under the session's handler task).
LAYERS = (
    ("h11 (parse and write)", False, ("h11/",)),
    ("tunnel (session, WebSocket, their syscalls)", False,
     ("trio_websocket/", "wsproto/", "revdial/_session.py", "revdial/_stream.py",
      "revdial/_frames.py", "revdial/_speedups.py")),
    ("client/upstream socket syscalls", True, ("_nonblocking_helper", "socket.py")),
    ("forwarder + front door code", True, _FORWARDER),
    ("trio (scheduler, cancel scopes, I/O waits)", True, ("trio/", "outcome/")),
)


def by_layer(path: Path) -> str:
    """Busy samples by layer (first match in ``LAYERS``), as shares."""
    counts: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if any(frames[-1].startswith(leaf) for leaf in IDLE_LEAVES):
            continue
        n = int(count)
        busy += n
        inner = [i for i, f in enumerate(frames) if any(k in f for k in _FORWARDER)]
        below = frames[inner[-1]:] if inner else frames
        for name, leaf_only, keys in LAYERS:
            hay = below[-1:] if leaf_only else below
            if any(k in f for f in hay for k in keys):
                counts[name] += n
                break
        else:
            counts["other (stdlib, abc, typing, ...)"] += n
    busy = max(busy, 1)
    return "\n".join([f"{path.name}: by layer, share of {busy} busy samples"] +
                     [f"    {100 * c / busy:5.1f} %  {name}" for name, c in counts.most_common()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", default="revdial",
                        choices=["revdial", "revdial-lib", "wspipe", "relay", "frontdoor",
                                 "frontdoor-base"])
    parser.add_argument("--workload", default="bulk", choices=["bulk", "dial", "http"])
    parser.add_argument("--direction", default="fwd", choices=["fwd", "rev"])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    spy = py_spy()
    if spy is None:
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    RESULTS_DIR.mkdir(exist_ok=True)
    stop = threading.Event()
    errors: list[BaseException] = []
    with contextlib.ExitStack() as stack:
        headers: list[str] = []
        url_path = "/version"
        if args.workload == "http":
            target = free_port()
            stack.enter_context(smallreq.nginx(target))
        elif args.path.startswith("frontdoor"):
            parser.error("--path frontdoor needs --workload http")
        elif args.workload == "bulk":
            target = free_port()
            stack.enter_context(running(["iperf3", "-s", "-p", str(target), "-B", LOOPBACK]))
        else:
            target = free_port()
            stack.enter_context(running(module_cmd("benchmarks.baselines", "echo", "--port",
                                                   str(target))))
        wait_listening(target)
        if args.path.startswith("frontdoor"):
            env = base_env() if args.path == "frontdoor-base" else None
            tunnel, user = stack.enter_context(smallreq.front_door(target, env=env))
            headers = [f"Authorization: Bearer {user}"]
            url_path = f"/k8s/clusters/{smallreq.KEY}/version"
        else:
            tunnel = stack.enter_context(open_tunnel(args.path, [target]))
        port = tunnel.ports[0]

        def workload() -> None:
            try:
                if args.workload == "bulk":
                    iperf(port, args.seconds + 3, 1, args.direction == "rev")
                elif args.workload == "http":
                    smallreq.wrk(port, url_path, seconds=args.seconds + 3, connections=50,
                                 headers=headers)
                else:
                    while not stop.is_set():
                        dial_once(port)
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=workload)
        worker.start()
        time.sleep(1.5)
        outputs = {}
        spies = []
        for role, pid in tunnel.pids.items():
            out = RESULTS_DIR / (f"profile-{args.path}-{args.workload}-{args.direction}-"
                                 f"{role}.txt")
            outputs[role] = out
            spies.append(subprocess.Popen(
                [spy, "record", "-r", str(args.rate), "-d", f"{args.seconds:g}", "-f", "raw",
                 "-o", str(out), "-p", str(pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for s in spies:
            s.wait()
        stop.set()
        worker.join()
    if errors:
        raise errors[0]
    for out in outputs.values():
        if out.exists():
            print(summarize(out, args.top))
            print(by_layer(out))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
