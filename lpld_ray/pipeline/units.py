"""The work of one unit of each stage (squeeze partition, recover class shard) over the run's store; no Ray."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lpld_ray.config import RdedConfig, RecoverConfig
from lpld_ray.config_io import config_to_dict
from lpld_ray.data.base import ClassDataset
from lpld_ray.method.augment import squeeze_view
from lpld_ray.method.images import ImageSpec, normalize
from lpld_ray.method.rded import rded_class
from lpld_ray.method.recover import (
    BNTarget,
    across_class_groups,
    class_wise_groups,
    recover_groups,
)
from lpld_ray.method.rng import Stream, generator, torch_generator
from lpld_ray.method.squeeze import BNSums, accumulate_bn_sums
from lpld_ray.pipeline.shards import GLOBAL_SHARD, ClassShard
from lpld_ray.store.codecs import IMAGE_EXTENSIONS, decode_png, encode_image
from lpld_ray.store.layout import IMAGES_STAGE, STATS_STAGE, image_id_from_name, image_object_name
from lpld_ray.store.manifest import Manifest, ShardWriter, committed_manifest, current_shards, read_object
from lpld_ray.store.storage import Store

log = logging.getLogger(__name__)

STATS_OBJECT = "bn_sums.npz"


# ----------------------------------------------------------------------------- squeeze


def partition_start(size: int, partition: int, partitions: int) -> int:
    """The dataset index of the first sample of partition ``partition`` of ``partitions``."""
    return int(np.linspace(0, size, partitions + 1).astype(int)[partition])


def data_partition(dataset: ClassDataset, partition: int, partitions: int) -> ClassDataset:
    """Contiguous partition ``partition`` of ``partitions`` of a dataset (file lists are sliced, nothing is read)."""
    bounds = np.linspace(0, len(dataset), partitions + 1).astype(int)
    return dataset.subset(torch.arange(bounds[partition], bounds[partition + 1]))


class SqueezeViews(Dataset):
    """The squeeze transform's view of every image of a partition: RandomResizedCrop + flip of the source image,
    drawn from the stream (SQUEEZE_VIEW, seed, dataset index), so the sums do not depend on the partitioning."""

    def __init__(self, part: ClassDataset, seed: int, first: int) -> None:
        self.part, self.seed, self.first = part, int(seed), int(first)

    def __len__(self) -> int:
        return len(self.part)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        gen = generator(Stream.SQUEEZE_VIEW, self.seed, self.first + i)
        return squeeze_view(self.part.source_image(i), gen, self.part.spec.size), int(self.part.targets[i])


def squeeze_partition(teacher: nn.Module, part: ClassDataset, batch_size: int, transform: str = "center",
                      seed: int = 0, first: int = 0) -> BNSums:
    """Per-class BN sums over one partition of the real training set (which starts at dataset index ``first``):
    of the evaluation decode (``transform`` center) or of one seeded random resized crop + flip per image."""
    views = part if transform == "center" else SqueezeViews(part, seed, first)
    loader = DataLoader(views, batch_size=batch_size, shuffle=False)
    device = next(teacher.parameters()).device
    batches = ((normalize(x.to(device), part.spec), y) for x, y in loader)
    return accumulate_bn_sums(teacher, batches, part.num_classes)


def write_stats(store: Store, sums: BNSums, shards: list[ClassShard], seed: int, inputs: str = "",
                redo: set[str] | None = None) -> int:
    """Commit the stats of the shards in ``redo`` (class shards and the global row; None: every one not already
    committed for these ``inputs``, the teacher's digest)."""
    written = 0
    units = [(s.name, sums.select(list(s.class_ids)), list(s.class_ids)) for s in shards]
    units.append((GLOBAL_SHARD, sums.total(), []))
    if redo is None:
        done = current_shards(store, STATS_STAGE, {name: inputs for name, _, _ in units})
        redo = {name for name, manifest in done.items() if manifest is None}
    for name, part, classes in units:
        if name not in redo:
            continue
        writer = ShardWriter(store, STATS_STAGE, name)
        writer.put(STATS_OBJECT, part.to_bytes())
        writer.commit(seed, {"classes": classes, "inputs": inputs})
        written += 1
    return written


def load_stats(store: Store, name: str) -> BNSums:
    manifest = committed_manifest(store, STATS_STAGE, name, "squeeze")
    return BNSums.from_bytes(read_object(store, STATS_STAGE, name, STATS_OBJECT, manifest))


# ----------------------------------------------------------------------------- recover


def recover_shard(
    store: Store,
    teacher: nn.Module,
    spec: ImageSpec,
    cfg: RecoverConfig,
    shard: ClassShard,
    seed: int,
    device: torch.device | str = "cpu",
    real_train: ClassDataset | None = None,
    inputs: str = "",
    rded: RdedConfig | None = None,
) -> dict:
    """Synthesize (or pick real, or RDED-select and stitch real crops) IPC images per class of the shard; commit them
    once, encoded as ``recover.image_format`` says (relabel and the student both decode these objects), with ``inputs``
    (the digest of the stats or teacher they were made from) in the manifest."""
    started = time.time()
    classes = list(shard.class_ids)
    extra: dict = {}
    if cfg.source == "real":
        per_class = random_real_images(real_train, classes, cfg.ipc, seed)
    elif cfg.source == "rded":
        rded = rded or RdedConfig()
        per_class, losses = rded_images(real_train, teacher, spec, rded, classes, cfg.ipc, seed, device)
        extra = {"rded": config_to_dict(rded), "rded_mean_ce": losses}
    else:
        per_class = synthesize(store, teacher, spec, cfg, classes, shard, seed, device)
    writer = ShardWriter(store, IMAGES_STAGE, shard.name)
    ext = IMAGE_EXTENSIONS[cfg.image_format]
    for c in classes:
        for i, image in enumerate(per_class[c]):
            writer.put(image_object_name(c, i, ext), encode_image(image, cfg.image_format, cfg.jpeg_quality))
    seconds = time.time() - started
    meta = {"classes": classes, "ipc": cfg.ipc, "batching": cfg.batching, "statistics": cfg.statistics,
            "source": cfg.source, "image_format": cfg.image_format, "seconds": seconds, "inputs": inputs, **extra}
    writer.commit(seed, meta)
    return {"shard": shard.name, "seconds": seconds, "images": len(classes) * cfg.ipc}


def random_real_images(real_train: ClassDataset, classes: list[int], ipc: int, seed: int) -> dict[int, list[torch.Tensor]]:
    """The baseline: IPC random real training images per class, from the stream keyed by (REAL_IMAGES, seed, class)."""
    return {c: list(real_train.class_images(c, ipc, torch_generator(Stream.REAL_IMAGES, seed, c))) for c in classes}


def rded_images(
    real_train: ClassDataset, teacher: nn.Module, spec: ImageSpec, cfg: RdedConfig, classes: list[int], ipc: int,
    seed: int, device: torch.device | str,
) -> tuple[dict[int, list[torch.Tensor]], dict[str, float]]:
    """RDED's IPC stitched images per class, one class at a time: only that class's ``cfg.candidates`` real images
    (the stream keyed by (RDED_CANDIDATES, seed, class)) are read, so memory is bounded by one class. Also each
    class's mean CE over the crops it kept."""
    per_class, losses = {}, {}
    for c in classes:
        picked = real_train.class_indices(c, cfg.candidates, torch_generator(Stream.RDED_CANDIDATES, seed, c))
        candidates = [real_train.source_image(int(i)) for i in picked]  # as the official code, each file at its own size
        result = rded_class(teacher, candidates, c, ipc, cfg, spec, seed, device)
        per_class[c], losses[str(c)] = list(result.images), round(float(result.losses.mean()), 6)
    return per_class, losses


def synthesize(
    store: Store, teacher: nn.Module, spec: ImageSpec, cfg: RecoverConfig, classes: list[int], shard: ClassShard,
    seed: int, device: torch.device | str,
) -> dict[int, list[torch.Tensor]]:
    """Recover the shard's images, ``classes_per_pass`` groups per forward pass; the groups as ``recover.batching``
    says, matched to the BN statistics ``recover.statistics`` names (class_wise: each class's own; global)."""
    if cfg.statistics == "class_wise":
        class_targets = BNTarget.rows_of(load_stats(store, shard.name))
    else:
        class_targets = BNTarget.rows_of(load_stats(store, GLOBAL_SHARD)) * len(classes)
    if cfg.batching == "class_wise":
        groups = class_wise_groups(classes, cfg.ipc, class_targets, seed)
    else:
        groups = across_class_groups(classes, cfg.ipc, class_targets[0], seed)
    per_class: dict[int, list[torch.Tensor]] = {c: [] for c in classes}
    for start in range(0, len(groups), cfg.classes_per_pass):
        chunk = groups[start : start + cfg.classes_per_pass]
        for group, images in zip(chunk, recover_groups(teacher, chunk, cfg, spec, device)):
            for label, image in zip(group.labels, images):
                per_class[label].append(image)
    return per_class


def load_shard_images(store: Store, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of one committed images shard (each checked as read), as ([N,C,H,W] in [0,1], labels [N])."""
    manifest = committed_manifest(store, IMAGES_STAGE, name, "recover")
    names = sorted(e.name for e in manifest.objects)
    images = [decode_png(read_object(store, IMAGES_STAGE, name, n, manifest)) for n in names]
    labels = [int(n.split("_")[0]) for n in names]
    return torch.stack(images), torch.tensor(labels)


def load_images(store: Store, ipc: int, ids: set[int], shards: list[ClassShard],
                manifests: dict[str, Manifest] | None = None) -> dict[int, torch.Tensor]:
    """Only the images ``ids`` (run-wide ids), each object checked against its shard's manifest on read;
    ``manifests`` caches the images manifests read (valid while the images stage's digest is the same)."""
    manifests = {} if manifests is None else manifests
    wanted: dict[str, list[int]] = {}
    by_class = {c: s.name for s in shards for c in s.class_ids}
    for image_id in sorted(ids):
        wanted.setdefault(by_class[image_id // ipc], []).append(image_id)
    images: dict[int, torch.Tensor] = {}
    for name, shard_ids in wanted.items():
        if name not in manifests:
            manifests[name] = committed_manifest(store, IMAGES_STAGE, name, "recover")
        manifest = manifests[name]
        by_id = {image_id_from_name(e.name, ipc): e.name for e in manifest.objects}  # png or jpg, as written
        for image_id in shard_ids:
            obj = by_id.get(image_id, image_object_name(image_id // ipc, image_id % ipc))
            images[image_id] = decode_png(read_object(store, IMAGES_STAGE, name, obj, manifest))
    return images


