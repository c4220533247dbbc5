"""Plain torch training pieces shared by the teacher and the student: one epoch, evaluation, flips."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from lpld_ray.config import TrainConfig
from lpld_ray.method.images import ImageSpec, normalize


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
def evaluate(model: nn.Module, loader: DataLoader, spec: ImageSpec, device: torch.device) -> float:
    """Top-1 accuracy on a loader of (unnormalized images, labels)."""
    model.eval()
    correct, seen = 0, 0
    for images, labels in loader:
        logits = model(normalize(images.to(device), spec))
        correct += (logits.argmax(1).cpu() == labels).sum().item()
        seen += labels.numel()
    return correct / max(seen, 1)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for ``warmup_epochs``, then cosine to zero, stepped per batch."""
    warmup, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
