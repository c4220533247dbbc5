"""Within-class diversity of distilled runs: mean pairwise cosine of the teacher's penultimate features per class."""

from __future__ import annotations

import argparse
import json
import logging

import torch

from lpld_ray.data.datasets import load_dataset
from lpld_ray.method.metrics import within_class_cosine
from lpld_ray.method.models import build_model, load_weights_bytes
from lpld_ray.pipeline.teacher import teacher_state_bytes
from lpld_ray.pipeline.units import load_shard_images
from lpld_ray.store.layout import IMAGES_STAGE
from lpld_ray.store.manifest import list_shards
from lpld_ray.store.run_record import read_run_config
from lpld_ray.store.storage import Store

log = logging.getLogger("diversity")


def run_diversity(run_dir: str, teacher_run: str | None) -> dict:
    """Diversity of one run's images, measured with its own teacher (or the teacher of ``teacher_run``)."""
    store = Store(run_dir)
    cfg = read_run_config(store)
    probe = load_dataset(cfg.data, "test")
    teacher_store = Store(teacher_run) if teacher_run else store
    teacher = build_model(cfg.teacher.arch, probe.num_classes, probe.spec.channels, probe.spec.size)
    load_weights_bytes(teacher, teacher_state_bytes(teacher_store, cfg.teacher), source="teacher")
    images, labels = zip(*(load_shard_images(store, s) for s in list_shards(store, IMAGES_STAGE)))
    per_class = within_class_cosine(teacher, torch.cat(images), torch.cat(labels), probe.spec)
    return {
        "run": run_dir,
        "batching": cfg.recover.batching,
        "ipc": cfg.recover.ipc,
        "mean_within_class_cosine": round(sum(per_class.values()) / len(per_class), 4),
        "per_class": {c: round(v, 4) for c, v in per_class.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-dir", action="append", required=True, help="a finished run (repeatable)")
    p.add_argument("--teacher-run", help="measure every run with this run's teacher (default: each its own)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for run_dir in args.run_dir:
        log.info(json.dumps(run_diversity(run_dir, args.teacher_run)))


if __name__ == "__main__":
    main()
