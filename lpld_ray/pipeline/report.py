"""The run's report: accuracy, storage in the paper's terms, and wall time per stage."""

from __future__ import annotations

import hashlib
import json
import logging

from lpld_ray.config import Config
from lpld_ray.config_io import config_to_dict
from lpld_ray.store.layout import IMAGES_STAGE, LABELS_STAGE, STUDENT_STAGE, TEACHER_STAGE
from lpld_ray.store.manifest import Manifest, content_digest, read_manifests, shard_folders
from lpld_ray.store.storage import Store

log = logging.getLogger(__name__)

REPORT_OBJECT = "report/report.json"
REPORT_SHARD = "built"  # report/built/_MANIFEST.json: lists no object; records the inputs the report was built for


def committed_manifests(store: Store, stage: str) -> list[Manifest]:
    """Every committed shard manifest of a stage (not verified), read in parallel."""
    return [m for m in read_manifests(store, stage, shard_folders(store, stage)).values() if m is not None]


def report_inputs(store: Store, cfg: Config) -> str:
    """Digest of what the report is made of: every committed shard of the run's stages (objects and the inputs each
    was made for) and the config; the same digest means the report on storage is this one."""
    manifests = [m for stage in (TEACHER_STAGE, IMAGES_STAGE, LABELS_STAGE, STUDENT_STAGE)
                 for m in committed_manifests(store, stage)]
    made_for = "".join(f"{m.stage}/{m.shard}:{m.meta.get('inputs', '')}\n" for m in manifests)
    config = json.dumps(config_to_dict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(f"{content_digest(manifests)}\n{made_for}{config}".encode()).hexdigest()


def stored_bytes(manifests: list[Manifest]) -> int:
    """Bytes of the data objects the manifests list."""
    return sum(e.size for m in manifests for e in m.objects)


def build_report(store: Store, cfg: Config, teacher_top1: float | None, student_top1: float | None,
                 wall_seconds: dict[str, float]) -> dict:
    """Everything a reader needs to set this run beside the paper's tables."""
    images, labels = committed_manifests(store, IMAGES_STAGE), committed_manifests(store, LABELS_STAGE)

    def label_meta_sum(key: str) -> int:
        return sum(int(m.meta.get(key, 0)) for m in labels)

    logits, index, aug = (label_meta_sum(key) for key in ("logit_bytes", "index_bytes", "aug_bytes"))
    full = label_meta_sum("full_pool_bytes")
    return {
        "teacher_top1": teacher_top1,
        "student_top1": student_top1,
        "ipc": cfg.recover.ipc,
        "compression": cfg.relabel.compression,
        "batching": cfg.recover.batching,
        "source": cfg.recover.source,
        "epochs": cfg.train.epochs,
        "label_records": label_meta_sum("records"),
        "image_bytes": stored_bytes(images),
        "label_bytes": logits + index + aug,
        "label_bytes_logits": logits,
        "label_bytes_index": index,
        "label_bytes_aug": aug,
        "label_bytes_full_pool": full,
        "label_ratio_to_full_pool": full / (logits + index + aug) if full and logits else None,
        "topk": cfg.relabel.topk,
        "label_file_bytes": stored_bytes(labels),
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
