#!/usr/bin/env python3
"""Splits each op of a token sweep into a fixed cost and a streaming part (docs/bench.md, "Where
the time goes").

    bench/breakdown.py SWEEP.json [--ops dispatch,combine,...]

SWEEP.json is ep_bench's JSON of `--sweep tokens` whose smallest point is 1 token. For each mode and
op it prints, per point: the median, the floor (necessary HBM bytes over the copy rate), the fixed
cost (the op's median at 1 token: launch, layout, barriers, signal round trips, with one token's
rows), the streaming part (median minus the fixed cost) and the streaming part's rate as a fraction
of the copy rate (floor / streaming part), then the share of the fixed cost in the median. Output is
a Markdown table.
"""
import argparse
import json
import sys
from collections import defaultdict


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="ep_bench --sweep tokens --json output")
    ap.add_argument("--ops", default="", help="comma-separated op keys (default: all)")
    args = ap.parse_args()
    with open(args.json) as f:
        run = json.load(f)
    if run.get("sweep_axis") != "tokens":
        sys.exit("breakdown.py: needs a --sweep tokens JSON (got sweep_axis=%r)" % run.get("sweep_axis"))
    wanted = [o for o in args.ops.split(",") if o]
    by_mode = defaultdict(list)
    for p in run["points"]:
        by_mode[p["mode"]].append(p)
    for mode, points in by_mode.items():
        points.sort(key=lambda p: p["tokens"])
        if points[0]["tokens"] != 1:
            sys.exit("breakdown.py: %s: the smallest point must be 1 token (got %d)" % (mode, points[0]["tokens"]))
        fixed = {o["op"]: o["median_us"] for o in points[0]["ops"]}
        print("%s (%d ranks, hidden %d, copy rate %.0f GB/s)\n" %
              (mode.upper(), points[0]["ranks"], points[0]["hidden"], run["copy_rate_gbps"]))
        print("| op | tokens | median us | floor us | fixed us | streaming us | streaming rate | fixed share |")
        print("|---|---|---|---|---|---|---|---|")
        ops = [o["op"] for o in points[0]["ops"] if not wanted or o["op"] in wanted]
        for op in ops:
            for p in points:
                o = next((x for x in p["ops"] if x["op"] == op), None)
                if o is None:
                    continue
                t, floor, f = o["median_us"], o["floor_us"], fixed[op]
                stream = t - f
                rate = "%.0f %%" % (100 * floor / stream) if stream > 0.5 and floor > 0 else "-"
                print("| %s | %d | %.1f | %.1f | %.1f | %.1f | %s | %.0f %% |" %
                      (op, p["tokens"], t, floor, f, stream, rate, 100 * f / t))
        print()


if __name__ == "__main__":
    main()
