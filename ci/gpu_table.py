#!/usr/bin/env python3
"""One table from ci/gpu.sh's runs: clipa's bench JSON (per backend) beside
OpenCLIP's (ci/peer_gpu.py), with TFLOP/s and MFU.

TFLOP/s is clipa's FLOP count of the case (`train_gflop`, 3 x forward)
over the step time; OpenCLIP's row uses the same count, since the model and
the token counts are the same. MFU is that over the chip's dense peak for
the precision the row ran in: bf16 tensor cores on `cuda` (clipa's `auto`
precision and OpenCLIP's autocast), float32 on `wgpu`.

Usage: gpu_table.py [--bf16-peak T] [--f32-peak T] [--peer peer.json] BACKEND=clipa.json ...
"""
import argparse
import json


def main():
    ap = argparse.ArgumentParser()
    # H100/H200 SXM dense peaks (NVIDIA's data sheet, without sparsity).
    ap.add_argument("--bf16-peak", type=float, default=989.4)
    ap.add_argument("--f32-peak", type=float, default=66.9)
    ap.add_argument("--peer", default=None)
    ap.add_argument("runs", nargs="+", help="BACKEND=FILE with one `clipa bench --json` object")
    a = ap.parse_args()
    peer = {}
    if a.peer:
        try:
            with open(a.peer) as f:
                peer = {c["name"]: c for c in json.load(f)["cases"]}
        except (OSError, ValueError, KeyError) as e:
            print(f"(no OpenCLIP figures: {e})")
    head = (f"{'backend':7s} {'case':30s} {'ms/step':>9s} {'img/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s}"
            f" | {'OC ms':>8s} {'OC img/s':>9s} {'OC MFU':>7s} {'clipa/OC':>8s}")
    print(head)
    print("-" * len(head))
    for run in a.runs:
        backend, path = run.split("=", 1)
        try:
            with open(path) as f:
                lines = [l for l in f if l.startswith("{")]
            cases = [c for l in lines for c in json.loads(l)["cases"]]
        except (OSError, ValueError, KeyError) as e:
            print(f"{backend:7s} ({path}: {e})")
            continue
        peak = a.bf16_peak if backend == "cuda" else a.f32_peak
        for c in cases:
            tflops = c["train_gflop"] / c["median_ms"]  # GFLOP / ms = TFLOP/s
            row = (f"{backend:7s} {c['name']:30s} {c['median_ms']:9.2f} {c['images_per_s']:9.0f}"
                   f" {tflops:8.2f} {100 * tflops / peak:5.1f}%")
            p = peer.get(c["name"]) if backend == "cuda" else None
            if p:
                ptf = c["train_gflop"] / p["median_ms"]
                row += (f" | {p['median_ms']:8.2f} {p['images_per_s']:9.0f} {100 * ptf / a.bf16_peak:6.1f}%"
                        f" {c['median_ms'] / p['median_ms']:8.2f}")
            print(row)


if __name__ == "__main__":
    main()
