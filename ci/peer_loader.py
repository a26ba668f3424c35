#!/usr/bin/env python3
"""Pillow peer of the `cpu/loader/*` benches (benches/loader.rs).

torchvision's RandomResizedCrop on a PIL image is get_params (below, draw
for draw) followed by `img.crop(box).resize((s, s), Image.BILINEAR)`, with
Pillow's antialiasing; this script runs exactly that after a JPEG decode,
single thread, and prints images/s for 256 and 512 px inputs resized to
112 and 224.

The JPEGs are read from DIR/pattern{256,512}.jpg when they exist (the
bytes the Rust side encodes, so both sides decode the same files);
otherwise the same pattern is drawn here and encoded by Pillow at quality
90 with 4:4:4 chroma, as the `image` crate's encoder writes.

With --write DIR it saves the Pillow-encoded files there and exits; point
the Rust bench at the same files with CLIPA_LOADER_INPUTS=DIR, so that
both sides decode identical bytes (JPEG encoders differ in entropy-coded
size, and entropy decoding dominates at 512 px).

Usage: peer_loader.py [--dir DIR] [--seconds S] [--write DIR]
Needs only the standard library and Pillow.
"""

import argparse
import io
import math
import os
import random
import time

from PIL import Image


def pattern(side):
    """benches/loader.rs::pattern: gradients plus a hashed 4x4-block texture."""
    pixels = bytearray()
    for y in range(side):
        for x in range(side):
            h = ((((x // 4) * 73856093) & 0xFFFFFFFF) ^ (((y // 4) * 19349663) & 0xFFFFFFFF)) % 32
            pixels += bytes(
                ((x * 255 // side + h) % 256, (y * 255 // side + 2 * h) % 256, ((x + y) * 127 // side + 3 * h) % 256)
            )
    return Image.frombytes("RGB", (side, side), bytes(pixels))


def jpeg_bytes(side, directory):
    path = os.path.join(directory, f"pattern{side}.jpg") if directory else ""
    if path and os.path.exists(path):
        with open(path, "rb") as f:
            return f.read(), path
    out = io.BytesIO()
    pattern(side).save(out, "JPEG", quality=90, subsampling=0)
    return out.getvalue(), "drawn here, Pillow-encoded"


def get_params(width, height, rng, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision.transforms.RandomResizedCrop.get_params."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = rng.randint(0, height - h)
            j = rng.randint(0, width - w)
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def pipeline(data, size, rng):
    img = Image.open(io.BytesIO(data)).convert("RGB")
    i, j, h, w = get_params(img.width, img.height, rng)
    return img.crop((j, i, j + w, i + h)).resize((size, size), Image.BILINEAR)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="", help="folder with pattern256.jpg and pattern512.jpg")
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per case")
    parser.add_argument("--write", default="", help="save pattern{256,512}.jpg here and exit")
    args = parser.parse_args()
    import PIL

    if args.write:
        os.makedirs(args.write, exist_ok=True)
        for side in (256, 512):
            data, _ = jpeg_bytes(side, "")
            with open(os.path.join(args.write, f"pattern{side}.jpg"), "wb") as f:
                f.write(data)
        return

    print(f"Pillow {PIL.__version__}, single thread")
    for side in (256, 512):
        data, origin = jpeg_bytes(side, args.dir)
        print(f"input {side}px: {len(data)} bytes ({origin})")
        for size in (112, 224):
            rng = random.Random(0)
            for _ in range(20):
                pipeline(data, size, rng)
            best = 0.0
            for _ in range(3):
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < args.seconds / 3:
                    pipeline(data, size, rng)
                    n += 1
                best = max(best, n / (time.perf_counter() - start))
            print(f"cpu/loader/jpeg{side}_to{size}: {best:.0f} images/s")


if __name__ == "__main__":
    main()
