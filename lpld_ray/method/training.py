"""Plain torch training pieces shared by the teacher and the student: the epoch schedule, one epoch, evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lpld_ray.config import TeacherConfig, TrainConfig
from lpld_ray.method.images import ImageSpec, normalize


@dataclass(frozen=True)
class EpochSchedule:
    """Which finished epochs (1-based) evaluate, checkpoint and report: every ``*_every`` epochs and the last, once."""

    epochs: int
    eval_every: int
    checkpoint_every: int

    @classmethod
    def of(cls, section: TeacherConfig | TrainConfig) -> EpochSchedule:
        """The schedule a teacher or train config section asks for."""
        return cls(section.epochs, section.eval_every, section.checkpoint_every)

    def evaluates(self, done: int) -> bool:
        """Test top-1 after epoch ``done``."""
        return done % self.eval_every == 0 or done == self.epochs

    def checkpoints(self, done: int) -> bool:
        """A checkpoint (rank 0) after epoch ``done``."""
        return done % self.checkpoint_every == 0 or done == self.epochs

    def reports(self, done: int) -> bool:
        """Every rank reports after epoch ``done`` (a barrier): when it evaluates or checkpoints."""
        return self.evaluates(done) or self.checkpoints(done)


@dataclass(frozen=True)
class TrainSetup:
    """One worker's pieces of a training run, as the teacher or the student builds them; the loop does the rest."""

    model: nn.Module  # bare, on the CPU
    train_loader: DataLoader  # this rank's batches: its sampler already splits the data by rank
    test_set: Dataset  # the whole test set: each rank evaluates its slice (rank_slice)
    spec: ImageSpec
    loss_fn: nn.Module
    set_epoch: Callable[[int], None]  # before each epoch (0-based): samplers, label pool
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    eval_batch_size: int = 1000
    end_epoch: Callable[[Callable[[torch.Tensor], None] | None], dict] | None = None  # after each epoch: metrics


def per_worker_batch(batch_size: int, world: int) -> int:
    """Each of ``world`` workers' share of the global ``batch_size``; ValueError when it does not divide evenly."""
    if world < 1 or batch_size % world:
        raise ValueError(f"global batch {batch_size} does not split evenly over {world} workers: use a multiple of {world}")
    return batch_size // world


def rank_slice(n: int, rank: int, world: int) -> range:
    """The contiguous part of ``range(n)`` that ``rank`` of ``world`` handles; the parts cover it once."""
    return range(n * rank // world, n * (rank + 1) // world)


def random_flip(x: torch.Tensor) -> torch.Tensor:
    """Flip each image of a [B,C,H,W] batch horizontally with probability 1/2."""
    mask = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    spec: ImageSpec,
    device: torch.device,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """One pass over (unnormalized images, targets) batches, stepping the schedule per batch; mean loss."""
    model.train()
    total, seen = 0.0, 0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        if augment is not None:
            images = augment(images)
        loss = loss_fn(model(normalize(images, spec)), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * images.shape[0]
        seen += images.shape[0]
    return total / max(seen, 1)


@torch.no_grad()
def evaluate_counts(model: nn.Module, loader: DataLoader, spec: ImageSpec, device: torch.device) -> tuple[int, int]:
    """(correct, seen) top-1 counts on a loader of (unnormalized images, labels): sums over slices add up."""
    model.eval()
    correct, seen = 0, 0
    for images, labels in loader:
        logits = model(normalize(images.to(device), spec))
        correct += int((logits.argmax(1).cpu() == labels).sum().item())
        seen += labels.numel()
    return correct, seen


def evaluate(model: nn.Module, loader: DataLoader, spec: ImageSpec, device: torch.device) -> float:
    """Top-1 accuracy on a loader of (unnormalized images, labels), in one process."""
    correct, seen = evaluate_counts(model, loader, spec, device)
    return correct / max(seen, 1)


def param_groups(model: nn.Module, weight_decay: float, on: str = "all") -> list[dict]:
    """Optimizer parameter groups: ``on`` all: one group with ``weight_decay``; weights: decay only on parameters
    with 2 or more dimensions (conv and linear weights), none on BN parameters and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    if on == "all":
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The student's optimizer: AdamW or SGD with momentum, weight decay on the parameters ``cfg`` says."""
    groups = param_groups(model, cfg.weight_decay, cfg.weight_decay_on)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, warmup: int, warmup_start: float | None) -> float:
    """The learning-rate factor at ``step`` of ``total``: linear warm-up over the first ``warmup`` steps, then
    cosine to zero over the rest. Warm-up: (step + 1) / warmup when ``warmup_start`` is None, else torch's LinearLR
    from ``warmup_start``: s + (1 - s) * step / warmup. Cosine: 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))."""
    if step < warmup:
        if warmup_start is None:
            return (step + 1) / warmup
        return warmup_start + (1 - warmup_start) * step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up for ``warmup_epochs``, then cosine to zero; stepped per batch, the factor changing every batch
    (``lr_step`` batch) or once per epoch (epoch: the official recipes' per-epoch schedule)."""
    if cfg.lr_step == "epoch":
        steps = max(1, steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step // steps, cfg.epochs, cfg.warmup_epochs, cfg.warmup_start))
    warmup, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, cfg.warmup_start))
