"""Class-wise BN statistics equal brute-force per-class mean/variance; partitions reduce exactly."""

import torch

from lpld_ray.config import DataConfig
from lpld_ray.data.datasets import load_dataset
from lpld_ray.method.images import normalize
from lpld_ray.method.models import build_model
from lpld_ray.method.squeeze import BNSums, accumulate_bn_sums, bn_modules
from lpld_ray.pipeline.units import data_partition, squeeze_partition

DATA = DataConfig(num_classes=4, train_per_class=60)


def real_batch():
    train = load_dataset(DATA, "train")
    images = torch.stack([train[i][0] for i in range(len(train))])
    return normalize(images, train.spec), train.targets.clone()


def brute_force(model, images, labels, num_classes):
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda _m, x: inputs.append(x[0].double())) for m in bn_modules(model)]
    model.eval()
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    means = [torch.stack([x[labels == c].mean((0, 2, 3)) for c in range(num_classes)]) for x in inputs]
    variances = [torch.stack([x[labels == c].var((0, 2, 3), unbiased=False) for c in range(num_classes)]) for x in inputs]
    return means, variances


def test_class_stats_equal_brute_force():
    torch.manual_seed(0)
    model = build_model("convnet", 4, 1, 28)
    images, labels = real_batch()
    # uneven batches, classes mixed within batches
    batches = [(images[i : i + 37], labels[i : i + 37]) for i in range(0, len(labels), 37)]
    means, variances = accumulate_bn_sums(model, batches, 4).mean_var()
    ref_means, ref_vars = brute_force(model, images, labels, 4)
    assert len(means) == 3
    for m, v, rm, rv in zip(means, variances, ref_means, ref_vars):  # float32 per-sample sums: float32's precision
        assert torch.allclose(m, rm, rtol=1e-5, atol=1e-7)
        assert torch.allclose(v, rv, rtol=1e-5, atol=1e-7)
    # the classes really differ, so a global statistic would not pass the check above
    assert (ref_means[0][0] - ref_means[0][1]).abs().max() > 1e-3


def test_global_stats_pool_all_classes():
    torch.manual_seed(1)
    model = build_model("convnet", 4, 1, 28)
    images, labels = real_batch()
    sums = accumulate_bn_sums(model, [(images, labels)], 4)
    (g_mean, *_), (g_var, *_) = sums.total().mean_var()
    ref_means, ref_vars = brute_force(model, images, torch.zeros_like(labels), 1)
    assert torch.allclose(g_mean, ref_means[0], rtol=1e-6)
    assert torch.allclose(g_var, ref_vars[0], rtol=1e-6)


def test_partitions_reduce_to_one_pass():
    torch.manual_seed(2)
    model = build_model("convnet", 4, 1, 28)
    train_set = load_dataset(DATA, "train")
    one = squeeze_partition(model, data_partition(train_set, 0, 1), 64)
    parts = [squeeze_partition(model, data_partition(train_set, p, 3), 64) for p in range(3)]
    assert [len(data_partition(train_set, i, 3)) for i in range(3)] == [80, 80, 80]
    merged = parts[0] + parts[1] + parts[2]
    for a, b in zip(one.sums + one.sumsqs + one.counts, merged.sums + merged.sumsqs + merged.counts):
        assert torch.allclose(a, b, rtol=1e-12)
    assert one.counts[0].sum().item() == 4 * 60 * 28 * 28


def test_sums_round_trip_bytes_and_select():
    torch.manual_seed(3)
    model = build_model("convnet", 4, 1, 28)
    images, labels = real_batch()
    sums = accumulate_bn_sums(model, [(images, labels)], 4)
    back = BNSums.from_bytes(sums.to_bytes())
    assert all(torch.equal(a, b) for a, b in zip(sums.sums, back.sums))
    picked = sums.select([2, 0])
    assert torch.equal(picked.sums[1][0], sums.sums[1][2])
    assert torch.equal(picked.counts[2][1], sums.counts[2][0])


def test_partition_sums_are_added_in_order_with_a_bounded_window():
    """The driver's reduce: parts added in partition order, never more than ``window`` submitted and not yet got."""
    from lpld_ray.method.squeeze import reduce_in_order

    outstanding, peak, order = set(), [0], []

    def submit(i: int) -> int:
        outstanding.add(i)
        peak[0] = max(peak[0], len(outstanding))
        return i

    def get(i: int) -> list[int]:
        outstanding.remove(i)
        order.append(i)
        return [i]

    assert reduce_in_order(submit, 9, 4, get) == list(range(9))  # list + list: the order parts were added in
    assert order == list(range(9)) and peak[0] == 4 and not outstanding
    assert reduce_in_order(submit, 2, 4, get) == [0, 1] and reduce_in_order(submit, 1, 1, get) == [0]
