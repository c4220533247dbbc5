"""The settings the official recipes need: global batch, T^2 and warm-up, normalization none, jitter, weight decay."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lpld_ray.config import Config, DataConfig, RecoverConfig, TrainConfig
from lpld_ray.config_io import config_from_dict
from lpld_ray.data.base import image_spec
from lpld_ray.errors import ConfigError
from lpld_ray.method.augment import SynthAug
from lpld_ray.method.images import normalize
from lpld_ray.method.kd import SoftTargetKLLoss
from lpld_ray.method.models import build_model
from lpld_ray.method.recover import BNTarget, class_wise_groups, recover_groups
from lpld_ray.method.rng import generator
from lpld_ray.method.squeeze import accumulate_bn_sums
from lpld_ray.method.training import make_optimizer, make_scheduler, param_groups, per_worker_batch
from lpld_ray.method.views import compose_view, sample_view
from lpld_ray.pipeline.estimate import dataset_shape, loader_memory
from lpld_ray.store.run_record import upgraded

# ----------------------------------------------------------------------------- global batch


@pytest.mark.parametrize("world,share", [(1, 12), (2, 6), (3, 4)])
def test_the_global_batch_is_split_over_the_workers(world, share):
    assert per_worker_batch(12, world) == share
    cfg = config_from_dict({"train": {"batch_size": 12, "num_workers": world},
                            "teacher": {"batch_size": 12, "num_workers": world}})
    assert loader_memory(cfg, dataset_shape(cfg.data)).batches == 12 // world * (28 * 28 * 4 + 10 * 4)


@pytest.mark.parametrize("section", ["train", "teacher"])
def test_a_batch_that_does_not_divide_is_a_one_line_config_error(section):
    with pytest.raises(ConfigError) as err:
        config_from_dict({section: {"batch_size": 10, "num_workers": 3}})
    msg = str(err.value)
    assert msg == (f"bad value for '{section}.batch_size': 10 (allowed: a multiple of {section}.num_workers (3): "
                   "the global batch is split evenly over the workers)")
    with pytest.raises(ValueError, match="does not split evenly over 3 workers"):
        per_worker_batch(10, 3)


def test_a_run_record_of_per_worker_batches_reads_as_their_global_batch():
    old = {"train": {"batch_size": 16, "num_workers": 8}, "teacher": {"batch_size": 256}}
    assert upgraded(old, 1) == {"train": {"batch_size": 128, "num_workers": 8}, "teacher": {"batch_size": 256}}
    assert upgraded(old, 2) is old


# ----------------------------------------------------------------------------- KD loss and schedule

LN3 = math.log(3.0)
KL_3_1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # KL([3/4, 1/4] || [1/2, 1/2]) = 0.1308...


def test_kd_loss_t_squared_against_hand_computed_values():
    student, teacher = torch.zeros(1, 2), torch.tensor([[2 * LN3, 0.0]])  # T = 2: target softmax([ln 3, 0])
    assert SoftTargetKLLoss(2.0)(student, teacher).item() == pytest.approx(KL_3_1, rel=1e-6)
    assert SoftTargetKLLoss(2.0, t_squared=True)(student, teacher).item() == pytest.approx(4 * KL_3_1, rel=1e-6)


def test_label_smoothing_on_logits_is_the_official_formula():
    """softmax(((1 - eps) t + eps / K) / T) = softmax((1 - eps) t / T): eps 0.2, t = [2.5 ln 3, 0], T = 2."""
    student, teacher = torch.zeros(1, 2), torch.tensor([[2.5 * LN3, 0.0]])
    assert SoftTargetKLLoss(2.0, 0.2, "logits")(student, teacher).item() == pytest.approx(KL_3_1, rel=1e-5)
    probs = SoftTargetKLLoss(2.0, 0.2, "probabilities")(student, teacher).item()  # (1 - eps) p + eps / K
    p = 0.8 * torch.softmax(teacher[0] / 2, 0) + 0.1
    assert probs == pytest.approx(float((p * (p / 0.5).log()).sum()), rel=1e-5)


def lrs(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    model = nn.Linear(2, 2)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    out = []
    for _ in range(cfg.epochs * steps_per_epoch):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_tiny_warm_up_then_cosine_per_epoch_against_hand_values_and_torch():
    cfg = TrainConfig(epochs=100, optimizer="sgd", lr=0.2, warmup_epochs=5, warmup_start=0.01, lr_step="epoch")
    got = lrs(cfg, 3)
    assert got[0:3] == [got[0]] * 3  # constant within an epoch
    per_epoch = got[::3]
    hand = [0.002, 0.0416, 0.0812, 0.1208, 0.1604, 0.2, 0.1 * (1 + math.cos(math.pi / 95))]
    assert per_epoch[:7] == pytest.approx(hand, rel=1e-9)
    assert per_epoch[99] == pytest.approx(0.1 * (1 + math.cos(94 * math.pi / 95)), rel=1e-9)
    # what the official Tiny student builds: LinearLR(0.01, 5) then CosineAnnealingLR(T_max 95), one step per epoch
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=5),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=95, eta_min=0.0)], milestones=[5])
    official = []
    for _ in range(100):
        official.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert per_epoch == pytest.approx(official, rel=1e-6, abs=1e-12)


def test_per_batch_schedule_and_the_old_warm_up_are_kept():
    got = lrs(TrainConfig(epochs=4, lr=1.0, warmup_epochs=1), 2)
    assert got[:2] == [0.5, 1.0] and got[2] == pytest.approx(1.0)  # (step + 1) / warmup, then cosine per batch
    assert got[3] == pytest.approx(0.5 * (1 + math.cos(math.pi / 6)))


# ----------------------------------------------------------------------------- weight decay


@pytest.mark.parametrize("arch", ["convnet", "resnet18_small"])
def test_weight_decay_only_on_weights_with_two_or_more_dims(arch):
    model = build_model(arch, 10, 3, 32)
    decayed, free = param_groups(model, 0.01, "weights")
    official = {id(p) for name, p in model.named_parameters() if "weight" in name and p.ndim > 1}  # utils.get_parameters
    assert {id(p) for p in decayed["params"]} == official and decayed["weight_decay"] == 0.01
    assert free["weight_decay"] == 0.0 and all(p.ndim == 1 for p in free["params"])
    assert len(decayed["params"]) + len(free["params"]) == len(list(model.parameters()))
    optimizer = make_optimizer(model, TrainConfig(weight_decay_on="weights"))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    assert len(make_optimizer(model, TrainConfig()).param_groups) == 1  # all: the old single group


# ----------------------------------------------------------------------------- jitter


@pytest.mark.parametrize("symmetric,low", [(False, 0), (True, -3)])
def test_jitter_is_drawn_from_its_range(symmetric, low):
    gen = generator(1, 0, 0)
    shifts = [s for _ in range(400) for s in
              (lambda a: (a.dy, a.dx))(SynthAug.sample(gen, 16, (0.5, 1.0), True, 3, symmetric))]
    assert set(shifts) == set(range(low, 4))


# ----------------------------------------------------------------------------- normalization


def test_normalization_settings_and_their_channel_check():
    assert image_spec(DataConfig(name="image_folder", normalization="none")).mean == (0.0, 0.0, 0.0)
    assert image_spec(DataConfig(name="image_folder", normalization="tiny_imagenet")).std == (0.2302, 0.2265, 0.2262)
    assert image_spec(DataConfig(name="image_folder")).mean == (0.485, 0.456, 0.406)
    assert image_spec(DataConfig()).mean == (0.2860,)  # Fashion-MNIST keeps its own
    with pytest.raises(ConfigError, match="data.normalization"):
        DataConfig(normalization="imagenet")


def test_normalization_none_through_squeeze_recover_relabel_and_the_student():
    """[0, 1] pixels reach the teacher unchanged everywhere; recover clamps its images to [0, 1] after every step."""
    spec = image_spec(DataConfig(name="image_folder", image_size=12, normalization="none"))
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(4, 2)).eval()
    real = torch.rand(8, 3, 12, 12)
    assert torch.equal(normalize(real, spec), real)
    sums = accumulate_bn_sums(teacher, [(normalize(real, spec), torch.tensor([0, 1] * 4))], 2)
    seen: list[torch.Tensor] = []
    hook = teacher.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().clone()))
    cfg = RecoverConfig(ipc=2, iterations=6, lr=0.5, jitter=1)
    images = recover_groups(teacher, class_wise_groups([0, 1], 2, BNTarget.rows_of(sums), 0), cfg, spec)
    hook.remove()
    assert seen[0].min() < 0 or seen[0].max() > 1  # the N(0, 1) start is not clamped before the first step
    assert all(0 <= v.min() and v.max() <= 1 for v in seen[1:])
    assert all(0 <= x.min() and x.max() <= 1 for x in images)
    view = compose_view(images[0][0], None, sample_view(0, 0, 0, 4, 12, Config().relabel.model_copy(
        update={"mix": "none"})), 12)
    target = teacher(normalize(view[None], spec))
    student = build_model("convnet", 2, 3, 12)
    loss = SoftTargetKLLoss(4.0)(student(normalize(view[None], spec)), target.detach())
    assert torch.isfinite(loss)
