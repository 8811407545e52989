#!/usr/bin/env python3
"""Charts of an experiments.py run directory, written as PNGs into that directory.

    pip install -r scripts/requirements.txt
    python3 scripts/plot.py RUN_DIR [--resources-run N]

throughput_vs_p90.png      ops/s against 90th-percentile latency, one line per
                           (configuration, guest, get ratio), points labelled by clients
throughput_over_time.png   ops/s per measured second of every run (loadgen --series-out)
resources_over_time.png    CPU % and disk write bytes/s of each member around one run
"""

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI machines or over ssh
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def load_runs(run_dir):
    path = run_dir / "runs.jsonl"
    if not path.is_file():
        sys.exit(f"{path} not found: is {run_dir} an experiments.py run directory?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def line_label(r):
    label = f"{r['config']} / {r['guest']} / gets {float(r['get_ratio']):.0%}"
    return label


def plot_throughput_vs_p90(runs, out):
    lines = defaultdict(list)
    for r in runs:
        key = (r["config"], r["guest"], float(r["get_ratio"]), int(r["value_size"]))
        lines[key].append(r)
    value_sizes = {k[3] for k in lines}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for key in sorted(lines):
        pts = sorted(lines[key], key=lambda r: int(r["clients"]))
        label = line_label(pts[0])
        if len(value_sizes) > 1:
            label += f" / {key[3]} B"
        xs = [float(r["ops_per_s"]) for r in pts]
        ys = [float(r["p90_us"]) / 1000 for r in pts]
        (ln,) = ax.plot(xs, ys, marker="o", label=label)
        for r, x, y in zip(pts, xs, ys):
            ax.annotate(f"{r['clients']}", (x, y), textcoords="offset points",
                        xytext=(5, 5), fontsize=8, color=ln.get_color())
    ax.set_xlabel("throughput (ops/s)")
    ax.set_ylabel("p90 latency (ms)")
    # Room above and right of the outermost points for their labels.
    ax.set_xlim(0, max(float(r["ops_per_s"]) for r in runs) * 1.1)
    ax.set_ylim(0, max(float(r["p90_us"]) for r in runs) / 1000 * 1.15)
    title = "Throughput vs 90th-percentile latency (labels: clients)"
    if len(value_sizes) == 1:
        title += f", {value_sizes.pop()} B values"
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def read_series(path):
    secs, ops = [], []
    with open(path) as f:
        for row in csv.DictReader(f):
            secs.append(int(row["second"]))
            ops.append(int(row["ops"]))
    return secs, ops


def plot_throughput_over_time(run_dir, runs, out):
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in runs:
        path = run_dir / r["series"]
        if not path.is_file():
            continue
        secs, ops = read_series(path)
        # The last second is usually cut short by the end of the run; it would read as a dip.
        measured = float(r["duration_s"]) - float(r["warmup_s"])
        keep = [(s, o) for s, o in zip(secs, ops) if s + 1 <= measured + 1e-9]
        if not keep:
            continue
        label = f"{line_label(r)} / {r['clients']} clients"
        ax.plot([s + 1 for s, _ in keep], [o for _, o in keep], marker=".", label=label)
    ax.set_xlabel("second of the measured period")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("ops completed in that second")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput over time (warm-up excluded)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def read_monitor(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_resources(run_dir, run, out, margin_s=2.0):
    cdir = run_dir / run["cluster_dir"]
    t0 = run["t_start_ms"]
    lo, hi = t0 - margin_s * 1000, run["t_end_ms"] + margin_s * 1000
    fig, (ax_cpu, ax_disk) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for path in sorted(cdir.glob("monitor-node*.jsonl")):
        node = path.stem.removeprefix("monitor-")
        samples = [s for s in read_monitor(path) if lo <= s["ts_ms"] <= hi]
        # A sample covers the second ending at ts_ms; draw it at its middle.
        ts = [(s["ts_ms"] - 500 - t0) / 1000 for s in samples]
        ax_cpu.plot(ts, [s["cpu_percent"] for s in samples], marker=".", label=node)
        ax_disk.plot(ts, [s["disk_write_bytes"] / 1e6 for s in samples], marker=".",
                     label=node)
    for ax in (ax_cpu, ax_disk):
        ax.axvspan(0, (run["t_measure_ms"] - t0) / 1000, color="0.85", label="warm-up")
        ax.axvspan((run["t_measure_ms"] - t0) / 1000, (run["t_end_ms"] - t0) / 1000,
                   color="tab:green", alpha=0.08, label="measured")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    ax_cpu.set_ylabel("CPU % (100 = one core)")
    ax_disk.set_ylabel("disk writes (MB/s)")
    ax_disk.set_xlabel("seconds since loadgen start")
    ax_cpu.legend(fontsize=8, loc="upper right")
    ax_cpu.set_title(f"Members' resources: {line_label(run)} / {run['clients']} clients / "
                     f"{run['value_size']} B")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--resources-run", type=int, default=None,
                    help="line number (from 0) in runs.jsonl of the run whose resources "
                         "to plot (default: the one with the highest ops/s)")
    args = ap.parse_args()
    runs = load_runs(args.run_dir)
    if not runs:
        sys.exit("no runs recorded")
    written = []
    for name, fn in [
        ("throughput_vs_p90.png", lambda p: plot_throughput_vs_p90(runs, p)),
        ("throughput_over_time.png", lambda p: plot_throughput_over_time(args.run_dir, runs, p)),
    ]:
        fn(args.run_dir / name)
        written.append(name)
    if args.resources_run is not None:
        chosen = runs[args.resources_run]
    else:
        chosen = max(runs, key=lambda r: float(r["ops_per_s"]))
    plot_resources(args.run_dir, chosen, args.run_dir / "resources_over_time.png")
    written.append("resources_over_time.png")
    for name in written:
        print(args.run_dir / name)


if __name__ == "__main__":
    main()
