"""--plan estimates against the paper's storage figures (within 10%), and the plan printed for the full presets."""

from __future__ import annotations

import pytest

from lpld_ray.config_io import load_config
from lpld_ray.pipeline.estimate import (
    GIB,
    activation_bytes,
    dataset_shape,
    label_bytes,
    label_record_bytes,
    loader_memory,
    plan_lines,
    squeeze_sum_bytes,
)

# (preset, ipc, compression, the paper's label storage in GB; its figures match GiB)
PAPER = [
    ("imagenet1k_rn18", 10, 1, 5.67),
    ("imagenet1k_rn18", 10, 40, 0.14),
    ("imagenet1k_rn18", 200, 1, 113),
    ("imagenet1k_rn18", 200, 40, 2.85),
    ("imagenet21kp_rn18", 10, 1, 643),
    ("imagenet21kp_rn18", 10, 40, 16),
]


@pytest.mark.parametrize("preset,ipc,k,paper_gb", PAPER)
def test_label_estimates_match_the_paper_within_10_percent(preset, ipc, k, paper_gb):
    cfg = load_config(f"jobs/configs/{preset}.yaml", [f"recover.ipc={ipc}"])
    shape = dataset_shape(cfg.data)
    estimate = label_bytes(shape.num_classes * ipc, cfg.relabel.epochs, k, shape.num_classes) / GIB
    assert abs(estimate - paper_gb) / paper_gb < 0.10, (estimate, paper_gb)


def test_record_size_is_fp16_logits_plus_the_stored_augmentation():
    assert label_record_bytes(1000) == 2000 + label_record_bytes(1) - 2
    assert 0 < label_record_bytes(1) - 2 < 100


def test_estimate_matches_a_real_label_pool():
    """The Fashion-MNIST IPC10 runs stored 2,130,000 label bytes at k=1 (docs/RESULTS.md): 100 images x 300 views x 71 B;
    label schema 3 adds the 3 B Cutout fill colour to every record."""
    assert label_bytes(100, 300, 1, 10) == 2_220_000
    assert label_bytes(100, 300, 40, 10) == 55_500


def test_squeeze_sums_at_21k_classes():
    """ResNet-18 has 20 BN layers with 4,800 channels in all: 10,450 classes x (20 + 2 x 4,800) float64 per partition."""
    cfg = load_config("jobs/configs/imagenet21kp_rn18.yaml")
    shape = dataset_shape(cfg.data)
    assert squeeze_sum_bytes(cfg, shape) == 10_450 * (20 + 2 * 4_800) * 8  # 804 MB: why the driver adds them as they come


@pytest.mark.parametrize("images,epochs,k", [(100, 300, 40), (37, 300, 7.5), (100, 10, 40), (10, 1, 100), (999, 3, 2)])
def test_estimated_records_are_the_views_relabel_keeps(images, epochs, k):
    """Including k > E, where every image still keeps one view."""
    from lpld_ray.method.views import view_counts

    kept = int(view_counts(images, epochs, k, seed=0).sum())
    assert label_bytes(images, epochs, k, 10) == kept * label_record_bytes(10)


def test_activation_count_uses_shapes_only():
    import torch

    from lpld_ray.method.models import build_model

    with torch.device("meta"):
        model = build_model("resnet18", 10450, 3, 224)
    # the fc output alone is batch x classes fp32 values; the whole net holds far more
    assert activation_bytes(model, 2, 3, 224) > 2 * 10450 * 4


def test_unreachable_image_folder_without_class_count_is_one_line():
    from lpld_ray.errors import DataError

    cfg = load_config("jobs/configs/imagenet1k_rn18.yaml", ["data.num_classes=null"])
    with pytest.raises(DataError, match="set data.num_classes for --plan"):
        dataset_shape(cfg.data)


def test_plan_lines_cover_every_stage():
    cfg = load_config("jobs/configs/imagenet21kp_rn18.yaml")
    text = "\n".join(plan_lines(cfg, dataset_shape(cfg.data), "8 on cluster"))
    for fragment in ("523 class shards", "104,500 images", "labels at 1x: 611.79 GiB, 1/1.0 of the full 1x pool",
                     "labels at 40x: 15.29 GiB, 1/40.0 of the full 1x pool  <- this run",
                     "20,954 B per stored view (every logit: logits 20,900 B + class indices 0 B + ids and "
                     "augmentation parameters 54 B, stored)",
                     "512 data partitions", "peak memory per worker", "actors: 8 on cluster",
                     "train loader per worker (bound): 2.03 GiB", "one epoch's records 522.06 MiB",
                     "global batch 32 (8 per worker)", "images ~1.46 GiB (JPEG)"):
        assert fragment in text, fragment


def test_loader_bound_does_not_grow_with_the_label_pool():
    """Only the 4 B per stored view of the index grows with E/k; the rest is one epoch of one rank's share."""
    bounds = {}
    for k in (1, 40):
        cfg = load_config("jobs/configs/imagenet21kp_rn18.yaml", [f"relabel.compression={k}"])
        bounds[k] = loader_memory(cfg, dataset_shape(cfg.data))
    views_1x, views_40x = 104_500 * 300, 104_500 * 300 // 40
    assert bounds[1].index - bounds[40].index == 4 * (views_1x - views_40x)
    assert bounds[1].epoch_records == bounds[40].epoch_records == 26_125 * 20_954  # ceil(104,500 / 4 workers) records
    assert bounds[1].total < 2 * bounds[40].total and bounds[40].total < 2.5 * GIB  # 612 GiB vs 15 GiB of labels


@pytest.mark.parametrize("preset", ["imagenet1k_rn18", "imagenet21kp_rn18", "tiny_imagenet_rn18"])
def test_plan_on_full_presets_runs_nothing(preset, tmp_path, cli, caplog):
    run = tmp_path / "run"
    code, errors, _ = cli(["--config", f"jobs/configs/{preset}.yaml", "--run-dir", str(run), "--plan"])
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("plan: relabel:") for m in said) and any(m.startswith("plan: actors:") for m in said)
    if code:  # a GPU cluster's preset may not fit this machine: --plan says so in one line
        assert code == 2 and len(errors) == 1, errors
        assert "of memory of this machine (RAY_ADDRESS plans for a cluster)" in errors[0]
    assert not run.exists()


def test_disk_check_counts_only_what_a_resumed_run_still_writes(tmp_path):
    """The images a run already holds are not counted again: the same free space refused before is enough after."""
    from lpld_ray.errors import LpldError
    from lpld_ray.pipeline.estimate import DatasetShape, image_bytes
    from lpld_ray.pipeline.fits import check_disk

    cfg = load_config("jobs/configs/fashion_mnist.yaml")
    shape = DatasetShape(10, 1, 28, 60000)
    need = image_bytes(10 * cfg.recover.ipc, 1, 28)
    run = tmp_path / "run"
    with pytest.raises(LpldError, match=r"this run would store ~.* \(images ~"):
        check_disk(cfg, shape, ["recover"], need // 2, str(run))
    (run / "images" / "shard-00000").mkdir(parents=True)
    (run / "images" / "shard-00000" / "00000_0000.png").write_bytes(b"x" * (need - need // 4))
    check_disk(cfg, shape, ["recover"], need // 2, str(run))  # a quarter is left to write


def test_gpu_workers_memory_is_not_compared_with_host_memory(caplog):
    """On GPUs a worker's peak is GPU memory: not refused against the host's (Ray does not report GPU memory)."""
    import logging

    from lpld_ray.errors import LpldError
    from lpld_ray.pipeline.fits import check_fits

    cfg = load_config("jobs/configs/imagenet1k_rn18.yaml")
    shape = dataset_shape(cfg.data)
    with pytest.raises(LpldError, match="recover needs ~"):
        check_fits(cfg, shape, ["recover"], 1 << 30, "s3://bucket/run")
    with caplog.at_level(logging.INFO):
        check_fits(cfg, shape, ["recover"], 1 << 30, "s3://bucket/run", gpus=True)
    assert "memory per worker not checked: on GPUs it is GPU memory" in caplog.text
