"""The relabel unit: teacher outputs for every kept view of a class shard, committed as a Parquet labels shard."""

from __future__ import annotations

import logging
import time
from typing import Callable

import pyarrow as pa
import torch
from torch import Tensor, nn

from lpld_ray.config import RelabelConfig
from lpld_ray.errors import StorageError
from lpld_ray.method.views import ViewParams, compose_view, sample_view
from lpld_ray.store.label_table import (
    LABEL_SCHEMA_VERSION,
    epoch_order,
    label_bytes,
    read_label_table,
    records_to_table,
    table_to_parquet,
)
from lpld_ray.store.layout import LABELS_OBJECT, LABELS_STAGE
from lpld_ray.store.manifest import (
    Manifest,
    ShardWriter,
    current_shard,
    read_object,
    verify_shard,
)
from lpld_ray.store.storage import Store

log = logging.getLogger(__name__)






def current_labels(store: Store, shard: str, inputs: str) -> Manifest | None:
    """The labels shard's manifest when it verifies, was made from ``inputs`` and has this schema version; None: redo."""
    manifest = current_shard(store, LABELS_STAGE, shard, inputs)
    if manifest is not None and manifest.meta.get("schema_version") != LABEL_SCHEMA_VERSION:
        log.warning("labels/%s has label schema version %s, not %d; redoing it", shard,
                    manifest.meta.get("schema_version"), LABEL_SCHEMA_VERSION)
        return None
    return manifest


def read_label_shard(store: Store, shard: str) -> pa.Table:
    """The verified label table of one committed labels shard."""
    manifest = verify_shard(store, LABELS_STAGE, shard)
    if manifest is None:
        raise StorageError(f"labels shard '{shard}' is missing or does not verify: run the relabel stage")
    return read_label_table(read_object(store, LABELS_STAGE, shard, LABELS_OBJECT, manifest))


# ----------------------------------------------------------------------------- relabel


def _teacher_logits(teacher: nn.Module, normalize_fn: Callable[[Tensor], Tensor], batch: list[Tensor], device) -> Tensor:
    with torch.no_grad():
        out = teacher(normalize_fn(torch.stack(batch).to(device)))
    return out.detach().to("cpu", torch.float16)


def relabel_shard(
    store: Store,
    teacher: nn.Module,
    normalize_fn: Callable[[Tensor], Tensor],
    images: dict[int, Tensor],
    shard_image_ids: list[int],
    counts: Tensor,
    num_classes: int,
    cfg: RelabelConfig,
    seed: int,
    device: torch.device | str = "cpu",
    shard: str = "shard-00000",
    inputs: str = "",
) -> dict:
    """Teacher fp16 outputs for every kept view of the shard's images, committed as ``labels/<shard>/labels.parquet``.

    ``images`` holds every image of the run by id (CutMix partners come from any class), as decoded PNGs on
    the CPU; views are composed there and only the batch goes to ``device``.
    """
    started = time.time()
    size = int(next(iter(images.values())).shape[-1])
    was_training = teacher.training
    teacher.eval()
    views: list[ViewParams] = []
    outputs: list[Tensor] = []
    batch: list[Tensor] = []
    try:
        for image_id in shard_image_ids:
            for view_id in range(int(counts[image_id])):
                view = sample_view(seed, image_id, view_id, len(counts), size, cfg)
                partner = images[view.partner_id] if view.mix == 1 else None
                batch.append(compose_view(images[image_id], partner, view, size))
                views.append(view)
                if len(batch) == cfg.batch_size:
                    outputs.append(_teacher_logits(teacher, normalize_fn, batch, device))
                    batch = []
        if batch:
            outputs.append(_teacher_logits(teacher, normalize_fn, batch, device))
    finally:
        teacher.train(was_training)
    logits = torch.cat(outputs) if outputs else torch.empty(0, num_classes, dtype=torch.float16)
    order, row_groups = epoch_order(views, counts)
    table = records_to_table([views[j] for j in order], logits[order], num_classes)
    data = table_to_parquet(table, row_groups)
    writer = ShardWriter(store, LABELS_STAGE, shard)
    writer.put(LABELS_OBJECT, data)
    sizes = label_bytes(table)
    meta = {"records": table.num_rows, "schema_version": LABEL_SCHEMA_VERSION, "logit_bytes": sizes["logits"],
            "aug_bytes": sizes["aug"], "parquet_bytes": len(data), "inputs": inputs}
    writer.commit(seed, meta)
    log.info("relabelled %s: %d views of %d images in %.1fs (%d parquet bytes)", shard, table.num_rows,
             len(shard_image_ids), time.time() - started, len(data))
    return meta
