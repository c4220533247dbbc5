"""Teacher training on the real data: the loop each Ray Train worker runs, and where the weights live."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader

from lpld_ray.config import DataConfig, TeacherConfig
from lpld_ray.data.datasets import load_dataset
from lpld_ray.errors import LpldError
from lpld_ray.method.training import evaluate, random_flip, train_epoch

if TYPE_CHECKING:
    from lpld_ray.store.storage import Store
from lpld_ray.store.layout import TEACHER_STAGE

log = logging.getLogger(__name__)

TEACHER_SHARD = "model"
TEACHER_OBJECT = "teacher.pt"
GIVEN_SHARD = "given"  # the test top-1 of user-given weights (teacher.weights)
GIVEN_OBJECT = "eval.json"


@dataclass(frozen=True)
class TeacherJob:
    """What one Ray Train run of the teacher needs: its sections, the run root and the seed."""

    data: DataConfig
    teacher: TeacherConfig
    store_root: str
    storage_options: dict | None = field(repr=False)  # may hold credentials: never in a repr
    seed: int
    data_options: dict | None = field(default=None, repr=False)  # of an object-storage data.root


def teacher_train_loop(job: TeacherJob) -> None:
    """Per-worker loop under Ray Train: SGD one-cycle; rank 0 commits the weights with a manifest."""
    import ray.train
    import ray.train.torch

    from lpld_ray.method.models import build_model, save_weights_bytes
    from lpld_ray.store.manifest import ShardWriter
    from lpld_ray.store.storage import Store

    torch.manual_seed(job.seed)
    cfg = job.teacher
    train_set, test_set = load_dataset(job.data, "train", job.data_options), load_dataset(job.data, "test", job.data_options)
    spec = train_set.spec
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.cpus_per_worker)
    train_loader = ray.train.torch.prepare_data_loader(
        DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=0)
    )
    test_loader = DataLoader(test_set, batch_size=1000)
    model = build_model(cfg.arch, train_set.num_classes, spec.channels, spec.size).to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * len(train_loader))
    rank = ray.train.get_context().get_world_rank()
    started = time.time()
    for epoch in range(cfg.epochs):
        if hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        loss = train_epoch(model, train_loader, nn.CrossEntropyLoss(), optimizer, scheduler, spec, device, random_flip)
        metrics = {"epoch": epoch + 1, "loss": loss}
        if epoch + 1 == cfg.epochs:
            metrics["test_top1"] = evaluate(model, test_loader, spec, device)
        log.info("teacher epoch %d/%d loss %.4f %s", epoch + 1, cfg.epochs, loss,
                 f"test top-1 {metrics['test_top1']:.4f}" if "test_top1" in metrics else "")
        if rank == 0 and epoch + 1 == cfg.epochs:
            bare = model.module if hasattr(model, "module") else model
            writer = ShardWriter(Store(job.store_root, job.storage_options), TEACHER_STAGE, TEACHER_SHARD)
            writer.put(TEACHER_OBJECT, save_weights_bytes(bare))
            writer.commit(job.seed, {"arch": cfg.arch, "test_top1": metrics["test_top1"],
                                     "epochs": cfg.epochs, "seconds": time.time() - started})
        ray.train.report(metrics)


def teacher_state_bytes(store: "Store", cfg: TeacherConfig, weights_options: dict | None = None) -> bytes:
    """The teacher's state dict bytes: the user's weights if given, else the run's verified teacher shard."""
    from lpld_ray.store.manifest import read_object, verify_shard
    from lpld_ray.store.storage import read_uri_bytes

    if cfg.weights:
        return read_uri_bytes(cfg.weights, weights_options)
    manifest = verify_shard(store, TEACHER_STAGE, TEACHER_SHARD)
    if manifest is None:
        raise LpldError("no teacher in the run and no teacher.weights given: run the teacher stage or set teacher.weights")
    return read_object(store, TEACHER_STAGE, TEACHER_SHARD, TEACHER_OBJECT, manifest)


def evaluate_given_teacher(data: DataConfig, data_options: dict | None, arch: str, state: bytes, batch_size: int) -> float:
    """Test top-1 of given teacher weights on the real test set, on the GPU when there is one."""
    from lpld_ray.method.models import build_teacher

    test_set = load_dataset(data, "test", data_options)
    spec = test_set.spec
    model = build_teacher(arch, state, test_set.num_classes, spec.channels, spec.size)
    device = next(model.parameters()).device
    return evaluate(model, DataLoader(test_set, batch_size=batch_size), spec, device)


def commit_given_teacher(store: "Store", test_top1: float, weights_sha: str, seed: int) -> None:
    """Record the given weights' test top-1 (and which weights: their sha256) as the teacher/given shard."""
    from lpld_ray.store.manifest import ShardWriter

    writer = ShardWriter(store, TEACHER_STAGE, GIVEN_SHARD)
    writer.put(GIVEN_OBJECT, json.dumps({"test_top1": test_top1, "weights_sha256": weights_sha}).encode())
    writer.commit(seed, {"test_top1": test_top1, "inputs": weights_sha})


def recorded_teacher_top1(store: "Store", weights_given: bool) -> float | None:
    """The teacher's test top-1 as the run recorded it: of the given weights, or of the teacher trained here."""
    from lpld_ray.store.manifest import read_manifest

    manifest = read_manifest(store, TEACHER_STAGE, GIVEN_SHARD if weights_given else TEACHER_SHARD)
    return manifest.meta.get("test_top1") if manifest else None
