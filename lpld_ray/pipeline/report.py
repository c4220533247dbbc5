"""The run's report: accuracy, storage in the paper's terms, and wall time per stage."""

from __future__ import annotations

import json
import logging

from lpld_ray.config import Config
from lpld_ray.store.layout import IMAGES_STAGE, LABELS_STAGE
from lpld_ray.store.manifest import list_shards, read_manifest
from lpld_ray.store.storage import Store

log = logging.getLogger(__name__)

REPORT_OBJECT = "report/report.json"


def stage_bytes(store: Store, stage: str) -> int:
    """Bytes of all committed data objects of a stage (from the manifests)."""
    total = 0
    for shard in list_shards(store, stage):
        manifest = read_manifest(store, stage, shard)
        total += sum(e.size for e in manifest.objects) if manifest else 0
    return total


def label_meta_sum(store: Store, key: str) -> int:
    total = 0
    for shard in list_shards(store, LABELS_STAGE):
        manifest = read_manifest(store, LABELS_STAGE, shard)
        total += int(manifest.meta.get(key, 0)) if manifest else 0
    return total


def build_report(store: Store, cfg: Config, teacher_top1: float | None, student_top1: float | None,
                 wall_seconds: dict[str, float]) -> dict:
    """Everything a reader needs to set this run beside the paper's tables."""
    logits, index, aug = (label_meta_sum(store, key) for key in ("logit_bytes", "index_bytes", "aug_bytes"))
    full = label_meta_sum(store, "full_pool_bytes")
    return {
        "teacher_top1": teacher_top1,
        "student_top1": student_top1,
        "ipc": cfg.recover.ipc,
        "compression": cfg.relabel.compression,
        "batching": cfg.recover.batching,
        "source": cfg.recover.source,
        "epochs": cfg.train.epochs,
        "label_records": label_meta_sum(store, "records"),
        "image_bytes": stage_bytes(store, IMAGES_STAGE),
        "label_bytes": logits + index + aug,
        "label_bytes_logits": logits,
        "label_bytes_index": index,
        "label_bytes_aug": aug,
        "label_bytes_full_pool": full,
        "label_ratio_to_full_pool": full / (logits + index + aug) if full and logits else None,
        "topk": cfg.relabel.topk,
        "label_file_bytes": stage_bytes(store, LABELS_STAGE),
        "wall_seconds": wall_seconds,
        "seed": cfg.seed,
    }


def write_report(store: Store, report: dict) -> str:
    store.write_text(REPORT_OBJECT, json.dumps(report, indent=2, sort_keys=True))
    return store.uri(REPORT_OBJECT)


def human_summary(report: dict) -> str:
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    kib = lambda v: f"{v / 1024:.1f} KiB"  # noqa: E731
    return (
        f"teacher top-1 {pct(report['teacher_top1'])} | student top-1 {pct(report['student_top1'])} | "
        f"IPC {report['ipc']} {report['batching']} | labels {report['compression']:g}x: {kib(report['label_bytes'])} "
        f"(logits {kib(report['label_bytes_logits'])}, classes {kib(report.get('label_bytes_index', 0))}, "
        f"aug {kib(report['label_bytes_aug'])}) | "
        f"images {kib(report['image_bytes'])}"
    )
