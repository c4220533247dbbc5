"""RDED (recover.source rded): selection by teacher loss, stitching layout, seeded draws, and a resumed stage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lpld_ray.config import Config, RdedConfig, RecoverConfig
from lpld_ray.config_io import config_from_dict
from lpld_ray.data.datasets import TensorClassDataset
from lpld_ray.errors import ConfigError
from lpld_ray.method.images import ImageSpec
from lpld_ray.method.rded import (
    crop_boxes,
    crop_losses,
    pad_to,
    rded_class,
    select_crops,
    stitch,
    tile_sizes,
)
from lpld_ray.pipeline.shards import plan_class_shards
from lpld_ray.pipeline.stages import BY_NAME, recover_inputs
from lpld_ray.pipeline.units import recover_shard
from lpld_ray.store.layout import IMAGES_STAGE
from lpld_ray.store.manifest import current_shard, verify_shard
from lpld_ray.store.storage import Store

PLAIN = ImageSpec(1, 8, (0.0,), (1.0,))  # normalisation is the identity: the stub sees the crops' own pixel values


class BrightnessTeacher(nn.Module):
    """A stub teacher over 2 classes: the logit of class 1 is minus ``known[id]``, where the crop's id is read from its
    brightest pixel (value (id + 1) / levels); so the CE on class 1 is a known, increasing function of known[id]."""

    def __init__(self, known: torch.Tensor) -> None:
        super().__init__()
        self.known, self.levels = known, known.numel() + 1
        self.anchor = nn.Parameter(torch.zeros(()))  # so next(parameters()) works like a real model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x.flatten(1).amax(1) * self.levels).round().long() - 1
        return torch.stack([torch.zeros(len(ids)), -self.known[ids]], dim=1)


def flat_crops(n: int, m: int, size: int = 4) -> torch.Tensor:
    """[n * m, 1, size, size]: crop j of candidate i is a flat image of value (i * m + j + 1) / (n * m + 1)."""
    values = (torch.arange(n * m, dtype=torch.float32) + 1) / (n * m + 1)
    return values.view(-1, 1, 1, 1).expand(-1, 1, size, size).clone()


def test_crop_losses_are_the_teachers_ce_on_the_class_of_each_padded_crop():
    known = torch.tensor([3.0, 0.5, 2.0, 1.0, 0.1, 4.0])
    losses = crop_losses(BrightnessTeacher(known), flat_crops(3, 2), 1, PLAIN, batch_size=4)
    assert torch.allclose(losses, known + torch.log1p(torch.exp(-known)))  # CE of logits (0, -k) on class 1
    padded = pad_to(torch.ones(1, 1, 3, 3), 8)  # the official pad: the odd row / column goes to the end
    assert padded[0, 0].sum() == 9 and padded[0, 0, 2:5, 2:5].all()


def test_selection_keeps_each_candidates_best_crop_then_the_lowest_candidates():
    n, m, keep = 6, 3, 4
    known = torch.tensor([5.0, 4.0, 6.0, 0.9, 3.0, 2.0, 1.5, 1.6, 1.7, 0.2, 0.3, 0.1, 9.0, 8.0, 7.0, 2.5, 0.8, 3.5])
    losses = crop_losses(BrightnessTeacher(known), flat_crops(n, m), 1, PLAIN, batch_size=5).view(n, m)
    candidates, crops = select_crops(losses, keep)
    # by hand: best crops per candidate (1: 4.0, 0: 0.9, 0: 1.5, 2: 0.1, 2: 7.0, 1: 0.8); the four lowest, in order
    assert candidates.tolist() == [3, 5, 1, 2] and crops.tolist() == [2, 1, 0, 0]
    # never two crops of one image, even when one image holds all the lowest crops
    assert select_crops(torch.tensor([[0.1, 0.2], [0.9, 0.8]]), 2)[0].tolist() == [0, 1]
    with pytest.raises(ValueError, match="only 2 candidates"):
        select_crops(torch.zeros(2, 3), 3)


def test_stitching_puts_patch_k_times_ipc_plus_t_in_tile_k_of_image_t():
    ipc, factor = 3, 2
    patches = torch.arange(ipc * factor ** 2, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 4, 4)
    images = stitch(patches, ipc, factor, 8)
    assert images.shape == (3, 1, 8, 8)
    for t in range(ipc):
        tiles = [images[t, 0, :4, :4], images[t, 0, :4, 4:], images[t, 0, 4:, :4], images[t, 0, 4:, 4:]]
        assert [int(tile.unique()) for tile in tiles] == [t, ipc + t, 2 * ipc + t, 3 * ipc + t]
    assert tile_sizes(7, 2) == [4, 3] and tile_sizes(64, 1) == [64]
    odd = stitch(patches[:4, :, :3, :3], 1, 2, 7)  # 7 px: tiles of 4 and 3 rows / columns, patches resized to them
    assert odd[0, 0, :4, :4].unique().tolist() == [0] and odd[0, 0, 4:, 4:].unique().tolist() == [3]
    assert odd[0, 0, :4, 4:].unique().tolist() == [1] and odd[0, 0, 4:, :4].unique().tolist() == [2]


def test_rded_class_stitches_the_brightest_candidates_best_first():
    """Flat candidates: every crop of candidate i has the value of i, and the stub's loss falls with brightness."""
    n, ipc, factor = 10, 2, 2
    values = torch.tensor([3, 9, 1, 7, 5, 10, 2, 8, 4, 6], dtype=torch.float32) / 11  # ids 2, 8, 0, 6, ...
    candidates = [torch.full((1, 8, 8), float(v)) for v in values]
    known = torch.linspace(5.0, 0.5, n)  # id 9 (the brightest) has the lowest loss
    cfg = RdedConfig(candidates=n, crops=3, factor=factor, batch_size=7)
    result = rded_class(BrightnessTeacher(known), candidates, 1, ipc, cfg, PLAIN, seed=0)
    assert result.candidates.tolist() == [5, 1, 7, 3, 9, 4, 8, 0]  # brightest first: 10, 9, 8, 7, 6, 5, 4, 3 / 11
    tiles = result.images[:, 0, ::4, ::4]  # one pixel per 4x4 tile: [ipc, 2, 2]
    expect = values[result.candidates].view(factor * factor, ipc).T.reshape(ipc, factor, factor)
    assert torch.allclose(tiles, expect)
    assert torch.all(result.losses[1:] >= result.losses[:-1])


def test_draws_are_seeded_and_keyed_by_class_and_candidate():
    boxes = crop_boxes(7, 3, 5, 4, 28, 28, (0.08, 1.0))
    assert boxes == crop_boxes(7, 3, 5, 4, 28, 28, (0.08, 1.0))
    assert all(b.height == b.width for b in boxes)  # square crops, as the official MultiRandomCrop
    assert boxes != crop_boxes(8, 3, 5, 4, 28, 28, (0.08, 1.0)) and boxes != crop_boxes(7, 3, 6, 4, 28, 28, (0.08, 1.0))
    assert crop_boxes(7, 3, 5, 2, 28, 28, (0.08, 1.0)) == boxes[:2]  # more crops extend the same draw

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    candidates = list(torch.rand(12, 1, 8, 8))
    cfg = RdedConfig(candidates=12, crops=3, factor=2)
    a = rded_class(teacher, candidates, 2, 2, cfg, PLAIN, seed=1)
    b = rded_class(teacher, candidates, 2, 2, cfg, PLAIN, seed=1)
    c = rded_class(teacher, candidates, 2, 2, cfg, PLAIN, seed=2)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)


# ----------------------------------------------------------------------------- the recover unit, resumed


def tiny_real(classes: int = 3, per_class: int = 12) -> TensorClassDataset:
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (classes * per_class, 1, 8, 8), generator=gen, dtype=torch.uint8)
    return TensorClassDataset(pixels, torch.arange(classes).repeat(per_class), 255.0, PLAIN, list("abc")[:classes])


def rded_run(**rded) -> Config:
    return config_from_dict({"recover": {"source": "rded", "ipc": 2},
                             "rded": {"candidates": 8, "crops": 2, "factor": 2, **rded}})


def resume(store: Store, cfg: Config, teacher: nn.Module, real: TensorClassDataset, sha: str) -> list[str]:
    """What run_recover does for RDED without Ray: every class shard without a current manifest, redone."""
    shards = plan_class_shards(real.num_classes, 2)
    done = []
    inputs = recover_inputs(cfg, store, shards, sha)
    for shard in shards:
        if current_shard(store, IMAGES_STAGE, shard.name, inputs[shard.name]) is None:
            recover_shard(store, teacher, PLAIN, cfg.recover, shard, cfg.seed, "cpu", real, inputs[shard.name], cfg.rded)
            done.append(shard.name)
    return done


def image_bytes(store: Store, shard: str) -> dict[str, bytes]:
    manifest = verify_shard(store, IMAGES_STAGE, shard)
    return {e.name: store.read_bytes(f"{IMAGES_STAGE}/{shard}/{e.name}") for e in manifest.objects}


def test_a_half_done_rded_stage_redoes_only_the_missing_shard_to_the_same_bytes(tmp_path):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    real, cfg, store = tiny_real(), rded_run(), Store(str(tmp_path / "run"))
    assert BY_NAME["recover"].reads(cfg) == ("teacher",)  # no class stats: squeeze need not run
    assert resume(store, cfg, teacher, real, "a" * 64) == ["shard-00000", "shard-00001"]
    first = {name: image_bytes(store, name) for name in ("shard-00000", "shard-00001")}
    assert sorted(first["shard-00001"]) == ["00002_0000.png", "00002_0001.png"]
    manifest = verify_shard(store, IMAGES_STAGE, "shard-00000")
    assert manifest.meta["source"] == "rded" and manifest.meta["rded"]["factor"] == 2
    assert set(manifest.meta["rded_mean_ce"]) == {"0", "1"}

    store.delete(f"{IMAGES_STAGE}/shard-00001/_MANIFEST.json")  # killed after its objects, before its manifest
    kept = (tmp_path / "run" / IMAGES_STAGE / "shard-00000" / "_MANIFEST.json").stat().st_mtime_ns
    assert resume(store, cfg, teacher, real, "a" * 64) == ["shard-00001"]
    assert image_bytes(store, "shard-00001") == first["shard-00001"]
    assert (tmp_path / "run" / IMAGES_STAGE / "shard-00000" / "_MANIFEST.json").stat().st_mtime_ns == kept
    # another teacher scores the crops differently: its digest differs, so every shard is redone
    assert resume(store, cfg, teacher, real, "b" * 64) == ["shard-00000", "shard-00001"]


def test_shards_do_not_change_a_class_and_scoring_batches_do_not_either(tmp_path):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    real = tiny_real()
    one, other = Store(str(tmp_path / "a")), Store(str(tmp_path / "b"))
    cfg = rded_run()
    recover_shard(one, teacher, PLAIN, cfg.recover, plan_class_shards(3, 3)[0], 0, "cpu", real, "", cfg.rded)
    small = rded_run(batch_size=3)
    recover_shard(other, teacher, PLAIN, small.recover, plan_class_shards(3, 1)[2], 0, "cpu", real, "", small.rded)
    whole, alone = image_bytes(one, "shard-00000"), image_bytes(other, "shard-00002")
    assert alone == {k: v for k, v in whole.items() if k.startswith("00002_")}


def test_config_refuses_too_few_candidates():
    with pytest.raises(ConfigError, match="rded.candidates"):
        config_from_dict({"recover": {"source": "rded", "ipc": 10}, "rded": {"candidates": 39, "factor": 2}})
    with pytest.raises(ConfigError, match=r"at most data.train_per_class \(20\)"):
        config_from_dict({"recover": {"source": "rded", "ipc": 2}, "data": {"train_per_class": 20}})
    assert config_from_dict({"recover": {"source": "synthetic"}, "rded": {"candidates": 1}}).rded.candidates == 1
    assert RecoverConfig(source="rded").source == "rded"


def test_plan_states_rded_memory_per_actor_bounded_by_one_class():
    from lpld_ray.config_io import load_config
    from lpld_ray.pipeline.estimate import dataset_shape, plan_lines, rded_memory

    cfg = load_config("jobs/configs/imagenet1k_rn18.yaml", ["recover.source=rded"])
    shape = dataset_shape(cfg.data)
    memory = rded_memory(cfg, shape)
    assert memory.candidates == 300 * 3 * 224 * 224 * 4  # one class's candidates, whatever the dataset's size
    assert memory.crops == 300 * 5 * 3 * 112 * 112 * 4  # official factor 2: 112 px crops
    assert memory.shard_images == 10 * 10 * 3 * 224 * 224 * 4
    text = "\n".join(plan_lines(cfg, shape, "1"))
    assert "2x2 crops (RDED: best of 5 crops of 300 real images per class)" in text
    assert f"recover (rded) per actor: {memory.total / 2**30:,.2f} GiB" in text
    assert "recover (rded)" not in "\n".join(plan_lines(load_config("jobs/configs/imagenet1k_rn18.yaml"), shape, "1"))
