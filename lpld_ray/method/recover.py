"""Synthesis (recover): optimise pixels against the teacher with per-group BN-statistics matching."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lpld_ray.config import RecoverConfig
from lpld_ray.method.augment import SynthAug
from lpld_ray.method.images import ImageSpec
from lpld_ray.method.rng import Stream, generator, torch_generator
from lpld_ray.method.squeeze import BNSums, bn_modules

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BNTarget:
    """Target mean and variance of every BN layer's input (float32 lists, one [C_l] per layer)."""

    means: tuple[torch.Tensor, ...]
    variances: tuple[torch.Tensor, ...]

    @staticmethod
    def rows_of(sums: BNSums) -> list["BNTarget"]:
        """One target per row (class) of the sums."""
        means, variances = sums.mean_var()
        rows = means[0].shape[0]
        return [
            BNTarget(tuple(m[k].float() for m in means), tuple(v[k].float() for v in variances))
            for k in range(rows)
        ]


BATCHING_CODES = {"class_wise": 0, "across_classes": 1}


@dataclass(frozen=True)
class Group:
    """Images whose BN statistics are matched together, with their labels, target, the run seed and the group's key:
    its draws come from the streams keyed by (seed, *key), so they do not depend on how groups are batched."""

    labels: tuple[int, ...]
    target: BNTarget
    seed: int
    key: tuple[int, ...]


def group_key(batching: str, *ids: int) -> tuple[int, ...]:
    """The key of a group: the batching's code, then the ids that name the group within it."""
    return (BATCHING_CODES[batching], *(int(i) for i in ids))


def class_wise_groups(class_ids: list[int], ipc: int, class_targets: list[BNTarget], run_seed: int) -> list[Group]:
    """LPLD: one group per class, all IPC images of it, matched to that class's statistics."""
    return [
        Group((c,) * ipc, target, int(run_seed), group_key("class_wise", c))
        for c, target in zip(class_ids, class_targets)
    ]


def across_class_groups(class_ids: list[int], ipc: int, global_target: BNTarget, run_seed: int) -> list[Group]:
    """SRe2L: group j holds image j of every class (of the shard starting at ``class_ids[0]``), matched to the
    global statistics."""
    first = class_ids[0]
    return [
        Group(tuple(class_ids), global_target, int(run_seed), group_key("across_classes", first, j))
        for j in range(ipc)
    ]


def bn_distance(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """||mu(x) - mean||_2 + ||var(x) - var||_2 over the batch and spatial dims of one BN input (in fp32)."""
    x = x.float()
    mu = x.mean(dim=(0, 2, 3))
    sigma2 = x.var(dim=(0, 2, 3), unbiased=False)
    return torch.norm(mu - mean, 2) + torch.norm(sigma2 - var, 2)


def group_losses(
    logits: torch.Tensor,
    bn_inputs: list[torch.Tensor],
    groups: list[Group],
    cfg: RecoverConfig,
) -> torch.Tensor:
    """Sum over groups of CE(teacher(aug(x_g)), y_g) + r_bn * sum_l w_l * bn_distance_l(x_g, target_g)."""
    total = logits.new_zeros(())
    start = 0
    for group in groups:
        stop = start + len(group.labels)
        labels = torch.tensor(group.labels, device=logits.device)
        loss = F.cross_entropy(logits[start:stop], labels)
        for l, x in enumerate(bn_inputs):
            weight = cfg.first_bn_multiplier if l == 0 else 1.0
            mean = group.target.means[l].to(x.device)
            var = group.target.variances[l].to(x.device)
            loss = loss + cfg.r_bn * weight * bn_distance(x[start:stop], mean, var)
        total = total + loss
        start = stop
    return total


def cosine_lr(base_lr: float, step: int, total: int) -> float:
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * step / total))


def initial_images(group: Group, shape: tuple[int, ...]) -> torch.Tensor:
    """The group's starting images [len(labels), *shape] ~ N(0, 1), from the stream (RECOVER_INIT, seed, *key)."""
    gen = torch_generator(Stream.RECOVER_INIT, group.seed, *group.key)
    return torch.randn((len(group.labels), *shape), generator=gen)


def group_generators(groups: list[Group]) -> list[np.random.Generator]:
    """One augmentation generator per group, keyed by (RECOVER_AUG, seed, *key): batching does not change the draws."""
    return [generator(Stream.RECOVER_AUG, g.seed, *g.key) for g in groups]


def recover_groups(
    teacher: nn.Module,
    groups: list[Group],
    cfg: RecoverConfig,
    spec: ImageSpec,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """Optimise all groups in one forward pass per iteration; returns per group images in [0, 1], on CPU."""
    teacher.eval().to(memory_format=torch.channels_last)  # as build_teacher gives it (~25% faster convolutions)
    for p in teacher.parameters():
        p.requires_grad_(False)
    gens = group_generators(groups)
    shape = (spec.channels, spec.size, spec.size)
    x = torch.cat([initial_images(g, shape) for g in groups])
    x = x.to(device, memory_format=torch.channels_last).requires_grad_(True)
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    low, high = (0 - mean) / std, (1 - mean) / std
    optimizer = torch.optim.Adam([x], lr=cfg.lr, betas=cfg.betas, eps=1e-8)
    bn_inputs: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, inp: bn_inputs.append(inp[0])) for m in bn_modules(teacher)]
    sizes = [len(g.labels) for g in groups]
    symmetric = cfg.jitter_range == "symmetric"
    try:
        for step in range(cfg.iterations):
            for pg in optimizer.param_groups:
                pg["lr"] = cosine_lr(cfg.lr, step, cfg.iterations)
            augs = [SynthAug.sample(gen, spec.size, cfg.crop_scale, cfg.flip, cfg.jitter, symmetric) for gen in gens]
            views = torch.cat([aug.apply(part) for aug, part in zip(augs, torch.split(x, sizes))])
            views = views.contiguous(memory_format=torch.channels_last)
            bn_inputs.clear()
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                logits = teacher(views)
            loss = group_losses(logits.float(), bn_inputs, groups, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, high), low))
            if step % max(1, cfg.iterations // 5) == 0:
                log.debug("recover step %d/%d loss %.4f", step, cfg.iterations, loss.item())
    finally:
        for h in hooks:
            h.remove()
    images = (x.detach() * std + mean).clamp(0, 1).cpu()
    return list(torch.split(images, sizes))
