"""The teacher trained on the real data: what the shared training loop needs of it, and where the weights live."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, DistributedSampler

from lpld_ray.config import DataConfig, TeacherConfig
from lpld_ray.data.base import ClassDataset
from lpld_ray.data.datasets import load_dataset
from lpld_ray.errors import LpldError
from lpld_ray.method.models import build_model, save_weights_bytes
from lpld_ray.method.rng import sampler_seed
from lpld_ray.method.training import EpochSchedule, TrainSetup, evaluate, per_worker_batch, random_flip
from lpld_ray.pipeline.history import put_history
from lpld_ray.store.layout import TEACHER_STAGE
from lpld_ray.store.manifest import (
    ShardWriter,
    read_manifest,
    read_object,
)
from lpld_ray.store.storage import Store, read_uri_bytes

log = logging.getLogger(__name__)

TEACHER_SHARD = "model"
TEACHER_OBJECT = "teacher.pt"
GIVEN_SHARD = "given"  # the test top-1 of user-given weights (teacher.weights)
GIVEN_OBJECT = "eval.json"
RUN_KEY_FIELDS = ("arch", "epochs", "batch_size", "lr", "weight_decay")  # of the teacher section: what it learns


def teacher_run_key(data: DataConfig, teacher: TeacherConfig, seed: int) -> str:
    """sha256 of what a trained teacher is made from (the data section, the seed, its schedule): the same key
    names the same Ray Train run, so a killed teacher resumes from its checkpoints; other inputs start afresh."""
    doc = {"data": data.model_dump(), "seed": seed,
           "teacher": {k: getattr(teacher, k) for k in RUN_KEY_FIELDS}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class TeacherJob:
    """One Ray Train run of the teacher (a TrainTask): its sections, the run root and the seed."""

    label: ClassVar[str] = "teacher"

    data: DataConfig
    teacher: TeacherConfig
    store: Store  # its repr shows the root only
    seed: int
    data_options: dict | None = field(default=None, repr=False)  # of an object-storage data.root

    @property
    def schedule(self) -> EpochSchedule:
        """Epochs, and how often the teacher evaluates and checkpoints."""
        return EpochSchedule.of(self.teacher)

    @property
    def threads(self) -> int:
        """Torch threads of a CPU worker."""
        return self.teacher.cpus_per_worker

    @property
    def run_key(self) -> str:
        """Names the Ray Train run: see teacher_run_key."""
        return teacher_run_key(self.data, self.teacher, self.seed)

    def setup(self, rank: int, world: int) -> TrainSetup:
        """The real train set split across ranks (a seeded shuffle per epoch), the test set, the model, CE loss."""
        train_set = load_dataset(self.data, "train", self.data_options)
        test_set = load_dataset(self.data, "test", self.data_options)
        spec = train_set.spec
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=sampler_seed(self.seed))
        batch = per_worker_batch(self.teacher.batch_size, world)  # teacher.batch_size is the global batch
        loader = DataLoader(train_set, batch_size=batch, sampler=sampler, drop_last=True)
        model = build_model(self.teacher.arch, train_set.num_classes, spec.channels, spec.size)
        return TrainSetup(model, loader, test_set, spec, nn.CrossEntropyLoss(), sampler.set_epoch, random_flip)

    def optimizer(self, model: nn.Module, steps_per_epoch: int) -> tuple[Optimizer, LRScheduler]:
        """SGD (Nesterov) with a one-cycle schedule over all epochs, stepped per batch."""
        cfg = self.teacher
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay,
                                    nesterov=True)
        total = cfg.epochs * steps_per_epoch
        if total < 1:
            raise LpldError(f"teacher.batch_size {cfg.batch_size} leaves no batch per worker: use a smaller one")
        return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)

    def commit(self, model: nn.Module, test_top1: float, resumed_from: int, seconds: float,
               history: list[dict] | None = None) -> None:
        """The teacher/model shard: the weights and the per-epoch history, then the manifest with the last test top-1."""
        writer = ShardWriter(self.store, TEACHER_STAGE, TEACHER_SHARD)
        writer.put(TEACHER_OBJECT, save_weights_bytes(model))
        put_history(writer, history)
        writer.commit(self.seed, {"arch": self.teacher.arch, "test_top1": test_top1, "epochs": self.teacher.epochs,
                                  "resumed_from": resumed_from, "seconds": seconds})


def teacher_state_bytes(store: Store, cfg: TeacherConfig, weights_options: dict | None = None) -> bytes:
    """The teacher's state dict bytes: the user's weights if given, else the run's teacher shard (checked as read)."""
    if cfg.weights:
        return read_uri_bytes(cfg.weights, weights_options)
    manifest = read_manifest(store, TEACHER_STAGE, TEACHER_SHARD)
    if manifest is None:
        raise LpldError("no teacher in the run and no teacher.weights given: run the teacher stage or set teacher.weights")
    return read_object(store, TEACHER_STAGE, TEACHER_SHARD, TEACHER_OBJECT, manifest)


def top1_on_test_set(model: nn.Module, test_set: ClassDataset, batch_size: int) -> float:
    """Top-1 of ``model`` on ``test_set``, on the model's device."""
    device = next(model.parameters()).device
    return evaluate(model, DataLoader(test_set, batch_size=batch_size), test_set.spec, device)


def commit_given_teacher(store: Store, test_top1: float, weights_sha: str, seed: int) -> None:
    """Record the given weights' test top-1 (and which weights: their sha256) as the teacher/given shard."""
    writer = ShardWriter(store, TEACHER_STAGE, GIVEN_SHARD)
    writer.put(GIVEN_OBJECT, json.dumps({"test_top1": test_top1, "weights_sha256": weights_sha}).encode())
    writer.commit(seed, {"test_top1": test_top1, "inputs": weights_sha})


def recorded_teacher_top1(store: Store, weights_given: bool) -> float | None:
    """The teacher's test top-1 as the run recorded it: of the given weights, or of the teacher trained here."""
    manifest = read_manifest(store, TEACHER_STAGE, GIVEN_SHARD if weights_given else TEACHER_SHARD)
    return manifest.meta.get("test_top1") if manifest else None
