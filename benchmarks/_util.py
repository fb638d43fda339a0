"""Shared helpers: free ports, subprocess management, RSS, percentiles, tables, JSON."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

RESULTS_DIR = Path(__file__).resolve().parent / "results"
KiB = 1024
MiB = 1024 * KiB
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def listening(port: int) -> bool:
    needle = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f:
                fields = line.split()
                if len(fields) > 3 and fields[3] == "0A" and fields[1].endswith(needle):
                    return True
    return False


def wait_listening(port: int, timeout: float = 10.0) -> None:
    """Wait until something listens on ``port`` (without connecting to it,
    which would disturb one-client servers such as ``iperf3 -s``)."""
    deadline = time.monotonic() + timeout
    while not listening(port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on port {port}")
        time.sleep(0.02)


class Proc:
    """A child process whose stderr goes to a temporary file (never a pipe
    that could fill up and block the child during a long run)."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str] | None = None,
                 stdout: int | IO[bytes] | None = subprocess.DEVNULL) -> None:
        self.args = list(cmd)
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.popen = subprocess.Popen(
            self.args, stdout=stdout, stderr=self._err, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        self.pid = self.popen.pid

    def stderr_text(self) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def wait_output(self, text: str, timeout: float = 15.0) -> None:
        """Wait until the child's stderr contains ``text``."""
        deadline = time.monotonic() + timeout
        while text not in self.stderr_text():
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.args!r} exited ({self.popen.returncode}): {self.stderr_text()[-800:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.args!r} did not print {text!r}: {self.stderr_text()[-800:]}"
                )
            time.sleep(0.02)

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(
                f"{self.args!r} exited ({self.popen.returncode}): {self.stderr_text()[-800:]}"
            )

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._err.close()


@contextlib.contextmanager
def running(
    cmd: Sequence[str], *, env: dict[str, str] | None = None
) -> Iterator[Proc]:
    """Run ``cmd`` for the duration of the block; terminate it afterwards."""
    proc = Proc(cmd, env)
    try:
        yield proc
    finally:
        proc.stop()


def revdial_cmd(*args: str, log_level: str = "warning") -> list[str]:
    return [sys.executable, "-m", "revdial", "--log-level", log_level, *args]


def module_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def raise_nofile(n: int) -> int:
    """Raise RLIMIT_NOFILE (soft and, as root, hard) to at least ``n``; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= n:
        return soft
    want_hard = max(hard, n) if hard != resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, want_hard))
    except (ValueError, OSError):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int | None = None) -> int:
    """VmRSS of ``pid`` (default: this process) in KiB."""
    path = f"/proc/{pid or 'self'}/status"
    with open(path) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in {path}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def fmt(x: object, digits: int = 2) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return f"{x:.{digits}f}"
    return str(x)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], digits: int = 2) -> str:
    """A Markdown table (also readable as plain text)."""
    cells = [[fmt(c, digits) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for r in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(lines)


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _tool_version(cmd: Sequence[str]) -> str:
    if shutil.which(cmd[0]) is None and not os.path.exists(cmd[0]):
        return "-"
    try:
        out = subprocess.run(list(cmd), capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "-"
    text = (out.stdout or out.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else "-"


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "-"


def git_state() -> str:
    """Commit of the work tree and whether src/ differs from it (revdial under test)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root,
                               capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "-"
    if head.returncode != 0:
        return "-"
    return head.stdout.strip() + (" + uncommitted src/ changes" if dirty.stdout.strip() else "")


def machine() -> dict[str, object]:
    load: tuple[float, ...] = ()
    with contextlib.suppress(OSError):
        load = os.getloadavg()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in load],
        "packages": {p: _version(p) for p in
                     ("revdial", "trio", "trio-websocket", "wsproto", "websockets")},
        "iperf3": _tool_version(["iperf3", "--version"]),
        "ssh": _tool_version(["ssh", "-V"]),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "revdial_git": git_state(),
    }


def save(name: str, data: dict[str, object]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    return path


def load(name: str) -> dict[str, object] | None:
    path = RESULTS_DIR / f"{name}.json"
    if not path.exists():
        return None
    data: dict[str, object] = json.loads(path.read_text())
    return data


def iperf(port: int, seconds: float, parallel: int = 1, reverse: bool = False,
          *, extra: Sequence[str] = (), retries: int = 2) -> float:
    """Run ``iperf3 -c`` against ``127.0.0.1:port``; return received Gbit/s.

    A failed test (iperf3's server occasionally resets a control connection that
    arrives while the previous test's connections are still being torn down) is
    retried ``retries`` times after a pause, and logged."""
    for attempt in range(retries + 1):
        try:
            return _iperf_once(port, seconds, parallel, reverse, extra)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            if attempt == retries:
                raise
            log(f"iperf3 on port {port} failed ({exc}); retrying")
            time.sleep(1.0)
    raise AssertionError("unreachable")


def _iperf_once(port: int, seconds: float, parallel: int, reverse: bool,
                extra: Sequence[str]) -> float:
    cmd = ["iperf3", "-c", LOOPBACK, "-p", str(port), "-t", f"{seconds:g}", "-J",
           "-P", str(parallel), *extra]
    if reverse:
        cmd.append("-R")
    for attempt in range(40):
        out = subprocess.run(cmd, capture_output=True, check=False, timeout=seconds + 30)
        try:
            result = json.loads(out.stdout)
        except ValueError:
            raise RuntimeError(
                f"iperf3 printed no JSON: {out.stdout[:300]!r} {out.stderr[-300:]!r}"
            ) from None
        # The previous test may still be winding down in the server (through a tunnel
        # its control connection closes a little later): wait and retry.
        if "busy" in str(result.get("error", "")) and attempt < 39:
            time.sleep(0.25)
            continue
        break
    if "error" in result:
        raise RuntimeError(f"iperf3: {result['error']}")
    if out.returncode != 0:
        raise RuntimeError(f"iperf3 failed: {out.stderr[-500:]!r}")
    return float(result["end"]["sum_received"]["bits_per_second"]) / 1e9


def have_iperf3() -> bool:
    return shutil.which("iperf3") is not None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
