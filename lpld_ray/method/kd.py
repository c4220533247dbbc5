"""Knowledge-distillation loss of the student against stored teacher outputs (a module, as in timm's task/)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SoftTargetKLLoss(nn.Module):
    """KL(log_softmax(s/T) || p_t), batch mean, times T^2 when ``t_squared``: the student matches the stored teacher
    output t.

    p_t = softmax(t/T) without label smoothing. With smoothing eps ``on`` probabilities: (1 - eps) * softmax(t/T)
    + eps / K. On logits (the official ImageNet-21K-P student): softmax(((1 - eps) * t + eps / K) / T), which equals
    softmax((1 - eps) * t / T) since a constant added to every logit cancels: a teacher temperature of T / (1 - eps).
    """

    def __init__(self, temperature: float, label_smoothing: float = 0.0, on: str = "probabilities",
                 t_squared: bool = False) -> None:
        super().__init__()
        self.temperature, self.label_smoothing, self.on, self.t_squared = temperature, label_smoothing, on, t_squared

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t, eps = self.temperature, self.label_smoothing
        teacher_logits = teacher_logits.float()
        if eps and self.on == "logits":
            teacher_logits = (1 - eps) * teacher_logits + eps / teacher_logits.shape[1]
        target = F.softmax(teacher_logits / t, dim=1)
        if eps and self.on == "probabilities":
            target = (1 - eps) * target + eps / target.shape[1]
        loss = F.kl_div(F.log_softmax(student_logits / t, dim=1), target, reduction="batchmean")
        return loss * (t * t) if self.t_squared else loss
