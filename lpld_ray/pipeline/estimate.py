"""--plan: per-stage work units, image and label storage per compression, and peak memory per worker; no compute."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lpld_ray.config import Config, DataConfig
from lpld_ray.data.base import check_image_size, image_spec
from lpld_ray.errors import DataError
from lpld_ray.method.models import bn_layers, build_model
from lpld_ray.method.training import per_worker_batch
from lpld_ray.method.views import kept_views
from lpld_ray.pipeline.shards import plan_class_shards
from lpld_ray.store.label_table import MIN_ROW_GROUP_BYTES, label_schema, row_bytes

log = logging.getLogger(__name__)

GIB = 1 << 30
COMPRESSIONS = (1, 10, 20, 40, 100)
# Stored PNG bytes per pixel value of a synthetic image, measured on this project's Fashion-MNIST runs
# (66,041 B for 100 images of 28x28x1; docs/RESULTS.md). Synthetic ImageNet images are similarly high-frequency.
PNG_BYTES_PER_VALUE = 0.84
# JPEG at Pillow's default quality 75: the paper's ImageNet-1K IPC 200 images take about 3 GB for 200,000
# 224x224x3 images, about 0.1 B per value.
JPEG_BYTES_PER_VALUE = 0.1
KNOWN = {"fashion_mnist": (10, 1, 60_000), "digits": (10, 1, 1_437)}  # classes, channels, train images


@dataclass(frozen=True)
class DatasetShape:
    num_classes: int
    channels: int
    size: int
    train_images: int | None  # None when the tree is not reachable from this machine


@dataclass(frozen=True)
class PeakMemory:
    """fp32 bytes one worker holds at its peak: weights (+ grads and Adam state where trained) and activations."""

    recover: int
    relabel: int
    train: int


def dataset_shape(cfg: DataConfig) -> DatasetShape:
    """Classes and channels of the configured data, from its name, its tree if reachable, or data.num_classes."""
    check_image_size(cfg)
    if cfg.name in KNOWN:
        classes, channels, images = KNOWN[cfg.name]
        return DatasetShape(cfg.num_classes or classes, channels, image_spec(cfg).size, images)
    root = Path(cfg.root) / "train"
    if root.is_dir():
        folders = sorted(p for p in root.iterdir() if p.is_dir())[: cfg.num_classes]
        return DatasetShape(len(folders), 3, cfg.image_size, sum(sum(1 for _ in f.iterdir()) for f in folders))
    if cfg.num_classes is None:
        raise DataError(f"data.root '{cfg.root}' is not reachable here: set data.num_classes for --plan")
    return DatasetShape(cfg.num_classes, 3, cfg.image_size, None)


def human(size: float) -> str:
    """Bytes in binary units: 1536 -> '1.5 KiB' (the paper's GB figures match GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def label_record_parts(num_classes: int, topk: int | None = None, seeded: bool = False) -> dict[str, int]:
    """One stored view's bytes in the paper's terms: fp16 logits (all, or the top k), their class indices (top-k
    only) and the ids and augmentation parameters (none when ``seeded``), as the Parquet schema stores them."""
    parts = row_bytes(label_schema(num_classes, topk=topk))
    return {"logits": parts["logits"], "index": parts["classes"], "aug": 0 if seeded else parts["aug"]}


def label_record_bytes(num_classes: int, topk: int | None = None, seeded: bool = False) -> int:
    """One stored view: fp16 logits (all or the top k), their class indices and the augmentation parameters."""
    return sum(label_record_parts(num_classes, topk, seeded).values())


def label_records(num_images: int, epochs: int, compression: float) -> int:
    """Views kept at compression k, as lpld_ray.pipeline.labels.view_counts keeps them: round(N*E/k), at least one per image."""
    return max(num_images, kept_views(num_images, epochs, compression))


def label_bytes(num_images: int, epochs: int, compression: float, num_classes: int, topk: int | None = None,
                seeded: bool = False) -> int:
    """Label storage at compression k: one record per kept view."""
    return label_records(num_images, epochs, compression) * label_record_bytes(num_classes, topk, seeded)


def run_label_bytes(cfg: Config, num_images: int, num_classes: int, compression: float | None = None) -> int:
    """The label storage of this run's relabel settings (at ``compression``, else the run's own)."""
    r = cfg.relabel
    return label_bytes(num_images, r.epochs, r.compression if compression is None else compression, num_classes,
                       r.topk, r.params == "seeded")


def image_bytes(num_images: int, channels: int, size: int, image_format: str = "png") -> int:
    """Stored image bytes, from the bytes per pixel value measured (PNG) or reported by the paper (JPEG)."""
    per_value = JPEG_BYTES_PER_VALUE if image_format == "jpeg" else PNG_BYTES_PER_VALUE
    return round(num_images * channels * size * size * per_value)


@dataclass(frozen=True)
class LoaderMemory:
    """The label-pool loader's bound per training worker (lpld_ray.data.pool): nothing in it grows with E/k but the index."""

    index: int  # per image: id, shard, first row, view count, epoch slot (36 B); per stored view: its row (4 B)
    epoch_records: int  # this rank's N/W records of one epoch
    image_cache: int  # train.image_cache_mb
    batches: int  # float32 batches in flight: the one in use and two prefetched per DataLoader worker
    epoch_read: int  # while set_epoch runs: the Arrow copy of the records and one decoded row group

    @property
    def total(self) -> int:
        return self.index + self.epoch_records + self.image_cache + self.batches + self.epoch_read


def loader_memory(cfg: Config, shape: DatasetShape) -> LoaderMemory:
    images = shape.num_classes * cfg.recover.ipc
    views = label_records(images, cfg.relabel.epochs, cfg.relabel.compression)
    per_rank = -(-images // cfg.train.num_workers)
    sample = shape.channels * shape.size ** 2 * 4 + shape.num_classes * 4
    in_flight = 1 + 2 * cfg.train.loader_workers
    record = label_record_bytes(shape.num_classes, cfg.relabel.topk, cfg.relabel.params == "seeded")
    slot = cfg.runner.class_shard_size * cfg.recover.ipc * record  # one view slot of one class shard
    row_group = slot if slot >= MIN_ROW_GROUP_BYTES else slot + 2 * MIN_ROW_GROUP_BYTES  # small slots are merged
    return LoaderMemory(36 * images + 4 * views, per_rank * record, cfg.train.image_cache_mb << 20,
                        in_flight * per_worker_batch(cfg.train.batch_size, cfg.train.num_workers) * sample,
                        per_rank * record + row_group)


def activation_bytes(model: nn.Module, batch: int, channels: int, size: int) -> int:
    """fp32 bytes of every leaf module's output for one forward pass, from shapes only (meta tensors)."""
    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * 4

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.empty(batch, channels, size, size, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def peak_memory(cfg: Config, shape: DatasetShape) -> PeakMemory:
    """Per-worker estimate (no allocator overhead): activations kept for backward count twice (value and grad)."""
    with torch.device("meta"):
        teacher = build_model(cfg.teacher.arch, shape.num_classes, shape.channels, shape.size).eval()
        student = build_model(cfg.train.arch, shape.num_classes, shape.channels, shape.size)
    weights = lambda m: sum(p.numel() for p in m.parameters()) * 4  # noqa: E731
    rc, shard = cfg.recover, cfg.runner.class_shard_size
    pass_images = (rc.ipc * min(rc.classes_per_pass, shard) if rc.batching == "class_wise"
                   else shard * min(rc.classes_per_pass, rc.ipc))  # groups of one class / one image of each class
    pixels = pass_images * shape.channels * shape.size ** 2 * 4
    recover = weights(teacher) + 4 * pixels + 2 * activation_bytes(teacher, pass_images, shape.channels, shape.size)
    relabel = weights(teacher) + activation_bytes(teacher, cfg.relabel.batch_size, shape.channels, shape.size)
    batch = per_worker_batch(cfg.train.batch_size, cfg.train.num_workers)  # train.batch_size is global
    train = 4 * weights(student) + 2 * activation_bytes(student, batch, shape.channels, shape.size)
    return PeakMemory(recover, relabel, train)


@dataclass(frozen=True)
class RdedMemory:
    """What one shard actor holds at its peak for recover.source rded (lpld_ray.pipeline.units.rded_images): one
    class's candidates and crops at a time, one scoring batch, and the shard's stitched images until written."""

    teacher: int  # fp32 weights
    candidates: int  # rded.candidates decoded images of one class
    crops: int  # rded.crops crops of each, at size // factor
    scoring: int  # one padded batch of rded.batch_size crops and the teacher's activations for it (no grad)
    shard_images: int  # the shard's ipc images per class, kept until the shard is committed

    @property
    def total(self) -> int:
        return self.teacher + self.candidates + self.crops + self.scoring + self.shard_images


def rded_memory(cfg: Config, shape: DatasetShape) -> RdedMemory:
    """Per-actor peak for RDED: bounded by one class and one scoring batch, not by the dataset."""
    with torch.device("meta"):
        teacher = build_model(cfg.teacher.arch, shape.num_classes, shape.channels, shape.size).eval()
    rd, image = cfg.rded, shape.channels * shape.size ** 2 * 4
    patch = shape.channels * (shape.size // rd.factor) ** 2 * 4
    batch = min(rd.batch_size, rd.candidates * rd.crops)
    return RdedMemory(sum(p.numel() for p in teacher.parameters()) * 4, rd.candidates * image,
                      rd.candidates * rd.crops * patch,
                      batch * image + activation_bytes(teacher, batch, shape.channels, shape.size),
                      cfg.runner.class_shard_size * cfg.recover.ipc * image)


def squeeze_sum_bytes(cfg: Config, shape: DatasetShape) -> int:
    """One data partition's float64 sums (lpld_ray.method.squeeze.BNSums): per class and BN layer a count, and per channel
    a sum and a sum of squares. The driver holds two at a time while it adds them up."""
    with torch.device("meta"):
        layers = bn_layers(build_model(cfg.teacher.arch, shape.num_classes, shape.channels, shape.size))
    return 8 * shape.num_classes * (len(layers) + 2 * sum(layer.num_features for layer in layers))


def relabel_line(cfg: Config, shape: DatasetShape, shards: int) -> str:
    """The plan's relabel line: what one stored view costs, in the paper's terms."""
    parts = label_record_parts(shape.num_classes, cfg.relabel.topk, cfg.relabel.params == "seeded")
    kept = "every logit" if parts["index"] == 0 else f"the top {cfg.relabel.topk} logits"
    params = "seeded, not stored" if cfg.relabel.params == "seeded" else "stored"
    return (f"relabel: {shards} class shards, {cfg.relabel.epochs} epochs of views, {sum(parts.values()):,} B per "
            f"stored view ({kept}: logits {parts['logits']:,} B + class indices {parts['index']:,} B + "
            f"ids and augmentation parameters {parts['aug']:,} B, {params})")


def plan_lines(cfg: Config, shape: DatasetShape, actors: str) -> list[str]:
    """The human plan: work units per stage, storage per compression, memory per worker, actors."""
    shards = len(plan_class_shards(shape.num_classes, cfg.runner.class_shard_size))
    images = shape.num_classes * cfg.recover.ipc
    memory, loader = peak_memory(cfg, shape), loader_memory(cfg, shape)
    rd = rded_memory(cfg, shape) if cfg.recover.source == "rded" else None
    if rd is not None:
        memory = PeakMemory(rd.total, memory.relabel, memory.train)
    seen = "unknown here" if shape.train_images is None else f"{shape.train_images:,}"
    lines = [
        f"dataset: {shape.num_classes:,} classes, {shape.channels}x{shape.size}x{shape.size}, train images {seen}",
        f"teacher: {'given weights ' + cfg.teacher.weights if cfg.teacher.weights else f'{cfg.teacher.epochs} epochs with Ray Train'}",
        f"squeeze: {cfg.squeeze.partitions} data partitions -> {shards} class shards (+ global); "
        f"{human(squeeze_sum_bytes(cfg, shape))} of sums per partition, two held by the driver",
        f"recover: {shards} class shards of {cfg.runner.class_shard_size} classes, {images:,} images x "
        + (f"{cfg.rded.factor}x{cfg.rded.factor} crops (RDED: best of {cfg.rded.crops} crops of "
           f"{cfg.rded.candidates} real images per class)" if rd else f"{cfg.recover.iterations} iterations")
        + f"; images ~{human(image_bytes(images, shape.channels, shape.size, cfg.recover.image_format))} "
        f"({cfg.recover.image_format.upper()})",
        relabel_line(cfg, shape, shards),
    ]
    full = label_bytes(images, cfg.relabel.epochs, 1, shape.num_classes)  # the 1x pool of every logit
    for k in sorted({*COMPRESSIONS, cfg.relabel.compression}):
        size = run_label_bytes(cfg, images, shape.num_classes, k)
        mark = "  <- this run" if k == cfg.relabel.compression else ""
        lines.append(f"  labels at {k:g}x: {human(size)}, 1/{full / size:,.1f} of the full 1x pool{mark}")
    lines += [
        f"train: {cfg.train.epochs} epochs, {cfg.train.num_workers} Ray Train workers, global batch "
        f"{cfg.train.batch_size} ({per_worker_batch(cfg.train.batch_size, cfg.train.num_workers)} per worker), "
        f"{-(-images // cfg.train.batch_size):,} steps per epoch",
        f"peak memory per worker (fp32 estimate): recover {human(memory.recover)}, "
        f"relabel {human(memory.relabel)}, train {human(memory.train)}",
        *([f"recover (rded) per actor: {human(rd.total)} = teacher {human(rd.teacher)} + one class's candidates "
           f"{human(rd.candidates)} + their crops {human(rd.crops)} + a scoring batch {human(rd.scoring)} "
           f"+ the shard's images {human(rd.shard_images)}"] if rd else []),
        f"train loader per worker (bound): {human(loader.total)} = index {human(loader.index)} + one epoch's records "
        f"{human(loader.epoch_records)} + image cache {human(loader.image_cache)} + batches {human(loader.batches)} "
        f"+ while an epoch is read {human(loader.epoch_read)}",
        f"actors: {actors}",
    ]
    return lines
