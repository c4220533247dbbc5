"""Class-wise BatchNorm statistics: float64 sums of each BN layer's input per class (per-sample sums in float32)."""

from __future__ import annotations

import io
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn


@dataclass
class BNSums:
    """Per BN layer l and class k: element count, sum and sum of squares of the layer input per channel."""

    counts: list[torch.Tensor]  # [K] float64 per layer
    sums: list[torch.Tensor]  # [K, C_l] float64
    sumsqs: list[torch.Tensor]  # [K, C_l] float64

    @staticmethod
    def zeros(num_classes: int, channels: list[int]) -> "BNSums":
        f64 = torch.float64
        return BNSums(
            [torch.zeros(num_classes, dtype=f64) for _ in channels],
            [torch.zeros(num_classes, c, dtype=f64) for c in channels],
            [torch.zeros(num_classes, c, dtype=f64) for c in channels],
        )

    def __add__(self, other: "BNSums") -> "BNSums":
        return BNSums(
            [a + b for a, b in zip(self.counts, other.counts)],
            [a + b for a, b in zip(self.sums, other.sums)],
            [a + b for a, b in zip(self.sumsqs, other.sumsqs)],
        )

    def select(self, rows: list[int]) -> "BNSums":
        """The sums of the given classes (rows), in that order."""
        idx = torch.tensor(rows, dtype=torch.long)
        return BNSums([c[idx] for c in self.counts], [s[idx] for s in self.sums], [q[idx] for q in self.sumsqs])

    def total(self) -> "BNSums":
        """All classes pooled into one row: the global statistics (SRe2L's target)."""
        return BNSums(
            [c.sum(0, keepdim=True) for c in self.counts],
            [s.sum(0, keepdim=True) for s in self.sums],
            [q.sum(0, keepdim=True) for q in self.sumsqs],
        )

    def mean_var(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer, [K, C] mean and biased variance (float64)."""
        means, variances = [], []
        for count, s, q in zip(self.counts, self.sums, self.sumsqs):
            n = count.clamp_min(1.0).unsqueeze(1)
            mean = s / n
            means.append(mean)
            variances.append((q / n - mean * mean).clamp_min(0.0))
        return means, variances

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {}
        for l, (c, s, q) in enumerate(zip(self.counts, self.sums, self.sumsqs)):
            arrays[f"count_{l}"], arrays[f"sum_{l}"], arrays[f"sumsq_{l}"] = c.numpy(), s.numpy(), q.numpy()
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @staticmethod
    def from_bytes(data: bytes) -> "BNSums":
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            layers = len([k for k in npz.files if k.startswith("count_")])
            get = lambda name: torch.from_numpy(npz[name].astype(np.float64))  # noqa: E731
            return BNSums(
                [get(f"count_{l}") for l in range(layers)],
                [get(f"sum_{l}") for l in range(layers)],
                [get(f"sumsq_{l}") for l in range(layers)],
            )


def bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def accumulate_bn_sums(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int
) -> BNSums:
    """One eval-mode pass over (normalized images, labels): per-class sums of every BN layer's input."""
    layers = bn_modules(model)
    acc = BNSums.zeros(num_classes, [m.num_features for m in layers])
    labels_now: list[torch.Tensor] = []

    def hook_for(l: int):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            # per-sample sums over H*W in the input's dtype (a float64 reduction of the whole map costs 4x on a CPU),
            # accumulated across samples in float64
            x = inputs[0].detach()
            y = labels_now[0].cpu()
            per_sample_elems = torch.full((x.shape[0],), float(x[0, 0].numel()), dtype=torch.float64)
            acc.counts[l].index_add_(0, y, per_sample_elems)
            acc.sums[l].index_add_(0, y, x.sum((2, 3)).double().cpu())
            acc.sumsqs[l].index_add_(0, y, (x * x).sum((2, 3)).double().cpu())

        return hook

    handles = [m.register_forward_pre_hook(hook_for(l)) for l, m in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for images, labels in batches:
            labels_now[:] = [labels.to(device)]
            model(images.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return acc


def reduce_in_order(submit: Callable[[int], Any], count: int, window: int, get: Callable[[Any], Any],
                    on_part: Callable[[], None] = lambda: None) -> Any:
    """get(submit(0)) + ... + get(submit(count - 1)), added in index order (float sums come out the same on every
    run), with at most ``window`` parts submitted and not yet got."""
    submitted = deque(submit(i) for i in range(min(window, count)))
    total, next_index = None, len(submitted)
    while submitted:
        part = get(submitted.popleft())
        total = part if total is None else total + part
        on_part()
        if next_index < count:
            submitted.append(submit(next_index))
            next_index += 1
    return total
