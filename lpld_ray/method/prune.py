"""Metric-based pruning of the label pool (the LPLD paper's Table 5): score every view by the teacher, keep the best."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

METRICS = ("confidence", "diff", "diff_signed", "cut_ratio", "correct")


def view_scores(logits: Tensor, metric: str, image_class: Tensor, partner_class: Tensor, lam: Tensor) -> Tensor:
    """One score per view from its teacher logits [V, K] (p = softmax(logits)); higher is "easier".

    confidence: max p. diff: p1 - p2, the top two. diff_signed: p(image class) - p(CutMix partner class); a view
    without a partner (partner_class -1) uses the largest other class instead. cut_ratio: lambda, the image's share
    of a CutMix view (1 for other views). correct: 1 when the teacher's top-1 is the image's class, or for a CutMix
    view with a partner of another class, when its top-2 set is {image class, partner class}; else 0.
    """
    p = torch.softmax(logits.float(), dim=1)
    rows = torch.arange(len(p))
    if metric == "confidence":
        return p.max(dim=1).values
    top2 = p.topk(min(2, p.shape[1]), dim=1)
    if metric == "diff":
        return top2.values[:, 0] - (top2.values[:, 1] if p.shape[1] > 1 else 0)
    if metric == "cut_ratio":
        return lam.float()
    own = p[rows, image_class]
    mixed = (partner_class >= 0) & (partner_class != image_class)
    if metric == "diff_signed":
        others = p.clone()
        others[rows, image_class] = -1.0
        rival = torch.where(partner_class >= 0, p[rows, partner_class.clamp(min=0)], others.max(dim=1).values)
        return own - rival
    if metric == "correct":
        top1 = top2.indices[:, 0] == image_class
        pair = (top2.indices == image_class[:, None]).any(1) & (top2.indices == partner_class[:, None]).any(1)
        return torch.where(mixed, pair, top1).float()
    raise ValueError(f"unknown pruning metric {metric!r}: one of {', '.join(METRICS)}")


def select_views(scores: Tensor, image_ids: Sequence[int], view_ids: Sequence[int], keep: dict[int, int],
                 easy: bool = True) -> list[int]:
    """The positions of the views to keep: per image, its ``keep[image]`` views of highest (``easy``) or lowest
    score; ties go to the lower view_id (views are drawn independently, so that is a seeded random choice)."""
    by_image: dict[int, list[int]] = {}
    for position, image in enumerate(image_ids):
        by_image.setdefault(int(image), []).append(position)
    sign = -1.0 if easy else 1.0
    kept: list[int] = []
    for image, positions in by_image.items():
        ranked = sorted(positions, key=lambda j: (sign * float(scores[j]), int(view_ids[j])))
        kept += ranked[: keep[image]]
    return sorted(kept)
