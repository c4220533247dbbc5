"""The relabel unit: teacher outputs for every kept view of a class shard, committed as a Parquet labels shard."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import torch
from torch import Tensor, nn

from lpld_ray.config import RelabelConfig
from lpld_ray.data.seeded import seeded_json
from lpld_ray.method.prune import select_views, view_scores
from lpld_ray.method.rng import SAMPLER_VERSION
from lpld_ray.method.views import ViewParams, compose_view, images_needed, plan_views, view_counts
from lpld_ray.store.label_table import (
    LABEL_SCHEMA_VERSION,
    epoch_order,
    label_bytes,
    label_schema,
    read_label_table,
    records_to_table,
    row_bytes,
    table_to_parquet,
)
from lpld_ray.store.layout import LABELS_OBJECT, LABELS_STAGE
from lpld_ray.store.manifest import (
    Manifest,
    ShardWriter,
    committed_manifest,
    current_shards,
    read_object,
)
from lpld_ray.store.storage import Store

log = logging.getLogger(__name__)



def current_labels(store: Store, names: list[str], inputs: str, verify: bool = False) -> dict[str, Manifest | None]:
    """For each labels shard: its manifest when it is done for ``inputs`` (current_shards) with this schema and
    sampler version; None: redo it."""
    done = current_shards(store, LABELS_STAGE, dict.fromkeys(names, inputs), verify)
    for shard, manifest in done.items():
        for key, version in (("schema_version", LABEL_SCHEMA_VERSION), ("sampler_version", SAMPLER_VERSION)):
            if manifest is not None and manifest.meta.get(key) != version:
                log.warning("labels/%s has %s %s, not %d; redoing it", shard, key.replace("_", " "),
                            manifest.meta.get(key), version)
                done[shard] = None
    return done


def read_label_shard(store: Store, shard: str) -> pa.Table:
    """The label table of one committed labels shard (its object checked as read)."""
    manifest = committed_manifest(store, LABELS_STAGE, shard, "relabel")
    return read_label_table(read_object(store, LABELS_STAGE, shard, LABELS_OBJECT, manifest))


# ----------------------------------------------------------------------------- relabel


def _teacher_logits(teacher: nn.Module, normalize_fn: Callable[[Tensor], Tensor], batch: list[Tensor], device) -> Tensor:
    with torch.no_grad():
        out = teacher(normalize_fn(torch.stack(batch).to(device)))
    return out.detach().to("cpu", torch.float16)


def full_pool_bytes(num_images: int, epochs: int, num_classes: int) -> int:
    """The 1x pool in the paper's terms, that pruning and top-k are measured against: a record of every logit for
    each of ``epochs`` views of each image."""
    return num_images * epochs * sum(row_bytes(label_schema(num_classes)).values())


@dataclass(frozen=True)
class RelabelTask:
    """One labels shard to make: its images (run-wide ids), every kept view of them (sampled once, e.g. by
    :func:`lpld_ray.method.views.plan_views`), the relabel config and the seed the views were drawn with."""

    shard: str
    image_ids: tuple[int, ...]
    views: tuple[ViewParams, ...]
    cfg: RelabelConfig
    seed: int
    num_classes: int
    inputs: str = ""
    ipc: int = 0  # images per class: an image's class is image_id // ipc (metric pruning)
    keep: dict[int, int] | None = None  # metric pruning: views to keep per image, of all E given; None: keep all
    seeded: str | None = None  # relabel.params seeded: the JSON that regenerates the views (data.seeded)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_ids", tuple(int(i) for i in self.image_ids))
        object.__setattr__(self, "views", tuple(self.views))
        strays = {v.image_id for v in self.views} - set(self.image_ids)
        if strays:
            raise ValueError(f"relabel task {self.shard}: views of image {min(strays)}, which is not one of its images")

    def images_needed(self) -> set[int]:
        """The shard's own images and its views' CutMix partners: the images relabel_shard needs."""
        return images_needed(self.image_ids, self.views)


def relabel_task(shard: str, image_ids: list[int], cfg: RelabelConfig, seed: int, ipc: int, num_classes: int,
                 size: int, inputs: str = "") -> RelabelTask:
    """One shard's relabel task. Random pruning: each image's seeded view count (view_counts over the run's
    images), its views 0..n-1 drawn once. Metric pruning: all E views of each image, and how many of them to keep."""
    counts = view_counts(num_classes * ipc, cfg.epochs, cfg.compression, seed)
    if cfg.prune_by == "random":
        seeded = seeded_json(seed, len(counts), size, image_ids, cfg) if cfg.params == "seeded" else None
        return RelabelTask(shard, tuple(image_ids), tuple(plan_views(seed, image_ids, counts, cfg, size)), cfg, seed,
                           num_classes, inputs, ipc, seeded=seeded)
    every = torch.full_like(counts, cfg.epochs)
    return RelabelTask(shard, tuple(image_ids), tuple(plan_views(seed, image_ids, every, cfg, size)), cfg, seed,
                       num_classes, inputs, ipc, keep={i: int(counts[i]) for i in image_ids})


def pruned_by_metric(task: RelabelTask, views: list[ViewParams], logits: Tensor) -> list[int]:
    """The positions of the views ``task.keep`` asks for, by the teacher's score of each (method.prune)."""
    image_class = torch.tensor([v.image_id // task.ipc for v in views], dtype=torch.int64)
    partner_class = torch.tensor([v.partner_id // task.ipc if v.mix == 1 else -1 for v in views], dtype=torch.int64)
    lam = torch.tensor([v.lam for v in views])
    scores = view_scores(logits, task.cfg.prune_by, image_class, partner_class, lam)
    return select_views(scores, [v.image_id for v in views], [v.view_id for v in views], task.keep or {},
                        easy=task.cfg.prune_keep == "easy")


def relabel_shard(
    store: Store,
    teacher: nn.Module,
    normalize_fn: Callable[[Tensor], Tensor],
    images: dict[int, Tensor],
    task: RelabelTask,
    device: torch.device | str = "cpu",
) -> dict:
    """Teacher fp16 outputs for every view of ``task``, committed as ``labels/<shard>/labels.parquet``.

    ``images`` holds at least ``task.images_needed()`` by id (CutMix partners come from any class), as decoded PNGs
    on the CPU; views are composed there and only the batch goes to ``device``.
    """
    started = time.time()
    missing = task.images_needed() - set(images)
    if missing:
        raise ValueError(f"relabel {task.shard}: image {min(missing)} is needed but not given")
    size = int(images[task.image_ids[0]].shape[-1]) if task.image_ids else 0
    was_training = teacher.training
    teacher.eval()
    outputs: list[Tensor] = []
    batch: list[Tensor] = []
    try:
        for view in task.views:
            partner = images[view.partner_id] if view.mix == 1 else None
            batch.append(compose_view(images[view.image_id], partner, view, size))
            if len(batch) == task.cfg.batch_size:
                outputs.append(_teacher_logits(teacher, normalize_fn, batch, device))
                batch = []
        if batch:
            outputs.append(_teacher_logits(teacher, normalize_fn, batch, device))
    finally:
        teacher.train(was_training)
    logits = torch.cat(outputs) if outputs else torch.empty(0, task.num_classes, dtype=torch.float16)
    views = list(task.views)
    if task.keep is not None:  # metric pruning: every view was scored, only the kept ones are stored
        kept = pruned_by_metric(task, views, logits)
        views, logits = [views[j] for j in kept], logits[kept]
    order, row_groups = epoch_order(views, Counter(v.image_id for v in views))
    table = records_to_table([views[j] for j in order], logits[order], task.num_classes, SAMPLER_VERSION,
                             task.cfg.topk, task.seeded)
    data = table_to_parquet(table, row_groups)
    writer = ShardWriter(store, LABELS_STAGE, task.shard)
    writer.put(LABELS_OBJECT, data)
    sizes = label_bytes(table)
    meta = {"records": table.num_rows, "schema_version": LABEL_SCHEMA_VERSION, "sampler_version": SAMPLER_VERSION,
            "logit_bytes": sizes["logits"], "index_bytes": sizes["index"], "aug_bytes": sizes["aug"],
            "parquet_bytes": len(data), "full_pool_bytes": full_pool_bytes(len(task.image_ids), task.cfg.epochs,
                                                                          task.num_classes),
            "inputs": task.inputs}
    writer.commit(task.seed, meta)
    log.info("relabelled %s: %d views of %d images in %.1fs (%d parquet bytes)", task.shard, table.num_rows,
             len(task.image_ids), time.time() - started, len(data))
    return meta
