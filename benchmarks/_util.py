"""Shared helpers: free ports, subprocess management, medians."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 10.0) -> None:
    """Wait until something listens on ``port`` (without connecting to it,
    which would disturb one-client servers such as ``iperf3 -s``)."""
    deadline = time.monotonic() + timeout
    needle = f":{port:04X} "
    while True:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError), open(table) as f:
                for line in f:
                    fields = line.split()
                    listening = len(fields) > 3 and fields[3] == "0A"
                    if listening and fields[1].endswith(needle.strip()):
                        return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on port {port}")
        time.sleep(0.05)


def wait_output(proc: subprocess.Popen[bytes], text: str, timeout: float = 10.0) -> None:
    """Read ``proc``'s stderr until a line contains ``text``."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if text in line.decode(errors="replace"):
            return
    raise TimeoutError(f"{proc.args!r} did not print {text!r}")


@contextlib.contextmanager
def running(
    cmd: Sequence[str], *, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` for the duration of the block; terminate it afterwards."""
    proc = subprocess.Popen(
        list(cmd),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def revdial_cmd(*args: str, log_level: str = "warning") -> list[str]:
    return [sys.executable, "-m", "revdial", "--log-level", log_level, *args]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def machine() -> dict[str, object]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "iperf3": shutil.which("iperf3") is not None,
    }


def save(name: str, data: dict[str, object]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    return path
