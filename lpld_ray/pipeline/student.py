"""Student training on the distilled images and the pruned label pool: the loop each Ray Train worker runs."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from lpld_ray.config import DataConfig, TrainConfig
from lpld_ray.data.datasets import load_dataset
from lpld_ray.method.kd import SoftTargetKLLoss
from lpld_ray.method.training import (
    evaluate,
    make_optimizer,
    make_scheduler,
    train_epoch,
)
from lpld_ray.store.layout import STUDENT_STAGE

log = logging.getLogger(__name__)

STUDENT_SHARD = "model"
STUDENT_OBJECT = "student.pt"
CHECKPOINT_FILE = "state.pt"


@dataclass(frozen=True)
class StudentJob:
    """What one Ray Train run of the student needs: its sections, the run root and the seed."""

    data: DataConfig
    train: TrainConfig
    store_root: str
    storage_options: dict | None = field(repr=False)  # may hold credentials: never in a repr
    seed: int
    ipc: int
    inputs: str = ""
    data_options: dict | None = field(default=None, repr=False)  # of an object-storage data.root


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, checkpoint) -> int:
    """Load the latest Ray Train checkpoint, if any; returns the epoch to start from."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log.info("student: resuming from the checkpoint of epoch %d", state["epoch"])
    return int(state["epoch"])


def _checkpoint(folder: str, model: nn.Module, optimizer, scheduler, epoch: int):
    from ray.train import Checkpoint

    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch}
    torch.save(state, os.path.join(folder, CHECKPOINT_FILE))
    return Checkpoint.from_directory(folder)


def open_pool(store: "Store", ipc: int, size: int, cfg: TrainConfig, seed: int) -> "LabelPool":  # noqa: F821
    """The run's label pool as a per-epoch Dataset, with the image cache of ``cfg``."""
    from lpld_ray.data.pool import ImageSource, LabelPool, LabelShards

    images = ImageSource(store, ipc, cfg.image_cache_mb << 20)
    pool = LabelPool(LabelShards(store), images, size, sampling=cfg.view_sampling, seed=seed)
    log.info("label pool: %d images, index %d bytes", len(pool), pool.memory_bytes()["index"])
    return pool


def image_sampler(pool: "LabelPool", kind: str, world: int, rank: int, seed: int):  # noqa: F821
    """This rank's images per epoch: a global shuffle (DistributedSampler), or whole label shards per rank."""
    from lpld_ray.data.pool import ShardSampler

    if kind == "shard":
        return ShardSampler(pool.index.shard_of, world, rank, seed)
    return DistributedSampler(pool, num_replicas=world, rank=rank, shuffle=True, seed=seed)


def student_train_loop(job: StudentJob) -> None:
    """Per-worker loop under Ray Train: KD on the label pool, rank-0 checkpoints, every rank reports."""
    import ray.train
    import ray.train.torch

    from lpld_ray.method.models import build_model, save_weights_bytes
    from lpld_ray.store.manifest import ShardWriter
    from lpld_ray.store.storage import Store

    cfg = job.train
    torch.manual_seed(job.seed)
    test_set = load_dataset(job.data, "test", job.data_options)
    spec = test_set.spec
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.cpus_per_worker)
    store = Store(job.store_root, job.storage_options)
    pool = open_pool(store, job.ipc, spec.size, cfg, job.seed)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    sampler = image_sampler(pool, cfg.sampler, world, rank, job.seed)
    loader = DataLoader(pool, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.loader_workers)
    loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)
    student = build_model(cfg.arch, test_set.num_classes, spec.channels, spec.size).to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(student)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(loader))
    bare = model.module if hasattr(model, "module") else model
    start = _restore(bare, optimizer, scheduler, ray.train.get_checkpoint())
    loss_fn = SoftTargetKLLoss(cfg.temperature, cfg.label_smoothing)
    test_loader = DataLoader(test_set, batch_size=1000)
    started = time.time()
    for epoch in range(start, cfg.epochs):
        sampler.set_epoch(epoch)  # the same order whether or not the run was resumed
        pool.set_epoch(epoch, list(sampler))  # reads only this rank's records and images of this epoch
        loss = train_epoch(model, loader, loss_fn, optimizer, scheduler, spec, device)
        done = epoch + 1
        metrics = {"epoch": done, "loss": loss, "resumed_from": start}
        if done % cfg.eval_every == 0 or done == cfg.epochs:
            metrics["test_top1"] = evaluate(model, test_loader, spec, device)
            log.info("student epoch %d/%d loss %.4f test top-1 %.4f", done, cfg.epochs, loss, metrics["test_top1"])
        due_checkpoint = done % cfg.checkpoint_every == 0 or done == cfg.epochs
        if due_checkpoint or "test_top1" in metrics:  # every rank reports on the same epochs (a barrier)
            with tempfile.TemporaryDirectory(prefix="lpld-ckpt-") as folder:  # persisted by report, then dropped
                checkpoint = _checkpoint(folder, bare, optimizer, scheduler, done) if rank == 0 and due_checkpoint else None
                ray.train.report(metrics, checkpoint=checkpoint)
    if rank == 0:
        writer = ShardWriter(store, STUDENT_STAGE, STUDENT_SHARD)
        writer.put(STUDENT_OBJECT, save_weights_bytes(bare))
        writer.commit(job.seed, {"arch": cfg.arch, "epochs": cfg.epochs, "resumed_from": start, "inputs": job.inputs,
                                 "student_top1": evaluate(bare, test_loader, spec, device),
                                 "seconds": time.time() - started})
