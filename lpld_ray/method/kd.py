"""Knowledge-distillation loss of the student against stored teacher outputs (a module, as in timm's task/)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

CALIBRATION_GRID = torch.linspace(0.01, 1.0, 100)  # LPQLD's candidate student temperatures


@dataclass(frozen=True)
class TemperatureSchedule:
    """The teacher temperature per epoch e (1-based, as LPQLD counts): constant T; step: max(minimum, T * gamma **
    floor(e / step)); cosine: minimum + (T - minimum) * (1 + cos(pi * e / epochs)) / 2."""

    base: float
    kind: str = "constant"
    epochs: int = 1
    step: int = 30
    gamma: float = 0.7
    minimum: float = 2.0

    def at(self, epoch: int) -> float:
        """The teacher temperature of epoch ``epoch`` (1-based)."""
        if self.kind == "step":
            return max(self.minimum, self.base * self.gamma ** (epoch // self.step))
        if self.kind == "cosine":
            return self.minimum + 0.5 * (self.base - self.minimum) * (1 + math.cos(math.pi * epoch / self.epochs))
        return self.base


def soft_target(teacher_logits: torch.Tensor, temperature: float, label_smoothing: float = 0.0,
                on: str = "probabilities") -> torch.Tensor:
    """The KD target softmax(t / T) of stored teacher outputs t. Classes a top-k record did not keep are -inf, so
    they get probability 0 (LPQLD's MR-k: the softmax over the kept values, scattered into zeros). Smoothing eps on
    probabilities: (1 - eps) * p + eps / K; on logits (the official ImageNet-21K-P student): softmax(((1 - eps) * t +
    eps / K) / T), which equals softmax((1 - eps) * t / T) since a constant added to every logit cancels."""
    teacher_logits, eps = teacher_logits.float(), label_smoothing
    if eps and on == "logits":
        teacher_logits = (1 - eps) * teacher_logits + eps / teacher_logits.shape[1]
    target = F.softmax(teacher_logits / temperature, dim=1)
    if eps and on == "probabilities":
        target = (1 - eps) * target + eps / target.shape[1]
    return target


def kd_kl(student_logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(target || softmax(s / T)), batch mean (torch's kl_div: a target of 0 adds nothing)."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), target, reduction="batchmean")


def calibration_losses(student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The KD loss of one batch at every candidate student temperature of CALIBRATION_GRID."""
    with torch.no_grad():
        return torch.stack([kd_kl(student_logits.float(), target, float(t)) for t in CALIBRATION_GRID])


class SoftTargetKLLoss(nn.Module):
    """KL(soft_target(t, T_teacher) || softmax(s / T_student)), batch mean, times T_teacher^2 when ``t_squared``: the
    student matches the stored teacher output t.

    The teacher temperature follows ``schedule`` (set_epoch); the student's is the teacher's unless fixed
    (``student_temperature``) or calibrated (LPQLD): after each epoch, end_epoch sets it to the candidate of
    CALIBRATION_GRID whose loss on the epoch's last batch is lowest, for the next epoch. The calibrated value is a
    buffer, so that it is saved and restored with the loss's state_dict.
    """

    def __init__(self, temperature: float, label_smoothing: float = 0.0, on: str = "probabilities",
                 t_squared: bool = False, schedule: TemperatureSchedule | None = None,
                 student_temperature: float | None = None, calibrate: bool = False) -> None:
        super().__init__()
        self.label_smoothing, self.on, self.t_squared, self.calibrate = label_smoothing, on, t_squared, calibrate
        self.schedule = schedule or TemperatureSchedule(temperature)
        self.teacher_temperature = self.schedule.at(1)
        self.fixed_student = student_temperature
        start = student_temperature if student_temperature is not None else 1.0
        self.register_buffer("calibrated", torch.tensor(float(start), dtype=torch.float64))
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def student_temperature(self) -> float:
        """The student temperature of the current epoch."""
        if self.calibrate:
            return float(self.calibrated)
        return self.teacher_temperature if self.fixed_student is None else self.fixed_student

    def set_epoch(self, epoch: int) -> None:
        """Before 0-based epoch ``epoch``: the teacher temperature of its 1-based number."""
        self.teacher_temperature = self.schedule.at(epoch + 1)

    def end_epoch(self, all_reduce_sum: Callable[[torch.Tensor], None] | None = None) -> dict[str, float]:
        """After an epoch: calibrate the student temperature (the candidates' losses summed over every rank's last
        batch when ``all_reduce_sum`` is given, so that every rank picks the same); the epoch's temperatures."""
        used = {"teacher_temperature": self.teacher_temperature, "student_temperature": self.student_temperature}
        if self.calibrate and self._last is not None:
            losses = calibration_losses(*self._last).double()
            if all_reduce_sum is not None:
                all_reduce_sum(losses)
            self.calibrated.fill_(float(CALIBRATION_GRID[int(torch.argmin(losses))]))
        self._last = None
        return used

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.teacher_temperature
        target = soft_target(teacher_logits, t, self.label_smoothing, self.on)
        if self.calibrate:
            self._last = (student_logits.detach(), target)
        loss = kd_kl(student_logits, target, self.student_temperature)
        return loss * (t * t) if self.t_squared else loss
