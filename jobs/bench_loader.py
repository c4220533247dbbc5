"""Benchmark: the per-epoch label-pool loader (one rank of W) against the whole pool in memory, and the student's step rate."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from lpld_ray.config_io import load_config
from lpld_ray.data.label_shards import LabelShards
from lpld_ray.data.pool import ImageSource, LabelPool
from lpld_ray.machine import describe_machine
from lpld_ray.method.kd import SoftTargetKLLoss  # noqa
from lpld_ray.method.models import build_model
from lpld_ray.method.rng import SAMPLER_VERSION
from lpld_ray.method.views import sample_view, view_counts  # noqa
from lpld_ray.pipeline.student import image_sampler  # noqa
from lpld_ray.store.codecs import encode_png  # noqa
from lpld_ray.store.label_table import epoch_order, records_to_table, table_to_parquet  # noqa
from lpld_ray.store.layout import (
    IMAGES_STAGE,  # noqa
    LABELS_OBJECT,  # noqa
    LABELS_STAGE,  # noqa
    image_object_name,  # noqa
)
from lpld_ray.store.manifest import ShardWriter
from lpld_ray.store.storage import Store
from lpld_ray.store.uris import shard_name

log = logging.getLogger("bench_loader")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="jobs/configs/imagenet1k_rn18.yaml", help="relabel recipe and student arch")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--epochs", type=int, default=300, help="E: views per image at k = 1")
    p.add_argument("--compression", type=float, default=40)
    p.add_argument("--class-shard-size", type=int, default=10)
    p.add_argument("--world", type=int, default=8, help="training workers W; the loader of rank 0 is timed")
    p.add_argument("--image-cache-mb", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--loader-workers", nargs="+", type=int, default=[0, 2])
    p.add_argument("--samplers", nargs="+", default=["global", "shard"], choices=["global", "shard"],
                   help="train.sampler values to time side by side")
    p.add_argument("--steps", type=int, default=20, help="timed batches / optimizer steps after one warm-up")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--store", help="where to write the synthetic pool (default: a temporary folder)")
    return p.parse_args()


def write_pool(store: Store, args: argparse.Namespace, relabel_cfg) -> None:
    """A pool in the real layout: one PNG per image and one slot-ordered label shard per class shard,
    random pixels and fp16 logits, views drawn by the relabel recipe."""
    num_images = args.classes * args.ipc
    counts = view_counts(num_images, args.epochs, args.compression, seed=0)
    gen = torch.Generator().manual_seed(0)
    for index, first in enumerate(range(0, args.classes, args.class_shard_size)):
        classes = range(first, min(first + args.class_shard_size, args.classes))
        images = ShardWriter(store, IMAGES_STAGE, shard_name(index))
        views = []
        for c in classes:
            for i in range(args.ipc):
                images.put(image_object_name(c, i), encode_png(torch.rand(3, args.size, args.size, generator=gen)))
                image_id = c * args.ipc + i
                views += [sample_view(0, image_id, v, num_images, args.size, relabel_cfg) for v in range(int(counts[image_id]))]
        images.commit(0, {})
        order, groups = epoch_order(views, counts)
        table = records_to_table([views[j] for j in order], torch.randn(len(views), args.classes).half(), args.classes,
                                 SAMPLER_VERSION)
        labels = ShardWriter(store, LABELS_STAGE, shard_name(index))
        labels.put(LABELS_OBJECT, table_to_parquet(table, groups))
        labels.commit(0, {})


def whole_pool_bytes(store: Store, pool: LabelPool) -> dict[str, int]:
    """The baseline: every image as float32 and every record in memory, as the loader before this one held them."""
    shards = LabelShards(store)
    records = sum(shards.read_rows(name, np.arange(shards.row_group_starts(name)[-1])).nbytes
                  for name in shards.names)
    images = len(pool) * 4 * pool.images.image_bytes
    return {"images_float32": images, "records": records, "total": images + records}


def epoch_batches(pool: LabelPool, sampler, loader: DataLoader, stats: dict):
    """Batches of rank 0 over as many epochs as asked for, each read by set_epoch (its time goes into ``stats``)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        pool.set_epoch(epoch, list(sampler))
        stats.setdefault("set_epoch_s", []).append(round(time.perf_counter() - started, 3))
        yield from loader
        epoch += 1


def open_pool(store: Store, args: argparse.Namespace) -> LabelPool:
    return LabelPool(LabelShards(store), ImageSource(store, args.ipc, args.image_cache_mb << 20), args.size)


def loader_rate(store: Store, args: argparse.Namespace, kind: str, workers: int) -> dict:
    """Samples/s of rank 0's loader on a fresh pool (cold cache), epoch reads included, after its first batch."""
    pool = open_pool(store, args)
    sampler = image_sampler(pool, kind, args.world, 0, seed=0)
    loader = DataLoader(pool, batch_size=args.batch_size, sampler=sampler, num_workers=workers, drop_last=True)
    stats: dict = {}
    batches = epoch_batches(pool, sampler, loader, stats)
    next(batches)
    read_before, started = pool.shards.bytes_read, time.perf_counter()
    for _ in range(args.steps):
        next(batches)
    rate = args.steps * args.batch_size / (time.perf_counter() - started)
    return {"samples_per_s": round(rate, 1), "set_epoch_s": stats["set_epoch_s"], "memory": pool.memory_bytes(),
            "label_bytes_read_after_warmup": pool.shards.bytes_read - read_before}


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
    with tempfile.TemporaryDirectory(prefix="lpld-bench-loader-") as folder:
        store = Store(args.store or folder)
        started = time.perf_counter()
        write_pool(store, args, cfg.relabel)
        log.info("pool written in %.1fs", time.perf_counter() - started)
        pool = open_pool(store, args)
        loaders = {f"{kind}, {w} loader workers": loader_rate(store, args, kind, w)
                   for kind in args.samplers for w in args.loader_workers}
        pool.set_epoch(0)
        baseline = whole_pool_bytes(store, pool)
        batch = next(iter(DataLoader(pool, batch_size=args.batch_size)))
        parquet_bytes = sum(store.size(f"{LABELS_STAGE}/{n}/{LABELS_OBJECT}") for n in pool.shards.names)
    student = round(student_rate(cfg.train.arch, args.classes, args.size, batch, args.steps), 1)
    per_epoch = max(v["memory"]["index"] + v["memory"]["epoch_records"] + v["memory"]["image_cache"] for v in loaders.values())
    result = {
        "machine": describe_machine(),
        "pool": {"classes": args.classes, "ipc": args.ipc, "size": args.size, "epochs": args.epochs,
                 "compression": args.compression, "world": args.world, "images": len(pool),
                 "label_parquet_bytes": parquet_bytes},
        "loader": loaders,
        "memory_bytes": {"per_epoch_loader_rank0": per_epoch, "whole_pool_baseline": baseline,
                         "baseline_over_loader": round(baseline["total"] / per_epoch, 2)},
        "student_samples_per_s": {"arch": cfg.train.arch, "batch_size": args.batch_size, "rate": student},
        "loader_over_student": {w: round(v["samples_per_s"] / student, 2) for w, v in loaders.items()},
    }
    log.info("%s", json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
