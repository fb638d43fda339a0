"""Summary of the latest results: every target met or missed, the tables as
Markdown (``results/summary.md``, pasted into ``benchmarks/README.md``) and the
chart (``results/chart.png``: throughput by message size, latency under load).
The chart needs matplotlib (``pip install -e '.[bench]'``); without it the
chart is skipped with a message.

    python -m benchmarks.report
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

from ._util import RESULTS_DIR, fmt, load, table


def _d(x: object) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def targets() -> list[tuple[str, str, float, bool]]:
    """(benchmark, target, value, met) for every result file present."""
    out = []
    for name in ("iperf", "dialrate", "streams", "fairness", "memory", "http_path"):
        data = load(name)
        if data is None:
            continue
        for target, t in _d(data.get("targets")).items():
            out.append((name, target, float(t["value"]), bool(t["met"])))
    return out


def summary_markdown() -> str:
    parts: list[str] = []
    machine: dict[str, Any] = {}
    if (d := load("iperf")) is not None:
        machine = _d(d.get("machine"))
        paths = ["plain", "relay", "wspipe", "ssh", "revdial"]
        rows = []
        for name, r in _d(d.get("results")).items():
            med, rat = _d(r.get("median_gbps")), _d(r.get("revdial_ratio"))
            cpu = _d(r.get("cpu_s_per_gb"))
            rows.append([name, *(med.get(p, float("nan")) for p in paths),
                         *(rat.get(b, float("nan")) for b in paths[:-1]),
                         cpu.get("revdial", float("nan")), cpu.get("wspipe", float("nan"))])
        args = _d(d.get("args"))
        parts.append(f"### Bulk (iperf3, {args.get('seconds')} s x {args.get('repeat')} "
                     "rounds, Gbit/s, medians; ratios revdial / baseline)\n")
        parts.append(table(["config", *paths, *(f"rd/{b}" for b in paths[:-1]),
                            "rd CPU s/GB", "ws CPU s/GB"], rows))
    if (d := load("msgsize")) is not None:
        rows = []
        for r in _d(d.get("results")).values():
            med = _d(r.get("median_gbps"))
            rows.append([r["size_kib"], r["direction"], med.get("relay"), med.get("wspipe"),
                         med.get("revdial"), r["revdial_over_relay"], r["revdial_over_wspipe"]])
        parts.append("\n### Throughput by message size (one stream, Gbit/s)\n")
        parts.append(table(["KiB", "dir", "relay", "wspipe", "revdial", "rd/relay",
                            "rd/wspipe"], rows))
    if (d := load("dialrate")) is not None:
        rows = []
        base = ["plain", "relay", "ssh"]
        for k, r in _d(d.get("results")).items():
            rat = _d(r.get("ratio"))
            cpu = r.get("cpu_us_per_dial")
            rows.append([k, r["p50_ms"], r["p99_ms"], "-" if cpu is None else f"{cpu:.0f}",
                         *(f"{rat[b]['p50']:.2f} / {rat[b]['p99']:.2f}" if b in rat else "-"
                           for b in base)])
        args = _d(d.get("args"))
        parts.append(f"\n### Dial rate ({args.get('count')} x connect -> 1-byte echo -> "
                     f"close, {args.get('repeat')} rounds, ms)\n")
        parts.append(table(["path", "p50", "p99", "CPU µs/dial",
                            *(f"rd/{b} p50 / p99" for b in base)], rows, 3))
    if (d := load("streams")) is not None:
        rows = []
        for n, e in _d(d.get("results")).items():
            rows.append([n, e["rounds"], e.get("agent_targets", "-"), e["server_kib_per_stream"],
                         e["agent_kib_per_stream"], e["relay_kib_per_stream"],
                         e.get("relay_n", "-"), e["server_over_relay"], e["agent_over_relay"],
                         e["revdial_open_s"], e["relay_open_s"],
                         "yes" if e["all_opened"] else "NO"])
        parts.append("\n### Idle streams (KiB per stream = VmRSS delta / N; open time s)\n")
        parts.append(table(["N", "rounds", "agent targets", "server", "agent", "relay",
                            "relay N", "srv/relay", "agt/relay", "open s", "relay open s",
                            "all ok"], rows))
    if (d := load("fairness")) is not None:
        rows = []
        for key, e in _d(d.get("results")).items():
            dirn, _, path = key.partition("-")
            rat = _d(e.get("p99_ratio"))
            rows.append([dirn, path, e["idle_p50"], e["idle_p99"], e["p50"], e["p99"],
                         e["bulk_gbps"],
                         ", ".join(f"{b} {v:.1f}" for b, v in rat.items()) or "-"])
        args = _d(d.get("args"))
        parts.append(f"\n### Latency under load (1-byte echo RTT on a 2nd stream while iperf3 "
                     f"saturates the 1st; {args.get('seconds')} s x {args.get('repeat')}, ms)\n")
        parts.append(table(["bulk", "path", "idle p50", "idle p99", "p50", "p99",
                            "bulk Gbit/s", "rd p99 / baseline p99"], rows, 3))
    if (d := load("memory")) is not None:
        rows = []
        for key, e in _d(d.get("results")).items():
            dirn, path, role = key.split("-")
            rows.append([dirn, path, role, e["idle_kib"] / 1024, e["min_kib"] / 1024,
                         e["median_kib"] / 1024, e["max_kib"] / 1024, e["max_over_median"],
                         e["min_over_median"], e["bulk_gbps"]])
        args = _d(d.get("args"))
        parts.append(f"\n### RSS during a {args.get('seconds')} s bulk run (MiB)\n")
        parts.append(table(["dir", "path", "side", "idle", "min", "median", "max", "max/med",
                            "min/med", "Gbit/s"], rows))
    if (d := load("http_path")) is not None:
        parts.append("\n### HTTP path (benchmarks/http_path.py: small GETs, requests/s)\n")
        parts.append(table(["clients", "direct req/s", "through revdial req/s", "ratio"],
                           [[d.get("clients"), d.get("direct_median", float("nan")),
                             d.get("path_median", float("nan")), d.get("ratio", float("nan"))]]))
    t = targets()
    if t:
        parts.append("\n### Targets\n")
        parts.append(table(["benchmark", "target", "value", "met"],
                           [[b, n, fmt(v, 3), "MET" if m else "MISSED"] for b, n, v, m in t]))
    head = []
    if machine:
        pk = _d(machine.get("packages"))
        head.append(
            f"Run {machine.get('date')} on {machine.get('nproc')} x {machine.get('cpu')}, "
            f"Linux {machine.get('kernel')}, Python {machine.get('python')}, "
            + ", ".join(f"{k} {v}" for k, v in pk.items())
            + f"; {machine.get('iperf3')}; {machine.get('ssh')}; "
            f"revdial at {machine.get('revdial_git')}; "
            f"load average at start {machine.get('loadavg')}.\n"
        )
    return "\n".join(head + parts) + "\n"


def chart() -> str:
    """Write results/chart.png; return a message."""
    if importlib.util.find_spec("matplotlib") is None:
        return "chart skipped: matplotlib is not installed (pip install -e '.[bench]')"
    mpl: Any = importlib.import_module("matplotlib")
    mpl.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    ms = load("msgsize")
    if ms is not None:
        res = _d(ms.get("results"))
        styles = {"relay": ("tab:gray", "bare trio relay"),
                  "wspipe": ("tab:blue", "bare trio-websocket pipe"),
                  "revdial": ("tab:red", "revdial")}
        for d, ls in (("fwd", "-"), ("rev", "--")):
            entries = sorted((e for e in res.values() if e["direction"] == d),
                             key=lambda e: e["size_kib"])
            if not entries:
                continue
            xs = [e["size_kib"] for e in entries]
            for k, (color, label) in styles.items():
                ax1.plot(xs, [e["median_gbps"][k] for e in entries], ls, marker="o",
                         color=color, label=f"{label} ({d})")
        ax1.set_xscale("log", base=2)
        sizes = sorted({e["size_kib"] for e in res.values()})
        ax1.set_xticks(sizes)
        ax1.set_xticklabels([str(s) for s in sizes])
        ax1.set_xlabel("message / frame / read size (KiB)")
        ax1.set_ylabel("Gbit/s (iperf3, one stream, median)")
        ax1.set_title("Throughput by message size")
        ax1.grid(True, alpha=0.3)
        ax1.legend(fontsize=7)
    else:
        ax1.text(0.5, 0.5, "no msgsize.json", ha="center")
    fa = load("fairness")
    if fa is not None:
        res = _d(fa.get("results"))
        keys = list(res)
        xs = list(range(len(keys)))
        w = 0.2
        for i, (field, label) in enumerate((("idle_p50", "idle p50"), ("idle_p99", "idle p99"),
                                            ("p50", "loaded p50"), ("p99", "loaded p99"))):
            ax2.bar([x + (i - 1.5) * w for x in xs], [res[k][field] for k in keys], w,
                    label=label)
        ax2.axhline(5.0, color="red", lw=0.8, ls=":", label="target p99 5 ms")
        ax2.set_xticks(xs)
        ax2.set_xticklabels(keys, rotation=45, ha="right", fontsize=8)
        ax2.set_yscale("log")
        ax2.set_ylabel("1-byte echo RTT (ms)")
        ax2.set_title("Latency on a 2nd stream while iperf3 saturates the 1st")
        ax2.grid(True, axis="y", alpha=0.3)
        ax2.legend(fontsize=7)
    else:
        ax2.text(0.5, 0.5, "no fairness.json", ha="center")
    fig.tight_layout()
    path = RESULTS_DIR / "chart.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def main(argv: list[str] | None = None) -> int:
    RESULTS_DIR.mkdir(exist_ok=True)
    md = summary_markdown()
    (RESULTS_DIR / "summary.md").write_text(md)
    print(md)
    print(chart())
    missed = [t for t in targets() if not t[3]]
    print(f"{len(targets()) - len(missed)} targets met, {len(missed)} missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
