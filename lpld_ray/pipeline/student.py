"""Student training on the distilled images and the pruned label pool: what the shared training loop needs of it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from lpld_ray.config import DataConfig, TrainConfig
from lpld_ray.data.datasets import load_dataset
from lpld_ray.data.label_shards import LabelShards
from lpld_ray.data.pool import ImageSource, LabelPool, ShardSampler
from lpld_ray.method.kd import SoftTargetKLLoss, TemperatureSchedule
from lpld_ray.method.models import build_model, save_weights_bytes
from lpld_ray.method.rng import sampler_seed
from lpld_ray.method.training import (
    EpochSchedule,
    TrainSetup,
    make_optimizer,
    make_scheduler,
    per_worker_batch,
)
from lpld_ray.pipeline.history import put_history
from lpld_ray.store.layout import STUDENT_STAGE
from lpld_ray.store.manifest import ShardWriter
from lpld_ray.store.storage import Store

log = logging.getLogger(__name__)

STUDENT_SHARD = "model"
STUDENT_OBJECT = "student.pt"


def open_pool(store: Store, ipc: int, size: int, cfg: TrainConfig, seed: int) -> LabelPool:
    """The run's label pool as a per-epoch Dataset, with the image cache of ``cfg``."""
    images = ImageSource(store, ipc, cfg.image_cache_mb << 20)
    pool = LabelPool(LabelShards(store), images, size, sampling=cfg.view_sampling, seed=seed)
    log.info("label pool: %d images, index %d bytes", len(pool), pool.memory_bytes()["index"])
    return pool


def kd_loss(cfg: TrainConfig) -> SoftTargetKLLoss:
    """The student's KD loss with the temperatures ``cfg`` asks for."""
    schedule = TemperatureSchedule(cfg.temperature, cfg.temperature_schedule, cfg.epochs, cfg.temperature_step,
                                   cfg.temperature_gamma, cfg.temperature_min)
    return SoftTargetKLLoss(cfg.temperature, cfg.label_smoothing, cfg.smoothing_on, cfg.t_squared, schedule,
                            cfg.student_temperature, cfg.calibrate_student_temperature)


def image_sampler(pool: LabelPool, kind: str, world: int, rank: int, seed: int) -> Sampler[int]:
    """This rank's images per epoch: a global shuffle (DistributedSampler), or whole label shards per rank."""
    if kind == "shard":
        return ShardSampler(pool.index.shard_of, world, rank, seed)
    return DistributedSampler(pool, num_replicas=world, rank=rank, shuffle=True, seed=sampler_seed(seed))


@dataclass(frozen=True)
class StudentJob:
    """One Ray Train run of the student (a TrainTask): its sections, the run root, the seed and what it learns from."""

    label: ClassVar[str] = "student"

    data: DataConfig
    train: TrainConfig
    store: Store  # its repr shows the root only
    seed: int
    ipc: int
    inputs: str = ""
    data_options: dict | None = field(default=None, repr=False)  # of an object-storage data.root

    @property
    def schedule(self) -> EpochSchedule:
        """Epochs, and how often the student evaluates and checkpoints."""
        return EpochSchedule.of(self.train)

    @property
    def threads(self) -> int:
        """Torch threads of a CPU worker."""
        return self.train.cpus_per_worker

    def setup(self, rank: int, world: int) -> TrainSetup:
        """This rank's part of the label pool per epoch, the real test set, the model and the KD loss."""
        cfg = self.train
        test_set = load_dataset(self.data, "test", self.data_options)
        spec = test_set.spec
        pool = open_pool(self.store, self.ipc, spec.size, cfg, self.seed)
        sampler = image_sampler(pool, cfg.sampler, world, rank, self.seed)
        batch = per_worker_batch(cfg.batch_size, world)  # train.batch_size is the global batch
        loader = DataLoader(pool, batch_size=batch, sampler=sampler, num_workers=cfg.loader_workers)

        loss = kd_loss(cfg)

        def set_epoch(epoch: int) -> None:
            sampler.set_epoch(epoch)
            pool.set_epoch(epoch, list(sampler))  # reads only this rank's records and images of this epoch
            loss.set_epoch(epoch)

        model = build_model(cfg.arch, test_set.num_classes, spec.channels, spec.size)
        return TrainSetup(model, loader, test_set, spec, loss, set_epoch, end_epoch=loss.end_epoch)

    def optimizer(self, model: nn.Module, steps_per_epoch: int) -> tuple[Optimizer, LRScheduler]:
        """AdamW or SGD, warm-up then cosine (the factor per batch or per epoch), stepped per batch."""
        optimizer = make_optimizer(model, self.train)
        return optimizer, make_scheduler(optimizer, self.train, steps_per_epoch)

    def commit(self, model: nn.Module, test_top1: float, resumed_from: int, seconds: float,
               history: list[dict] | None = None) -> None:
        """The train/model shard: the weights and the per-epoch history, then the manifest with the last test top-1
        and the inputs."""
        writer = ShardWriter(self.store, STUDENT_STAGE, STUDENT_SHARD)
        writer.put(STUDENT_OBJECT, save_weights_bytes(model))
        put_history(writer, history)
        writer.commit(self.seed, {"arch": self.train.arch, "epochs": self.train.epochs, "resumed_from": resumed_from,
                                  "inputs": self.inputs, "student_top1": test_top1, "seconds": seconds})
