"""Knowledge-distillation loss of the student against stored teacher outputs (a module, as in timm's task/)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SoftTargetKLLoss(nn.Module):
    """KL(log_softmax(s/T) || softmax(t/T)), batch mean: the student matches the stored teacher output.

    With ``label_smoothing`` eps the target is (1 - eps) * softmax(t/T) + eps / K.
    """

    def __init__(self, temperature: float, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.temperature, self.label_smoothing = temperature, label_smoothing

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t, eps = self.temperature, self.label_smoothing
        target = F.softmax(teacher_logits / t, dim=1)
        if eps:
            target = (1 - eps) * target + eps / target.shape[1]
        return F.kl_div(F.log_softmax(student_logits / t, dim=1), target, reduction="batchmean")
