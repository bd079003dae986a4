#!/usr/bin/env python3
"""Plots an ep_bench sweep: time and GB/s per rank against the sweep axis.

One row of panels per mode (HT, LL). moecomm is drawn solid, the naive pipeline
(permute -> per-peer copies -> unpermute) dashed, and the copy-rate bound dotted: the
floor in the time panel, the ceiling in the bandwidth panel.

    ep_bench --sweep tokens --json sweep.json
    python3 bench/plot.py sweep.json -o sweep.png
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

MODE_TITLES = {"ht": "high-throughput", "ll": "low-latency"}
AXIS_LABELS = {
    "tokens": "tokens per rank",
    "hidden": "hidden size",
    "sms": "SMs per rank",
}
LOG2_AXES = {"tokens", "hidden"}
DEFAULT_OPS = ["dispatch", "combine"]
PANEL_SIZE = (6.0, 3.8)  # inches per panel


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="the JSON written by ep_bench --sweep ... --json")
    parser.add_argument("-o", "--out", type=Path,
                        help="PNG to write (default: the JSON's name with .png)")
    parser.add_argument("--ops", default=",".join(DEFAULT_OPS),
                        help="comma-separated ops to draw (default: %(default)s; also "
                             "cached_dispatch, exact_dispatch, round_trip, graph_round_trip)")
    parser.add_argument("--dpi", type=int, default=120)
    return parser.parse_args(argv)


def load_sweep(path):
    with open(path) as f:
        data = json.load(f)
    axis = data.get("sweep_axis", "none")
    if axis == "none":
        sys.exit(f"plot.py: {path} is not a sweep (run ep_bench with --sweep tokens|hidden|sms)")
    if not data.get("points"):
        sys.exit(f"plot.py: {path} has no points")
    return data, axis


def series(points, op):
    """x, moecomm, naive and bound values of one op, sorted by the axis value."""
    rows = []
    for point in points:
        for entry in point["ops"]:
            if entry["op"] == op:
                rows.append((point["axis_value"], entry))
    rows.sort(key=lambda row: row[0])
    naive = [entry.get("naive") for _, entry in rows]
    return {
        "x": [x for x, _ in rows],
        "us": [entry["median_us"] for _, entry in rows],
        "us_lo": [entry["p10_us"] for _, entry in rows],
        "us_hi": [entry["p90_us"] for _, entry in rows],
        "gbps": [entry["gbps_per_rank"] for _, entry in rows],
        "floor_us": [entry["floor_us"] for _, entry in rows],
        "ceiling_gbps": [entry["ceiling_gbps_per_rank"] for _, entry in rows],
        "naive_us": [n["median_us"] if n else None for n in naive],
        "naive_gbps": [n["gbps_per_rank"] if n else None for n in naive],
    }


def draw_op(ax_time, ax_bw, s, op, color):
    ax_time.plot(s["x"], s["us"], "-o", color=color, label=f"{op} moecomm")
    ax_time.fill_between(s["x"], s["us_lo"], s["us_hi"], color=color, alpha=0.15, linewidth=0)
    ax_bw.plot(s["x"], s["gbps"], "-o", color=color, label=f"{op} moecomm")
    if any(v is not None for v in s["naive_us"]):
        ax_time.plot(s["x"], s["naive_us"], "--s", color=color, alpha=0.8, label=f"{op} naive")
        ax_bw.plot(s["x"], s["naive_gbps"], "--s", color=color, alpha=0.8, label=f"{op} naive")
    ax_time.plot(s["x"], s["floor_us"], ":", color=color, label=f"{op} copy-rate floor")
    ax_bw.plot(s["x"], s["ceiling_gbps"], ":", color=color, label=f"{op} copy-rate ceiling")


def style_axes(ax, axis, ylabel, title):
    if axis in LOG2_AXES:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(AXIS_LABELS.get(axis, axis))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def suptitle(data):
    m, o = data["machine"], data["options"]
    return (f"ep_bench sweep over {AXIS_LABELS.get(data['sweep_axis'], data['sweep_axis'])} - "
            f"{m['gpu']} ({m['sm_count']} SMs), {o['ranks']} ranks, top-{o['topk']} of "
            f"{o['experts']} experts, {o['dtype']} dispatch; copy rate "
            f"{data['copy_rate_gbps']:.0f} GB/s")


def plot(data, axis, ops, out, dpi):
    modes = [m for m in ("ht", "ll") if any(p["mode"] == m for p in data["points"])]
    fig, axes = plt.subplots(len(modes), 2, squeeze=False,
                             figsize=(2 * PANEL_SIZE[0], len(modes) * PANEL_SIZE[1]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, mode in enumerate(modes):
        points = [p for p in data["points"] if p["mode"] == mode]
        ax_time, ax_bw = axes[row]
        drawn = 0
        for i, op in enumerate(ops):
            s = series(points, op)
            if s["x"]:
                draw_op(ax_time, ax_bw, s, op, colors[i % len(colors)])
                drawn += 1
        if drawn == 0:
            sys.exit(f"plot.py: no points for ops {ops} in mode {mode}")
        style_axes(ax_time, axis, "time (us, median; band p10-p90)", f"{MODE_TITLES[mode]}: time")
        style_axes(ax_bw, axis, "GB/s per rank", f"{MODE_TITLES[mode]}: bandwidth")
    fig.suptitle(suptitle(data), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    return out


def main(argv=None):
    args = parse_args(argv)
    data, axis = load_sweep(args.json)
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    out = args.out or args.json.with_suffix(".png")
    print(f"plot.py: wrote {plot(data, axis, ops, out, args.dpi)}")


if __name__ == "__main__":
    main()
