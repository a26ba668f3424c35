#!/usr/bin/env python3
"""OpenCLIP peer of `clipa --backend cuda bench` on a lent GPU (run by ci/gpu.sh).

Times OpenCLIP training steps (forward + ClipLoss + backward + AdamW step)
under bf16 autocast on the cases gpu.sh gives clipa:

- `bench-tiny` (shared/bench/README.md's model) at batch 64: img32, img16,
  img32_pd0.75, img16_txt8, img32_txt8;
- OpenCLIP's `ViT-B-16` (clipa's `vit-b16`) at 224/112/64 px with text
  32/16/8, at the batch given by --b16-batch.

Steps are timed between `sync()` calls, so the figure is
the device time of a step, as clipa's bench reports it. The AdamW is
PyTorch's default (the foreach kernels on CUDA), with OpenCLIP's split of
weight decay. Inputs are random and fresh every step.

Prints one line per case and writes `{"cases": [...]}` to --json with the
names clipa's bench gives the same cases, so ci/gpu_table.py can join them.

Usage: peer_gpu.py --json FILE [--steps 20] [--warmup 5] [--b16-batch 256] [--device cpu] [--only NAME..]
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
import os

import torch
import open_clip
from open_clip.loss import ClipLoss

DEV = "cuda"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


TINY = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 256, "head_width": 64, "patch_size": 4},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}
B16 = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}


def cases(b16_batch):
    """(name, base config, batch, image px, patch dropout, text length)."""
    out = [
        ("img32", TINY, 64, 32, 0.0, 32),
        ("img16", TINY, 64, 16, 0.0, 32),
        ("img32_pd0.75", TINY, 64, 32, 0.75, 32),
        ("img16_txt8", TINY, 64, 16, 0.0, 8),
        ("img32_txt8", TINY, 64, 32, 0.0, 8),
    ]
    for px, txt in ((224, 32), (112, 16), (64, 8)):
        # The name clipa's bench gives `--model vit-b16 --image-size PX --text-length TXT`.
        out.append((f"vit-b16_b{b16_batch}_img{px}_txt{txt}", B16, b16_batch, px, 0.0, txt))
    return out


def make_model(base, px, pd, ctx):
    cfg = json.loads(json.dumps(base))
    cfg["vision_cfg"]["image_size"] = px
    cfg["vision_cfg"]["patch_dropout"] = pd
    cfg["text_cfg"]["context_length"] = ctx
    name = f"peer-{cfg['vision_cfg']['width']}-{px}-{pd}-{ctx}"
    d = tempfile.mkdtemp(prefix="oc_cfg_")
    with open(os.path.join(d, f"{name}.json"), "w") as f:
        json.dump(cfg, f)
    open_clip.add_model_config(d)
    torch.manual_seed(0)
    return open_clip.create_model(name, pretrained=None, device=DEV)


def random_text(batch, ctx):
    ids = torch.randint(1, 49406, (batch, ctx), device=DEV)
    lens = torch.randint(2, ctx + 1, (batch,), device=DEV)
    ar = torch.arange(ctx, device=DEV)[None, :]
    ids[:, 0] = 49406
    ids = torch.where(ar == (lens[:, None] - 1), torch.full_like(ids, 49407), ids)
    return torch.where(ar >= lens[:, None], torch.zeros_like(ids), ids)


def bench(name, base, batch, px, pd, ctx, steps, warmup):
    model = make_model(base, px, pd, ctx)
    model.train()
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    params = list(model.named_parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in params if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in params if not exclude(n, p)], "weight_decay": 0.1}],
        lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    batches = [(torch.randn(batch, 3, px, px, device=DEV), random_text(batch, ctx))
               for _ in range(warmup + steps)]
    times = []
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i, (images, texts) in enumerate(batches):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(DEV, dtype=torch.bfloat16):
            img_f, txt_f, scale = model(images, texts)[:3]
            loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    model.eval()
    inf = []
    images, texts = batches[-1]
    with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16):
        for i in range(warmup + steps):
            sync()
            t0 = time.perf_counter()
            model(images, texts)
            sync()
            if i >= warmup:
                inf.append((time.perf_counter() - t0) * 1e3)
    median = statistics.median(times)
    r = {
        "name": name, "batch": batch, "median_ms": median, "min_ms": min(times),
        "max_ms": max(times), "images_per_s": batch / (median / 1e3),
        "infer_median_ms": statistics.median(inf),
        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if DEV == "cuda" else None,
        "last_loss": float(loss.detach()),
    }
    del model, opt, batches
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--b16-batch", type=int, default=256)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to try the script out")
    ap.add_argument("--only", nargs="*", default=None, help="case names to run")
    a = ap.parse_args()
    global DEV
    DEV = a.device
    torch.backends.cuda.matmul.allow_tf32 = True
    env = {"torch": torch.__version__, "open_clip": open_clip.__version__,
           "device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", "python": sys.version.split()[0]}
    print(json.dumps(env), flush=True)
    out = []
    for case in cases(a.b16_batch):
        if a.only and case[0] not in a.only:
            continue
        r = bench(*case, a.steps, a.warmup)
        out.append(r)
        print(f"{r['name']:28s} {r['median_ms']:9.2f} ms/step (min {r['min_ms']:.2f}, max {r['max_ms']:.2f}) "
              f"{r['images_per_s']:10.0f} img/s  infer {r['infer_median_ms']:.2f} ms  "
              f"peak {r['peak_mem_mb'] or 0:.0f} MB", flush=True)
    with open(a.json, "w") as f:
        json.dump({"env": env, "cases": out}, f, indent=1)


if __name__ == "__main__":
    main()
