"""Time-boxed fuzz campaigns, driven by hypothesis (no atheris).

Run from the repository root::

    python -m fuzz --seconds 60            # every campaign, sharing the budget
    python -m fuzz.fuzz_frames --seconds 20
    python -m fuzz.fuzz_state --seconds 20 [--seed N]
    python -m fuzz.fuzz_proxy --seconds 20
    python -m fuzz.fuzz_cli --seconds 20

Each fuzzer runs a hypothesis test in rounds (fresh seed per round, no example
database) until the time budget is spent, then prints one line,
``<name>: N inputs in S s, F failures``. On a failure hypothesis shrinks the
input; the minimal reproducer is printed as hex and the exit status is 1.

The invariant is h11's: every input is accepted, or rejected with
:class:`~revdial._errors.FrameError` / :class:`~revdial._errors.ProtocolError`,
nothing else -- and what is accepted keeps the codec's and the session
state's invariants.

Seeds come from the Go-recorded vectors in ``tests/vectors/`` (part of the
repository; ``tests/vectors/README.md`` says where they come from).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("revdial") is None:  # running from a checkout
    sys.path.insert(0, str(REPO / "src"))

__all__ = [
    "Failure",
    "FuzzRun",
    "fuzz_settings",
    "main",
    "mutated",
    "seed_messages",
]

DEFAULT_SECONDS = 20.0


VECTORS = REPO / "tests" / "vectors"


def seed_messages() -> list[bytes]:
    """Every recorded WebSocket message: encode/decode vectors and transcripts.

    Raises ``FileNotFoundError`` with a clear message if the vectors are absent.
    """
    vectors = VECTORS
    if not vectors.is_dir():
        raise FileNotFoundError(f"remotedialer vectors not found in {vectors}")
    frames: dict[str, Any] = json.loads((vectors / "remotedialer-frames.json").read_text())
    session: dict[str, Any] = json.loads((vectors / "remotedialer-session.json").read_text())
    out = [bytes.fromhex(v["encoded_hex"]) for v in frames["encode_vectors"]]
    out += [bytes.fromhex(v["input_hex"]) for v in frames["decode_vectors"]]
    for v in frames["decode_vectors"]:
        for role in ("client_session", "server_session"):
            out += [bytes.fromhex(m["hex"]) for m in v[role]["messages_written_back"]]
    for scenario in [session["transcript"], *session["extra_scenarios"]]:
        out += [bytes.fromhex(e["hex"]) for e in scenario["events"] if e["kind"] == "message"]
    return sorted(set(out))


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed message with a few byte-level mutations (AFL-style, but shrinkable)."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "splice"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and pos < len(data):
            data[pos] = draw(st.sampled_from([0x00, 0x01, 0x2F, 0x7F, 0x80, 0xFF]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=12))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
        elif op == "splice":
            other = draw(st.sampled_from(seeds))
            data[pos:] = other[draw(st.integers(0, len(other))) :]
    return bytes(data)


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=False,
        report_multiple_bugs=False,
        phases=[Phase.generate, Phase.target, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


@dataclass
class Failure:
    """The last failing input seen (after shrinking: the minimal one)."""

    reproducer: str
    error: str


@dataclass
class FuzzRun:
    """Counts inputs and remembers the last failure while hypothesis runs."""

    inputs: int = 0
    failures: list[Failure] = field(default_factory=list)

    def record(self, reproducer: Callable[[], str], check: Callable[[], None]) -> None:
        """Run ``check``; on any exception remember the input and re-raise."""
        self.inputs += 1
        try:
            check()
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            error = f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})"
            self.failures.append(Failure(reproducer(), error))
            raise


def main(
    name: str,
    build: Callable[[FuzzRun], Callable[[], None]],
    argv: list[str] | None = None,
) -> int:
    """Parse ``--seconds``/``--seed``, run rounds of ``build(run)()``, report."""
    parser = argparse.ArgumentParser(prog=f"python -m fuzz.{name}", description=__doc__)
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS)
    parser.add_argument("--seed", type=int, default=None, help="base seed (default: random)")
    args = parser.parse_args(argv)
    base_seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)

    run = FuzzRun()
    test = build(run)
    start = time.monotonic()
    deadline = start + args.seconds
    round_no = 0
    error: BaseException | None = None
    while time.monotonic() < deadline:
        seeded = _with_seed(test, base_seed + round_no)
        round_no += 1
        try:
            seeded()
        except Exception as exc:  # the failure is in run.failures
            error = exc
            break
    elapsed = time.monotonic() - start
    failures = 1 if error is not None else 0
    print(f"{name}: {run.inputs} inputs in {elapsed:.1f} s, {failures} failures", flush=True)
    if error is None:
        return 0
    last = run.failures[-1] if run.failures else Failure("(unknown)", repr(error))
    print(f"{name}: FAILED (base seed {base_seed}, round {round_no - 1}): {last.error}")
    print(f"{name}: reproducer: {last.reproducer}")
    return 1


def _with_seed(test: Callable[[], None], value: int) -> Callable[[], None]:
    seeded: Callable[[], None] = seed(value)(test)
    return seeded
