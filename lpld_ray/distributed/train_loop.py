"""The one Ray Train worker loop of the teacher and the student: restore, epochs, sharded evaluation, checkpoints."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ContextManager, Iterator, Protocol

import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Subset

from lpld_ray.distributed.ray_logs import quiet_train_worker
from lpld_ray.method.rng import Stream, torch_seed
from lpld_ray.method.training import (
    EpochSchedule,
    TrainSetup,
    evaluate_counts,
    rank_slice,
    train_epoch,
)

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"  # the name student checkpoints always had, so that older ones still resume


class TrainTask(Protocol):
    """What the teacher or the student supplies to the loop: its pieces, its optimizer and its commit."""

    label: str  # in log lines: "teacher", "student"
    seed: int

    @property
    def schedule(self) -> EpochSchedule: ...

    @property
    def threads(self) -> int: ...

    def setup(self, rank: int, world: int) -> TrainSetup: ...

    def optimizer(self, model: nn.Module, steps_per_epoch: int) -> tuple[torch.optim.Optimizer, Any]: ...

    def commit(self, model: nn.Module, test_top1: float, resumed_from: int, seconds: float,
               history: list[dict] | None = None) -> None: ...


@dataclass(frozen=True)
class WorkerEnv:
    """What the loop needs of its worker group: Ray Train's in train_task_loop, a plain one in tests."""

    rank: int
    world: int
    device: torch.device
    prepare_model: Callable[[nn.Module], nn.Module]
    prepare_loader: Callable[[DataLoader], DataLoader]
    latest_checkpoint: Callable[[], ContextManager[str | None]]  # the folder of the run's last checkpoint, or None
    report: Callable[[dict, str | None], None]  # metrics, and a folder to persist as a checkpoint (or None)
    all_reduce_sum: Callable[[torch.Tensor], None]  # in place, across the worker group


def save_state(folder: str, model: nn.Module, optimizer: Optimizer, scheduler: LRScheduler, epoch: int,
               test_top1: float | None, history: list[dict] | None = None, loss_fn: nn.Module | None = None) -> None:
    """Write the training state after ``epoch`` finished epochs (the last test top-1, the per-epoch history, the
    loss's own state such as a calibrated temperature) into ``folder``."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "epoch": epoch, "test_top1": test_top1, "history": list(history or []),
             "loss": loss_fn.state_dict() if loss_fn is not None else {}}
    torch.save(state, os.path.join(folder, CHECKPOINT_FILE))


def load_state(folder: str | None, model: nn.Module, optimizer: Optimizer, scheduler: LRScheduler,
               loss_fn: nn.Module | None = None) -> tuple[int, float | None, list[dict]]:
    """Load a checkpoint folder into the model, optimizer, scheduler and loss: (next epoch, 0-based; last test
    top-1; the history of the epochs before). No folder: (0, None, [])."""
    if folder is None:
        return 0, None, []
    state = torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if loss_fn is not None and state.get("loss"):  # older checkpoints and stateless losses have none
        loss_fn.load_state_dict(state["loss"])
    # older checkpoints lack test_top1 (students) or the history (both): it starts empty then
    return int(state["epoch"]), state.get("test_top1"), list(state.get("history") or [])


def sharded_top1(model: nn.Module, loader: DataLoader, setup: TrainSetup, env: WorkerEnv) -> float:
    """Test top-1 over every rank's slice: each counts its own, the counts are summed across the group."""
    correct, seen = evaluate_counts(model, loader, setup.spec, env.device)
    if env.world > 1:
        counts = torch.tensor([correct, seen], dtype=torch.int64, device=env.device)
        env.all_reduce_sum(counts)
        correct, seen = (int(v) for v in counts.tolist())
    return correct / max(seen, 1)


def run_task(task: TrainTask, env: WorkerEnv) -> None:
    """Train ``task`` from its last checkpoint to its last epoch; rank 0 then commits the weights with the test
    top-1 of the last evaluation (which the last epoch always does, once) and the per-epoch history."""
    torch.manual_seed(torch_seed(Stream.MODEL_INIT, task.seed))
    setup = task.setup(env.rank, env.world)
    model = env.prepare_model(setup.model.to(memory_format=torch.channels_last))
    bare = model.module if hasattr(model, "module") else model
    loader = env.prepare_loader(setup.train_loader)
    optimizer, scheduler = task.optimizer(model, len(loader))
    with env.latest_checkpoint() as folder:
        start, top1, history = load_state(folder, bare, optimizer, scheduler, setup.loss_fn)
    if start:
        log.info("%s: resuming from the checkpoint of epoch %d", task.label, start)
    schedule = task.schedule
    test_part = Subset(setup.test_set, rank_slice(len(setup.test_set), env.rank, env.world))
    test_loader = DataLoader(test_part, batch_size=setup.eval_batch_size)
    started = time.time()
    for epoch in range(start, schedule.epochs):
        epoch_started = time.time()
        setup.set_epoch(epoch)  # the same order whether or not the run was resumed
        loss = train_epoch(model, loader, setup.loss_fn, optimizer, scheduler, setup.spec, env.device, setup.augment)
        done = epoch + 1
        metrics = {"epoch": done, "loss": loss, "resumed_from": start}
        if setup.end_epoch is not None:  # e.g. the student's temperatures, calibrated across the group
            metrics.update(setup.end_epoch(env.all_reduce_sum if env.world > 1 else None))
        if schedule.evaluates(done):
            top1 = metrics["test_top1"] = sharded_top1(bare, test_loader, setup, env)
        history.append(epoch_record(metrics, time.time() - epoch_started))
        if env.rank == 0:
            per_epoch = (time.time() - started) / (done - start)
            log.info("%s epoch %d/%d loss %.4f%s | %.1f s/epoch, ETA %.0f s", task.label, done, schedule.epochs, loss,
                     f" test top-1 {top1:.4f}" if "test_top1" in metrics else "", per_epoch,
                     per_epoch * (schedule.epochs - done))
        if schedule.reports(done):  # every rank, on the same epochs: a report is a barrier
            saving = env.rank == 0 and schedule.checkpoints(done)
            _report(env, metrics, partial(save_state, model=bare, optimizer=optimizer, scheduler=scheduler,
                                          epoch=done, test_top1=top1, history=history, loss_fn=setup.loss_fn)
                    if saving else None)
    if top1 is None:  # resumed past the last epoch from a checkpoint that did not keep its top-1
        top1 = sharded_top1(bare, test_loader, setup, env)
    if env.rank == 0:
        task.commit(bare, test_top1=top1, resumed_from=start, seconds=time.time() - started, history=history)


def epoch_record(metrics: dict, seconds: float) -> dict:
    """One epoch of the history: its number, mean loss, test top-1 (on evaluated epochs), the KD temperatures (the
    student) and wall seconds."""
    record = {"epoch": int(metrics["epoch"]), "loss": float(metrics["loss"]), "seconds": round(seconds, 3)}
    for key in ("test_top1", "teacher_temperature", "student_temperature"):
        if key in metrics:
            record[key] = float(metrics[key])
    return record


def _report(env: WorkerEnv, metrics: dict, checkpoint: Callable[[str], None] | None) -> None:
    """One report of this rank; with ``checkpoint`` (rank 0 on checkpoint epochs) it writes a folder to persist."""
    if checkpoint is None:
        env.report(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix="lpld-ckpt-") as folder:  # persisted by report, then dropped
        checkpoint(folder)
        env.report(metrics, folder)


@contextmanager
def _ray_checkpoint_folder() -> Iterator[str | None]:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield folder


def _ray_report(metrics: dict, folder: str | None) -> None:
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)


def _all_reduce_sum(tensor: torch.Tensor) -> None:
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)


def ray_worker_env() -> WorkerEnv:
    """This Ray Train worker's rank, device and Ray Train calls."""
    context = ray.train.get_context()
    return WorkerEnv(
        rank=context.get_world_rank(), world=context.get_world_size(), device=ray.train.torch.get_device(),
        prepare_model=ray.train.torch.prepare_model,
        prepare_loader=lambda loader: ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False),
        latest_checkpoint=_ray_checkpoint_folder, report=_ray_report, all_reduce_sum=_all_reduce_sum,
    )


def train_task_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker: ``config["task"]`` trained on this worker's device and threads."""
    task: TrainTask = config["task"]
    quiet_train_worker()  # not a line per report and checkpoint: ours say each epoch
    env = ray_worker_env()
    if env.device.type == "cpu":
        torch.set_num_threads(task.threads)
    run_task(task, env)
