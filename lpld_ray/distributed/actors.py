"""The shard actor: loads the teacher once, then runs the units of work of pipeline/ that the driver hands it."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
import torch

from lpld_ray.config import Config, DataConfig, RdedConfig, RecoverConfig, RelabelConfig
from lpld_ray.data.base import ClassDataset, image_spec
from lpld_ray.data.datasets import load_dataset
from lpld_ray.distributed.cluster import actor_options
from lpld_ray.method.models import build_teacher
from lpld_ray.method.squeeze import BNSums
from lpld_ray.pipeline.shards import ClassShard
from lpld_ray.pipeline.teacher import top1_on_test_set
from lpld_ray.pipeline.units import load_images, recover_shard, squeeze_partition
from lpld_ray.store.storage import Store, storage_options

log = logging.getLogger(__name__)


@ray.remote
class ShardWorker:
    """Loads the teacher once, then does what the driver hands it (one job's squeeze partitions, class shards and the
    given teacher's evaluation), stage after stage."""

    def __init__(self, store: Store, data: DataConfig, data_options: dict, num_classes: int, arch: str, state: bytes,
                 threads: int) -> None:
        torch.set_num_threads(threads)
        self.spec, self.data, self.data_options = image_spec(data), data, data_options
        self.store = store
        self.teacher = build_teacher(arch, state, num_classes, self.spec.channels, self.spec.size)
        self.device = next(self.teacher.parameters()).device
        self.real_train = None
        self.partner_manifests: tuple[str, dict] = ("", {})  # (relabel inputs digest, images manifests by shard)

    def pid(self) -> int:
        return os.getpid()

    def squeeze(self, part: ClassDataset, batch_size: int, transform: str, seed: int, first: int) -> BNSums:
        """The class-wise BN sums of one data partition (which starts at dataset index ``first``)."""
        return squeeze_partition(self.teacher, part, batch_size, transform, seed, first)

    def evaluate_teacher(self, batch_size: int) -> float:
        """The given teacher's top-1 on the real test set."""
        return top1_on_test_set(self.teacher, load_dataset(self.data, "test", self.data_options), batch_size)

    def recover(self, shard: ClassShard, cfg: RecoverConfig, seed: int, inputs: str, rded: RdedConfig | None = None
                ) -> dict:
        if cfg.source in ("real", "rded") and self.real_train is None:  # listed once per actor, not per shard
            self.real_train = load_dataset(self.data, "train", self.data_options)
        return recover_shard(self.store, self.teacher, self.spec, cfg, shard, seed, self.device, self.real_train, inputs,
                             rded)

    def relabel(self, shard: ClassShard, shards: list[ClassShard], cfg: RelabelConfig, ipc: int, num_classes: int,
                seed: int, inputs: str) -> dict:
        """One labels shard: every kept view of its images sampled once, then only its images and their views'
        CutMix partners read."""
        from lpld_ray.method.images import normalize
        from lpld_ray.method.views import image_id_of
        from lpld_ray.pipeline.labels import relabel_shard, relabel_task

        ids = [image_id_of(c, i, ipc) for c in shard.class_ids for i in range(ipc)]
        task = relabel_task(shard.name, ids, cfg, seed, ipc, num_classes, self.spec.size, inputs)
        if self.partner_manifests[0] != inputs:  # the digest covers every images manifest: a redone shard changes it
            self.partner_manifests = (inputs, {})
        images = load_images(self.store, ipc, task.images_needed(), shards, self.partner_manifests[1])
        return relabel_shard(self.store, self.teacher, lambda x: normalize(x, self.spec), images, task, self.device)


def shard_worker(cfg: Config, store: Store, state_ref: ray.ObjectRef, num_classes: int) -> Any:
    """A new shard actor: one GPU (or runner.cpus_per_worker CPUs), the teacher from the object store."""
    return ShardWorker.options(**actor_options(cfg.runner)).remote(
        store, cfg.data, data_options(cfg), num_classes, cfg.teacher.arch, state_ref,
        cfg.runner.cpus_per_worker)


def data_options(cfg: Config) -> dict:
    """fsspec options of the dataset's root (an ImageFolder on object storage), from the storage: section."""
    return storage_options(cfg.storage, cfg.data.root)
