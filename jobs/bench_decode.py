"""Benchmark: ImageFolder batches decoded in 1 thread (the baseline) and in N threads (__getitems__), side by side."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lpld_ray.config import DataConfig
from lpld_ray.data.datasets import load_dataset
from lpld_ray.machine import describe_machine

log = logging.getLogger("bench_decode")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--per-class", type=int, default=64)
    p.add_argument("--width", type=int, default=500, help="source JPEG size, ImageNet's typical 500 x 375")
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--size", type=int, default=224, help="data.image_size: shorter side resized, centre crop")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    return p.parse_args()


def write_tree(root: Path, classes: int, per_class: int, width: int, height: int) -> None:
    """root/{train,val}/<class>/*.jpg: smooth random images (gradients plus noise) at quality 90."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    for split, count in (("train", per_class), ("val", 1)):
        for c in range(classes):
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = ramp * rng.uniform(0.2, 1.0, size=(1, 1, 3)) + rng.normal(0, 20, size=(height, width, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def images_per_second(root: Path, size: int, batch: int, threads: int) -> float:
    dataset = load_dataset(DataConfig(name="image_folder", root=str(root), image_size=size), "train")
    dataset.decode_threads = threads
    started = time.perf_counter()
    seen = sum(x.shape[0] for x, _ in DataLoader(dataset, batch_size=batch))
    return seen / (time.perf_counter() - started)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_decode_"))
    root = out / "tree"
    if not root.exists():
        write_tree(root, args.classes, args.per_class, args.width, args.height)
    torch.set_num_threads(1)
    runs = []
    for repeat in range(args.repeats):
        for threads in args.threads:
            rate = images_per_second(root, args.size, args.batch, threads)
            runs.append({"threads": threads, "repeat": repeat, "images_per_s": round(rate, 1)})
            log.info("%d decode thread(s): %.1f images/s", threads, rate)
    best = {t: max(r["images_per_s"] for r in runs if r["threads"] == t) for t in args.threads}
    base = best[args.threads[0]]
    result = {"machine": describe_machine(),
              "work": f"{args.classes * args.per_class} JPEGs {args.width}x{args.height} -> {args.size} px, batch {args.batch}",
              "runs": runs, "best_images_per_s": best,
              "speedup_vs_first": {t: round(r / base, 3) for t, r in best.items()}}
    (out / "bench_decode.json").write_text(json.dumps(result, indent=2))
    log.info("result:\n%s", json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
