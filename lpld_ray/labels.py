"""The pruned soft-label pool: per-image view counts, seeded views, and relabelling to Parquet records."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from lpld_ray.augment import CropBox, randint, resized_crop, sample_crop, uniform
from lpld_ray.config import RelabelConfig
from lpld_ray.errors import StorageError
from lpld_ray.manifest import Manifest, ShardWriter, current_shard, read_object, verify_shard
from lpld_ray.storage import Store

log = logging.getLogger(__name__)

LABELS_STAGE = "labels"
LABELS_OBJECT = "labels.parquet"
LABEL_SCHEMA_VERSION = 1
VERSION_KEY = b"lpld_label_schema_version"
NUM_CLASSES_KEY = b"num_classes"
MIX_CODES = {"none": 0, "cutmix": 1, "cutout": 2}
_VIEW_STREAM, DRAW_STREAM = 1, 2

__all__ = ["RelabelConfig", "ViewParams", "view_counts", "sample_view", "compose_view",
           "relabel_shard", "records_to_table", "epoch_order", "read_label_table", "read_label_shard", "label_bytes",
           "label_schema", "image_id_of"]


# ----------------------------------------------------------------------------- ids, counts, seeded streams


def image_id_of(class_id: int, index: int, ipc: int) -> int:
    """The run-wide image id: ``class_id * ipc + index``."""
    return int(class_id) * int(ipc) + int(index)


def stream_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by a hash of ``parts``: independent of batching, sharding and call order."""
    digest = hashlib.blake2b(b"".join(int(p).to_bytes(8, "little", signed=True) for p in parts), digest_size=8)
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1))
    return gen


def kept_views(num_images: int, epochs: int, compression: float) -> int:
    """round(N*E/k), halves rounded up: the views the pool keeps in all before the one-per-image floor."""
    return int(math.floor(num_images * epochs / compression + 0.5))


def view_counts(num_images: int, epochs: int, compression: float, seed: int) -> Tensor:
    """Views kept per image: round(N*E/k) in all, V // N each and one more for V % N images drawn from ``seed``.

    Every image keeps at least one view, so when k > E the pool holds N records, not round(N*E/k):
    label bytes are floored at one record per image.
    """
    if num_images < 1 or epochs < 1 or compression < 1:
        raise ValueError(f"view_counts needs num_images >= 1, epochs >= 1, compression >= 1; got {num_images}, {epochs}, {compression}")
    total = kept_views(num_images, epochs, compression)
    counts = torch.full((num_images,), total // num_images, dtype=torch.int64)
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    counts[torch.randperm(num_images, generator=gen)[: total % num_images]] += 1
    return counts.clamp_(min=1)


# ----------------------------------------------------------------------------- views


@dataclass(frozen=True)
class ViewParams:
    """Everything needed to rebuild one augmented view of one image, bit for bit."""

    image_id: int
    view_id: int
    crop: CropBox
    flip: bool
    mix: int  # 0 none, 1 cutmix, 2 cutout
    partner_id: int  # -1 unless cutmix
    partner_crop: CropBox | None
    partner_flip: bool
    mix_box: CropBox | None  # cutmix: pasted from the partner view; cutout: zeroed
    lam: float  # cutmix: 1 - box area / image area; 1.0 otherwise


def _gamma(gen: torch.Generator, a: float) -> float:
    """Gamma(a, 1) from ``gen``: exponential for a = 1, Marsaglia-Tsang otherwise (boosted for a < 1)."""
    if a == 1.0:
        return float(torch.empty(1).exponential_(generator=gen).item())
    if a < 1.0:
        return _gamma(gen, a + 1.0) * uniform(gen, 0.0, 1.0) ** (1.0 / a)
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = float(torch.randn(1, generator=gen).item())
        v = (1.0 + c * x) ** 3
        if v <= 0:
            continue
        u = uniform(gen, 0.0, 1.0)
        if u > 0 and math.log(u) < 0.5 * x * x + d - d * v + d * math.log(v):
            return d * v


def sample_beta(gen: torch.Generator, a: float) -> float:
    """Beta(a, a) as X / (X + Y) with X, Y ~ Gamma(a) drawn from ``gen``."""
    x, y = _gamma(gen, a), _gamma(gen, a)
    return x / (x + y) if x + y > 0 else 0.5


def _centered_box(gen: torch.Generator, size: int, cut: int) -> CropBox:
    """A cut x cut box with a uniform centre, clipped to the image (CutMix's rand_bbox)."""
    cy, cx = randint(gen, 0, size - 1), randint(gen, 0, size - 1)
    y1, y2 = max(cy - cut // 2, 0), min(cy + cut // 2, size)
    x1, x2 = max(cx - cut // 2, 0), min(cx + cut // 2, size)
    return CropBox(y1, x1, y2 - y1, x2 - x1)


def sample_view(seed: int, image_id: int, view_id: int, num_images: int, size: int, cfg: RelabelConfig) -> ViewParams:
    """The parameters of view ``view_id`` of ``image_id``, from a stream seeded by (seed, image_id, view_id)."""
    gen = stream_generator(_VIEW_STREAM, seed, image_id, view_id)
    crop = sample_crop(gen, size, size, cfg.crop_scale)
    flip = uniform(gen, 0.0, 1.0) < 0.5 and cfg.flip
    mix = MIX_CODES[cfg.mix]
    if mix == 1:
        partner = randint(gen, 0, num_images - 2) if num_images > 1 else image_id
        partner += int(num_images > 1 and partner >= image_id)
        partner_crop = sample_crop(gen, size, size, cfg.crop_scale)
        partner_flip = uniform(gen, 0.0, 1.0) < 0.5 and cfg.flip
        lam = sample_beta(gen, cfg.cutmix_beta)
        box = _centered_box(gen, size, int(size * math.sqrt(1.0 - lam)))
        lam = 1.0 - box.height * box.width / (size * size)
        return ViewParams(image_id, view_id, crop, flip, mix, partner, partner_crop, partner_flip, box, lam)
    box = _centered_box(gen, size, max(1, round(cfg.cutout_fraction * size))) if mix == 2 else None
    return ViewParams(image_id, view_id, crop, flip, mix, -1, None, False, box, 1.0)


def images_needed(seed: int, image_ids: list[int], counts: Tensor, cfg: RelabelConfig, size: int) -> set[int]:
    """The shard's own images and the CutMix partners of their kept views: all a relabel shard reads, so an actor's
    memory is bounded by the shard (at most images x (1 + views per image)), not by the dataset."""
    needed = set(image_ids)
    if MIX_CODES[cfg.mix] == 1:
        for image_id in image_ids:
            for view_id in range(int(counts[image_id])):
                needed.add(sample_view(seed, image_id, view_id, len(counts), size, cfg).partner_id)
    return needed


def _crop_flip(image: Tensor, box: CropBox, flip: bool, size: int) -> Tensor:
    out = resized_crop(image.unsqueeze(0), box, size)[0]
    return out.flip(-1) if flip else out


def compose_view(image: Tensor, partner: Tensor | None, view: ViewParams, size: int) -> Tensor:
    """The augmented [C,size,size] view: crop, resize, flip; then CutMix paste or Cutout zeroing.

    The one function used at relabel time and by :class:`lpld_ray.pool.LabelPool`; give it the decoded PNGs
    (CPU tensors in [0,1]) in both places and the views are bit-identical.
    """
    out = _crop_flip(image, view.crop, view.flip, size)
    box = view.mix_box
    if view.mix == 0 or box is None or box.height == 0 or box.width == 0:
        return out
    rows, cols = slice(box.top, box.top + box.height), slice(box.left, box.left + box.width)
    if view.mix == 1:
        if partner is None or view.partner_crop is None:
            raise ValueError(f"view {view.image_id}/{view.view_id} is a CutMix view: it needs its partner image {view.partner_id}")
        out[:, rows, cols] = _crop_flip(partner, view.partner_crop, view.partner_flip, size)[:, rows, cols]
    else:
        out[:, rows, cols] = 0.0
    return out


# ----------------------------------------------------------------------------- records


def label_schema(num_classes: int) -> pa.Schema:
    """The versioned Arrow schema of a label record; logits are fp16 (Parquet FLOAT16)."""
    box = pa.list_(pa.int16(), 4)
    fields = [
        ("image_id", pa.int64()), ("view_id", pa.int32()), ("crop", box), ("flip", pa.bool_()),
        ("mix", pa.int8()), ("partner_id", pa.int64()), ("partner_crop", box), ("partner_flip", pa.bool_()),
        ("mix_box", box), ("lam", pa.float32()), ("logits", pa.list_(pa.float16(), int(num_classes))),
    ]
    meta = {VERSION_KEY: str(LABEL_SCHEMA_VERSION).encode(), NUM_CLASSES_KEY: str(int(num_classes)).encode()}
    return pa.schema([pa.field(n, t, nullable=False) for n, t in fields], metadata=meta)


def _boxes(boxes: list[CropBox | None]) -> pa.Array:
    flat = np.array([[b.top, b.left, b.height, b.width] if b else [0, 0, 0, 0] for b in boxes], dtype=np.int16)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa.int16()), 4)


def records_to_table(views: list[ViewParams], logits: Tensor, num_classes: int) -> pa.Table:
    """One row per view, with the teacher's fp16 output [len(views), num_classes] for it."""
    if tuple(logits.shape) != (len(views), num_classes):
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not fit {len(views)} views x {num_classes} classes")
    flat = logits.detach().to("cpu", torch.float16).contiguous().numpy().reshape(-1)
    columns = [
        pa.array([v.image_id for v in views], pa.int64()), pa.array([v.view_id for v in views], pa.int32()),
        _boxes([v.crop for v in views]), pa.array([v.flip for v in views], pa.bool_()),
        pa.array([v.mix for v in views], pa.int8()), pa.array([v.partner_id for v in views], pa.int64()),
        _boxes([v.partner_crop for v in views]), pa.array([v.partner_flip for v in views], pa.bool_()),
        _boxes([v.mix_box for v in views]), pa.array([v.lam for v in views], pa.float32()),
        pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float16()), num_classes),
    ]
    return pa.Table.from_arrays(columns, schema=label_schema(num_classes))


def epoch_order(views: list[ViewParams], counts: Tensor) -> tuple[list[int], list[int]]:
    """Row order (by views of the image, view_id, image_id) and the row group sizes of equal (views, view_id):
    epoch e of view cycling uses view e % n of each image, so it reads one row group per distinct n of a shard."""
    keys = [(int(counts[v.image_id]), v.view_id) for v in views]
    order = sorted(range(len(views)), key=lambda j: (*keys[j], views[j].image_id))
    sizes: list[int] = []
    for previous, j in zip([None, *order], order):
        if previous is not None and keys[previous] == keys[j]:
            sizes[-1] += 1
        else:
            sizes.append(1)
    return order, sizes


def table_to_parquet(table: pa.Table, row_groups: list[int] | None = None) -> bytes:
    """Parquet bytes, zstd, with page checksums (range readers verify each page); ``row_groups``: their sizes."""
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema, compression="zstd", write_page_checksum=True) as writer:
        start = 0
        for size in row_groups if row_groups is not None else [table.num_rows]:
            if size:
                writer.write_table(table.slice(start, size), row_group_size=size)
            start += size
    return sink.getvalue().to_pybytes()


def check_label_schema(schema: pa.Schema, where: str = "label table") -> None:
    """StorageError unless ``schema`` carries the supported label schema version and a class count."""
    meta = schema.metadata or {}
    found = meta.get(VERSION_KEY, b"missing").decode("utf-8", "replace")
    if found != str(LABEL_SCHEMA_VERSION) or NUM_CLASSES_KEY not in meta:
        raise StorageError(f"{where} has label schema version {found}, which is not supported "
                           f"(supported: {LABEL_SCHEMA_VERSION}): re-run the relabel stage")


def current_labels(store: Store, shard: str, inputs: str) -> Manifest | None:
    """The labels shard's manifest when it verifies, was made from ``inputs`` and has this schema version; None: redo."""
    manifest = current_shard(store, LABELS_STAGE, shard, inputs)
    if manifest is not None and manifest.meta.get("schema_version") != LABEL_SCHEMA_VERSION:
        log.warning("labels/%s has label schema version %s, not %d; redoing it", shard,
                    manifest.meta.get("schema_version"), LABEL_SCHEMA_VERSION)
        return None
    return manifest


def read_label_table(data: bytes) -> pa.Table:
    """A label table from Parquet bytes; StorageError unless its schema version is the supported one."""
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        raise StorageError(f"label object is not a readable Parquet table: {str(err).splitlines()[0]}") from None
    check_label_schema(table.schema)
    return table


def read_label_shard(store: Store, shard: str) -> pa.Table:
    """The verified label table of one committed labels shard."""
    manifest = verify_shard(store, LABELS_STAGE, shard)
    if manifest is None:
        raise StorageError(f"labels shard '{shard}' is missing or does not verify: run the relabel stage")
    return read_label_table(read_object(store, LABELS_STAGE, shard, LABELS_OBJECT, manifest))


def num_classes_of(table: pa.Table) -> int:
    return int((table.schema.metadata or {})[NUM_CLASSES_KEY])


def aug_bytes_per_row(schema: pa.Schema) -> int:
    """Bytes of the non-logit columns of one row (ids and augmentation parameters; a bool counts as 1)."""
    total = 0
    for f in schema:
        if f.name == "logits":
            continue
        kind, width = (f.type.value_type, f.type.list_size) if pa.types.is_fixed_size_list(f.type) else (f.type, 1)
        total += max(1, kind.bit_width // 8) * width
    return total


def label_bytes(table: pa.Table) -> dict[str, int]:
    """Label storage in the paper's terms: fp16 logits, augmentation parameters, and their total."""
    rows = table.num_rows
    logits = rows * num_classes_of(table) * 2
    aug = rows * aug_bytes_per_row(table.schema)
    return {"logits": logits, "aug": aug, "total": logits + aug}


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
