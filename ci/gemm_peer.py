#!/usr/bin/env python3
"""torch.matmul on the six GEMM shapes of benches/gemm.rs (ViT-B/16 at
112 px / text 16, batch 256), bf16 on CUDA: the peer of clipa's
`cuda/gemm_b16` criterion group, run by ci/gpu.sh.

Each shape is timed with CUDA events over --iters back-to-back products
after a warm-up; the median of --repeats such windows is printed as
microseconds per product and TFLOP/s (2·m·k·n FLOP a product).

Usage: gemm_peer.py [--iters 50] [--repeats 7] [--json FILE]
"""
import argparse
import json
import statistics

import torch

# (name, m, k, n), as benches/gemm.rs's SHAPES.
SHAPES = [
    ("image_proj", 12_800, 768, 768),
    ("image_fc", 12_800, 768, 3072),
    ("image_fc_out", 12_800, 3072, 768),
    ("text_proj", 4096, 512, 512),
    ("text_fc", 4096, 512, 2048),
    ("text_fc_out", 4096, 2048, 512),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = []
    for name, m, k, n in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(10):
            torch.matmul(x, w)
        times = []
        for _ in range(a.repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(a.iters):
                torch.matmul(x, w)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / a.iters)  # µs
        us = statistics.median(times)
        tflops = 2 * m * k * n / us / 1e6
        rows.append({"name": f"{name}_{m}x{k}x{n}_bf16", "us": us, "tflops": tflops})
        print(f"torch.matmul {name:13s} {m:6d}x{k:4d}x{n:4d} bf16: {us:8.1f} µs  {tflops:6.1f} TFLOP/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "cases": rows}, f)


if __name__ == "__main__":
    main()
