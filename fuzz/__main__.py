"""Run every fuzz campaign, sharing a time budget: ``python -m fuzz --seconds N``.

Each campaign gets an equal share of ``N`` seconds and prints one line,
``NAME: N inputs in S s, F failures`` (and its reproducer on a failure). The
exit status is 1 if any campaign failed. ``--only NAME ...`` runs a subset;
``--seed`` fixes the base seed of every campaign (default: random).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fuzz import main as run_campaign

CAMPAIGNS = ("fuzz_frames", "fuzz_state", "fuzz_proxy", "fuzz_cli")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="total budget")
    parser.add_argument("--only", nargs="+", choices=CAMPAIGNS, default=list(CAMPAIGNS))
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    share = args.seconds / len(args.only)
    failed = []
    for name in args.only:
        module = importlib.import_module(f"fuzz.{name}")
        extra = ["--seed", str(args.seed)] if args.seed is not None else []
        if run_campaign(name, module.build, ["--seconds", f"{share:g}", *extra]) != 0:
            failed.append(name)
    if failed:
        print(f"fuzz: {len(failed)} campaign(s) failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
