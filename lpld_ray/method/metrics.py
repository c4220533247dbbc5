"""Measures of a distilled set: within-class diversity of the teacher's penultimate features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lpld_ray.method.images import ImageSpec, normalize
from lpld_ray.method.models import penultimate_features


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean cosine similarity over all distinct pairs of rows of a [N, D] matrix (N >= 2)."""
    unit = F.normalize(features.double(), dim=1)
    sim = unit @ unit.T
    n = unit.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


@torch.no_grad()
def within_class_cosine(teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, spec: ImageSpec) -> dict[int, float]:
    """Per class, the mean pairwise cosine similarity of the teacher's penultimate features of its images."""
    teacher.eval()
    feats = penultimate_features(teacher, normalize(images, spec))
    return {int(c): mean_pairwise_cosine(feats[labels == c]) for c in labels.unique() if (labels == c).sum() >= 2}
