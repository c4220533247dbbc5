"""Benchmark: label-pool loader samples/s against the student's training step rate, and the pool's memory per worker."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lpld_ray.config import load_config  # noqa: E402
from lpld_ray.labels import LabelPoolDataset, label_bytes, records_to_table, sample_view, view_counts  # noqa: E402
from lpld_ray.models import build_model  # noqa: E402
from lpld_ray.student import SoftTargetKLLoss  # noqa: E402
from lpld_ray.machine import describe_machine  # noqa: E402

log = logging.getLogger("bench_loader")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="jobs/configs/imagenet1k_rn18.yaml", help="relabel recipe and student arch")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--epochs", type=int, default=300, help="E: views per image at k = 1")
    p.add_argument("--compression", type=float, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--loader-workers", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=20, help="timed batches / optimizer steps after one warm-up")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    return p.parse_args()


def synthetic_pool(args: argparse.Namespace, relabel_cfg) -> tuple[LabelPoolDataset, "pa.Table"]:  # noqa: F821
    """A pool of the real record format: random images and fp16 logits, views drawn by the relabel recipe."""
    num_images = args.classes * args.ipc
    counts = view_counts(num_images, args.epochs, args.compression, seed=0)
    views = [sample_view(0, i, v, num_images, args.size, relabel_cfg) for i in range(num_images) for v in range(int(counts[i]))]
    table = records_to_table(views, torch.randn(len(views), args.classes).half(), args.classes)
    images = {i: torch.rand(3, args.size, args.size) for i in range(num_images)}
    return LabelPoolDataset(images, table, args.size), table


def pool_bytes(pool: LabelPoolDataset, table: "pa.Table") -> dict[str, int]:  # noqa: F821
    """What one training worker holds today: every image (float32) and every record (Arrow, in memory)."""
    images = sum(t.numel() * t.element_size() for t in pool.images.values())
    return {"images_in_memory": images, "records_in_memory": table.nbytes, "total": images + table.nbytes,
            "stored_label_bytes": label_bytes(table)["total"]}


def epochs_of(pool: LabelPoolDataset, loader: DataLoader):
    """Batches over as many epochs as asked for, each epoch through its own views (as the student loop does)."""
    epoch = 0
    while True:
        pool.set_epoch(epoch)
        yield from loader
        epoch += 1


def loader_rate(pool: LabelPoolDataset, batch_size: int, workers: int, steps: int) -> float:
    """Samples/s of a shuffled DataLoader over the pool, after its first batch (worker start-up excluded)."""
    loader = DataLoader(pool, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True)
    batches = epochs_of(pool, loader)
    next(batches)
    started = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * batch_size / (time.perf_counter() - started)


def student_rate(arch: str, classes: int, size: int, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> float:
    """Samples/s of forward + KD loss + backward + AdamW step on one batch, after one warm-up step."""
    model = build_model(arch, classes, 3, size).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = SoftTargetKLLoss(4.0)
    images, targets = batch[0].contiguous(memory_format=torch.channels_last), batch[1]
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), targets).backward()
        optimizer.step()
    return steps * images.shape[0] / (time.perf_counter() - started)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"relabel.compression={args.compression}"])
    started = time.perf_counter()
    pool, table = synthetic_pool(args, cfg.relabel)
    log.info("pool of %d records built in %.1fs", len(table), time.perf_counter() - started)
    loaders = {w: round(loader_rate(pool, args.batch_size, w, args.steps), 1) for w in args.loader_workers}
    batch = next(iter(DataLoader(pool, batch_size=args.batch_size)))
    student = round(student_rate(cfg.train.arch, args.classes, args.size, batch, args.steps), 1)
    result = {
        "machine": describe_machine(),
        "pool": {"classes": args.classes, "ipc": args.ipc, "size": args.size, "epochs": args.epochs,
                 "compression": args.compression, "records": len(table), "mix": cfg.relabel.mix},
        "memory_bytes": pool_bytes(pool, table),
        "loader_samples_per_s": loaders,
        "student_samples_per_s": {"arch": cfg.train.arch, "batch_size": args.batch_size, "rate": student},
        "loader_over_student": {w: round(rate / student, 2) for w, rate in loaders.items()},
    }
    log.info("%s", json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
