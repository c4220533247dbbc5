"""Recover: batched multi-class synthesis equals one class at a time; the BN loss is per group."""

import pytest
import torch

from lpld_ray.config import RecoverConfig
from lpld_ray.method.images import ImageSpec
from lpld_ray.method.models import build_model
from lpld_ray.method.recover import (
    BNTarget,
    across_class_groups,
    bn_distance,
    class_wise_groups,
    group_generators,
    group_losses,
    initial_images,
    recover_groups,
)
from lpld_ray.method.squeeze import accumulate_bn_sums

BOUNDS = ImageSpec(1, 28, (0.286,), (0.353,))
CFG = RecoverConfig(ipc=3, iterations=12, jitter=2, crop_scale=(0.5, 1.0))


@pytest.fixture(scope="module")
def teacher_and_sums():
    torch.manual_seed(0)
    model = build_model("convnet", 4, 1, 28).eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(80, 1, 28, 28, generator=gen) + torch.arange(4).repeat(20).view(-1, 1, 1, 1) * 0.3
    labels = torch.arange(4).repeat(20)
    return model, accumulate_bn_sums(model, [(images, labels)], 4)


def test_batched_class_wise_equals_one_class_at_a_time(teacher_and_sums):
    model, sums = teacher_and_sums
    groups = class_wise_groups([0, 1, 2, 3], CFG.ipc, BNTarget.rows_of(sums), run_seed=5)
    batched = recover_groups(model, groups, CFG, BOUNDS)
    single = [recover_groups(model, [g], CFG, BOUNDS)[0] for g in groups]
    for a, b in zip(batched, single):
        assert a.shape == (3, 1, 28, 28)
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()  # channels-last conv kernels vary with batch size


def test_batched_across_classes_equals_one_group_at_a_time(teacher_and_sums):
    model, sums = teacher_and_sums
    groups = across_class_groups([0, 1, 2, 3], CFG.ipc, BNTarget.rows_of(sums.total())[0], run_seed=5)
    assert [g.labels for g in groups] == [(0, 1, 2, 3)] * 3
    batched = recover_groups(model, groups, CFG, BOUNDS)
    single = [recover_groups(model, [g], CFG, BOUNDS)[0] for g in groups]
    for a, b in zip(batched, single):
        assert torch.allclose(a, b, atol=1e-5)


def test_group_draws_are_keyed_by_the_group_not_its_batch(teacher_and_sums):
    _, sums = teacher_and_sums
    targets = BNTarget.rows_of(sums)
    four = class_wise_groups([0, 1, 2, 3], 2, targets, run_seed=5)
    two = class_wise_groups([2, 3], 2, targets[2:], run_seed=5)
    assert [g.key for g in four[2:]] == [g.key for g in two]
    assert torch.equal(initial_images(four[3], (1, 8, 8)), initial_images(two[1], (1, 8, 8)))
    assert not torch.equal(initial_images(four[0], (1, 8, 8)), initial_images(four[1], (1, 8, 8)))
    aug = [g.uniform(size=5).tolist() for g in group_generators(four[2:] + two)]
    assert aug[:2] == aug[2:] and aug[0] != aug[1]
    reseeded = class_wise_groups([0], 2, targets[:1], run_seed=6)[0]
    assert not torch.equal(initial_images(four[0], (1, 8, 8)), initial_images(reseeded, (1, 8, 8)))
    # SRe2L groups: image j of the shard that starts at class 0 is not image j of the shard that starts at class 2
    glob = BNTarget.rows_of(sums.total())[0]
    a, b = across_class_groups([0, 1], 2, glob, 5), across_class_groups([2, 3], 2, glob, 5)
    keys = {g.key for g in a + b} | {g.key for g in four}
    assert len(keys) == 8  # no two groups of either batching share a key
    assert not torch.equal(initial_images(a[0], (1, 8, 8))[0], initial_images(b[0], (1, 8, 8))[0])


def test_seeds_change_images_and_pixels_stay_valid(teacher_and_sums):
    model, sums = teacher_and_sums
    targets = BNTarget.rows_of(sums)
    a = recover_groups(model, class_wise_groups([1], 2, targets[1:2], 0), CFG, BOUNDS)[0]
    b = recover_groups(model, class_wise_groups([1], 2, targets[1:2], 1), CFG, BOUNDS)[0]
    assert not torch.allclose(a, b)
    assert a.min() >= 0 and a.max() <= 1


def test_bn_loss_is_per_group():
    x = torch.randn(6, 2, 4, 4)
    own = [BNTarget((x[:3].mean((0, 2, 3)),), (x[:3].var((0, 2, 3), unbiased=False),)),
           BNTarget((x[3:].mean((0, 2, 3)),), (x[3:].var((0, 2, 3), unbiased=False),))]
    logits = torch.zeros(6, 2)
    cfg = RecoverConfig(r_bn=1.0, first_bn_multiplier=1.0)
    groups = class_wise_groups([0, 1], 3, own, 0)
    matched = group_losses(logits, [x], groups, cfg) - 2 * torch.log(torch.tensor(2.0))
    assert matched.abs() < 1e-5  # each group matches its own statistics exactly
    swapped = class_wise_groups([0, 1], 3, own[::-1], 0)
    assert group_losses(logits, [x], swapped, cfg) > matched + 0.1
    assert bn_distance(x, own[0].means[0], own[0].variances[0]) > 0


def test_recover_lowers_the_loss(teacher_and_sums):
    model, sums = teacher_and_sums
    targets = BNTarget.rows_of(sums)
    groups = class_wise_groups([2], 4, targets[2:3], 0)
    cfg = RecoverConfig(ipc=4, iterations=60, jitter=0, crop_scale=(1.0, 1.0), flip=False)
    images = recover_groups(model, groups, cfg, BOUNDS)[0]
    mean, std = torch.tensor(BOUNDS.mean).view(1, -1, 1, 1), torch.tensor(BOUNDS.std).view(1, -1, 1, 1)
    init = initial_images(groups[0], (1, 28, 28))

    def loss_of(z):
        inputs = []
        hooks = [m.register_forward_pre_hook(lambda _m, i: inputs.append(i[0])) for m in model.modules()
                 if isinstance(m, torch.nn.BatchNorm2d)]
        with torch.no_grad():
            value = group_losses(model(z), inputs, groups, cfg)
        for h in hooks:
            h.remove()
        return value.item()

    final = (images - mean) / std
    assert loss_of(final) < 0.8 * loss_of(init.clamp((0 - mean) / std, (1 - mean) / std))


def recover_loss(model, images, groups, precision: str = "fp32") -> float:
    """group_losses of one forward pass of ``images``, with or without bf16 autocast."""
    from lpld_ray.method.recover import bn_modules

    inputs = []
    hooks = [m.register_forward_pre_hook(lambda _m, inp: inputs.append(inp[0])) for m in bn_modules(model)]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(images)
        return group_losses(logits.float(), inputs, groups, CFG).item()
    finally:
        for h in hooks:
            h.remove()


def test_channels_last_leaves_the_loss_within_tolerance_of_the_default_layout(teacher_and_sums):
    """recover_groups runs the teacher and the images channels-last; the loss is the contiguous layout's."""
    import copy

    model, sums = teacher_and_sums
    groups = class_wise_groups([0, 1, 2, 3], CFG.ipc, BNTarget.rows_of(sums), run_seed=5)
    x = torch.randn(12, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    default = recover_loss(copy.deepcopy(model).to(memory_format=torch.contiguous_format), x.contiguous(), groups)
    last = recover_loss(copy.deepcopy(model).to(memory_format=torch.channels_last),
                        x.contiguous(memory_format=torch.channels_last), groups)
    assert abs(last - default) / default < 1e-4, (default, last)


def test_bf16_autocast_keeps_the_loss_within_tolerance_of_fp32(teacher_and_sums):
    """The recover loss of the same images under bf16 autocast stays within 2% of fp32, and synthesis under bf16
    reaches a final loss within 10% of fp32 (bf16 keeps 8 bits of mantissa: ~0.4% per value)."""
    from lpld_ray.config_io import replace

    model, sums = teacher_and_sums
    groups = class_wise_groups([0, 1, 2, 3], CFG.ipc, BNTarget.rows_of(sums), run_seed=5)
    x = torch.randn(12, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    fp32, bf16 = recover_loss(model, x, groups, "fp32"), recover_loss(model, x, groups, "bf16")
    assert abs(bf16 - fp32) / fp32 < 0.02, (fp32, bf16)
    long = replace(CFG, iterations=20)
    final = {p: recover_groups(model, groups, replace(long, precision=p), BOUNDS) for p in ("fp32", "bf16")}
    normalised = {p: (torch.cat(v) - 0.286) / 0.353 for p, v in final.items()}
    losses = {p: recover_loss(model, normalised[p], groups) for p in final}
    assert abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] < 0.10, losses
    assert all(torch.isfinite(torch.cat(v)).all() for v in final.values())
