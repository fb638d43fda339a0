"""Run every benchmark, then the report and chart (``make bench``).

Quick by default (about 15-20 minutes on 2 cores): iperf3 5 s, message sizes
3 s, fairness 5 s, memory 15 s, streams 1k/10k x 3 and 50k x 1. ``--full`` uses
the issue's settings: iperf3 10 s, memory 60 s (``--long``), 50k x 3. Each
benchmark runs as its own process; one that fails is reported and the rest go
on. ``benchmarks/http_path.py`` is included when it exists, ``smallreq`` when
``wrk`` and ``nginx`` are installed.

    python -m benchmarks.run [--full] [--only iperf dialrate ...] [--skip ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import time

from ._util import module_cmd


def plan(full: bool) -> dict[str, list[str]]:
    steps = {
        "iperf": ["--seconds", "10" if full else "5", "--repeat", "3"],
        "msgsize": ["--seconds", "5" if full else "3", "--repeat", "3"],
        "dialrate": ["--count", "1000", "--repeat", "3"],
        "streams": ["--counts", "1000", "10000", "50000", "--repeat", "3",
                    "--repeat-largest", "3" if full else "1"],
        "fairness": ["--seconds", "10" if full else "5", "--repeat", "3"],
        "memory": ["--long"] if full else ["--seconds", "15"],
        "sessions": ["--count", "1000", "--restarts", "3"],
        "peering": ["--count", "500", "--seconds", "5" if full else "3", "--repeat", "3"],
    }
    if importlib.util.find_spec("benchmarks.http_path") is not None:
        steps["http_path"] = []  # its own defaults
    if shutil.which("wrk") and (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
        steps["smallreq"] = ["--seconds", "5", "--repeat", "3"]
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--only", nargs="+", default=None)
    parser.add_argument("--skip", nargs="+", default=[])
    args = parser.parse_args(argv)
    steps = plan(args.full)
    failed = []
    for name, step_args in steps.items():
        if (args.only and name not in args.only) or name in args.skip:
            continue
        print(f"==> benchmarks.{name} {' '.join(step_args)}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(module_cmd(f"benchmarks.{name}", *step_args), check=False).returncode
        print(f"<== benchmarks.{name}: exit {rc} after {time.monotonic() - t0:.0f} s\n",
              flush=True)
        if rc != 0:
            failed.append(name)
    print("==> benchmarks.report", flush=True)
    subprocess.run(module_cmd("benchmarks.report"), check=False)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
