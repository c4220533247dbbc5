"""Ray actors and tasks of the shard stages: each loads the teacher once and runs one unit of work from pipeline/."""

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
from lpld_ray.pipeline.shards import ClassShard
from lpld_ray.pipeline.teacher import evaluate_given_teacher
from lpld_ray.pipeline.units import load_images, recover_shard, squeeze_partition
from lpld_ray.store.storage import Store, storage_options

log = logging.getLogger(__name__)


@ray.remote
class ShardWorker:
    """Loads the teacher once, then does the class shards the driver hands it."""

    def __init__(self, store: Store, data: DataConfig, data_options: dict, num_classes: int, arch: str, state: bytes,
                 threads: int) -> None:
        torch.set_num_threads(threads)
        self.spec, self.data, self.data_options = image_spec(data), data, data_options
        self.store = store
        self.teacher = build_teacher(arch, state, num_classes, self.spec.channels, self.spec.size)
        self.device = next(self.teacher.parameters()).device
        self.real_train = None

    def pid(self) -> int:
        return os.getpid()

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
        from lpld_ray.method.views import image_id_of, plan_views, view_counts
        from lpld_ray.pipeline.labels import RelabelTask, relabel_shard

        counts = view_counts(num_classes * ipc, cfg.epochs, cfg.compression, seed)
        ids = [image_id_of(c, i, ipc) for c in shard.class_ids for i in range(ipc)]
        views = plan_views(seed, ids, counts, cfg, self.spec.size)
        task = RelabelTask(shard.name, tuple(ids), tuple(views), cfg, seed, num_classes, inputs)
        images = load_images(self.store, ipc, task.images_needed(), shards)
        return relabel_shard(self.store, self.teacher, lambda x: normalize(x, self.spec), images, task, self.device)


@ray.remote
def squeeze_task(part: ClassDataset, arch: str, state: bytes, batch_size: int, threads: int,
                 transform: str = "center", seed: int = 0, first: int = 0):
    torch.set_num_threads(threads)
    teacher = build_teacher(arch, state, part.num_classes, part.spec.channels, part.spec.size)
    return squeeze_partition(teacher, part, batch_size, transform, seed, first)


@ray.remote
def evaluate_teacher_task(data: DataConfig, data_options: dict, arch: str, state: bytes, batch_size: int,
                          threads: int) -> float:
    torch.set_num_threads(threads)
    return evaluate_given_teacher(data, data_options, arch, state, batch_size)


def shard_worker(cfg: Config, store: Store, state_ref: ray.ObjectRef, num_classes: int) -> Any:
    """A new shard actor: one GPU (or runner.cpus_per_worker CPUs), the teacher from the object store."""
    return ShardWorker.options(**actor_options(cfg.runner)).remote(
        store, cfg.data, data_options(cfg), num_classes, cfg.teacher.arch, state_ref,
        cfg.runner.cpus_per_worker)


def data_options(cfg: Config) -> dict:
    """fsspec options of the dataset's root (an ImageFolder on object storage), from the storage: section."""
    return storage_options(cfg.storage, cfg.data.root)
