#!/usr/bin/env python3
"""Per-kernel time of one training step from CubeCL's profiling log
(`CUBECL_DEBUG_LOG=FILE CUBECL_DEBUG_OPTION=profile clipa ... bench
--steps 1 --warmup 2`), run by ci/gpu.sh for ViT-B/16 on cuda.

Each launch is a row `| <duration> | <kernel> | <details...>`. The step is
the rows after the previous step's optimiser launches (CubeCL's AdamW
kernel names contain `Adamw`) up to the end of the last step's: the
warm-up steps and the inference pass of `clipa bench` fall outside it.
Prints launches, total milliseconds and share per kernel name, largest
first, and the step's total launches and kernel time.

Usage: kernel_table.py LOG [--top 30]
"""
import argparse
import collections
import re

ROW = re.compile(r"^\|\s*([0-9.]+)\s*(ns|µs|us|ms|s)\s*\|\s*([^|]+?)\s*\|")
SCALE = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    rows = []
    with open(a.log, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = ROW.match(line)
            if m:
                rows.append((float(m.group(1)) * SCALE[m.group(2)], m.group(3)))
    # Runs of consecutive optimiser launches: one run per step.
    runs, start = [], None
    for i, (_, name) in enumerate(rows):
        adamw = "adamw" in name.lower()
        if adamw and start is None:
            start = i
        if not adamw and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(rows)))
    if len(runs) < 2:
        print(f"kernel_table: {len(runs)} optimiser steps in {a.log}; need two")
        return
    step = rows[runs[-2][1]:runs[-1][1]]
    total = sum(ms for ms, _ in step)
    per = collections.defaultdict(lambda: [0, 0.0])
    for ms, name in step:
        per[name][0] += 1
        per[name][1] += ms
    print(f"one step: {len(step)} launches, {total:.2f} ms of kernel time")
    print(f"{'kernel':40s} {'launches':>8s} {'ms':>9s} {'share':>6s}")
    for name, (n, ms) in sorted(per.items(), key=lambda kv: -kv[1][1])[: a.top]:
        print(f"{name[:40]:40s} {n:8d} {ms:9.3f} {100 * ms / total:5.1f}%")


if __name__ == "__main__":
    main()
