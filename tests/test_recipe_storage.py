"""Recipe settings that touch stored data: JPEG images, Cutout fill, evaluation resize, squeeze views, statistics."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import pool_items
from PIL import Image
from test_labels import CLASSES, IPC, SIDE, make_images, relabel, tiny_teacher
from test_pool import open_pool

from lpld_ray.config import RecoverConfig, RelabelConfig
from lpld_ray.config_io import config_from_dict
from lpld_ray.data.datasets import TensorClassDataset
from lpld_ray.data.folder import decode_image
from lpld_ray.errors import ConfigError
from lpld_ray.method.images import ImageSpec
from lpld_ray.method.views import image_id_of, sample_view
from lpld_ray.pipeline.shards import plan_class_shards
from lpld_ray.pipeline.stages import output_shards
from lpld_ray.pipeline.units import data_partition, load_images, partition_start, recover_shard, squeeze_partition
from lpld_ray.store.codecs import decode_png, encode_image
from lpld_ray.store.layout import IMAGES_STAGE, image_object_name
from lpld_ray.store.manifest import ShardWriter, read_manifest
from lpld_ray.store.storage import Store


def commit_jpegs(store: Store, images: dict[int, torch.Tensor]) -> None:
    for c in range(CLASSES):
        writer = ShardWriter(store, IMAGES_STAGE, f"shard-{c:05d}")
        for i in range(IPC):
            writer.put(image_object_name(c, i, "jpg"), encode_image(images[image_id_of(c, i, IPC)], "jpeg", 75))
        writer.commit(0, {})


def test_jpeg_round_trip_relabel_and_the_pool_decode_the_same_stored_bytes(tmp_path):
    """Images are written once as JPEG; relabel (load_images) and the pool (ImageSource) decode that object."""
    originals = make_images()
    store = Store(str(tmp_path / "run"))
    commit_jpegs(store, originals)
    ids = [image_id_of(1, i, IPC) for i in range(IPC)]
    decoded = load_images(store, IPC, set(range(CLASSES * IPC)), plan_class_shards(CLASSES, 1))
    assert any(not torch.equal(decoded[i], originals[i]) for i in ids)  # lossy: what is stored is not the float image
    cfg = RelabelConfig(epochs=4, mix="cutmix", batch_size=5)
    store, meta, rec, _, counts = relabel(tmp_path, cfg, ids, images=decoded)
    order = [(i, v) for i in sorted(ids) for v in range(int(counts[i]))]
    seen = dict(zip(order, rec.seen()))
    pool = open_pool(store)
    for epoch in range(cfg.epochs):
        pool.set_epoch(epoch)
        for i in range(len(pool)):
            x, _ = pool[i]
            view = pool._records.view(int(pool._slot[i]))
            assert torch.equal(x, seen[(view.image_id, view.view_id)])


def test_recover_writes_jpeg_objects_at_the_quality_asked(tmp_path):
    pixels = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    real = TensorClassDataset(pixels, torch.tensor([0, 0, 0, 1, 1, 1]), 255.0, ImageSpec(3, 16, (0.5,) * 3, (0.2,) * 3),
                              ["a", "b"])
    store = Store(str(tmp_path / "run"))
    shard = plan_class_shards(2, 2)[0]
    sizes = {}
    for quality in (30, 95):
        cfg = RecoverConfig(ipc=2, source="real", image_format="jpeg", jpeg_quality=quality)
        recover_shard(store, None, real.spec, cfg, shard, 0, real_train=real)
        manifest = read_manifest(store, IMAGES_STAGE, shard.name)
        assert sorted(e.name for e in manifest.objects) == ["00000_0000.jpg", "00000_0001.jpg", "00001_0000.jpg",
                                                            "00001_0001.jpg"]
        assert manifest.meta["image_format"] == "jpeg"
        sizes[quality] = sum(e.size for e in manifest.objects)
        assert Image.open(io.BytesIO(store.read_bytes(f"{IMAGES_STAGE}/{shard.name}/00000_0000.jpg"))).format == "JPEG"
    assert sizes[30] < sizes[95]


def test_cutout_random_fill_is_drawn_with_the_view_and_rebuilt_by_the_pool(tmp_path):
    zero = RelabelConfig(epochs=3, mix="cutout")
    rand = RelabelConfig(epochs=3, mix="cutout", cutout_fill="random")
    a, b = sample_view(5, 3, 1, 12, SIDE, zero), sample_view(5, 3, 1, 12, SIDE, rand)
    assert (a.crop, a.mix_box, a.fill) == (b.crop, b.mix_box, (0, 0, 0)) and b.fill != (0, 0, 0)
    ids = [image_id_of(1, i, IPC) for i in range(IPC)]
    store, _, rec, images, counts = relabel(tmp_path, rand, ids, teacher=tiny_teacher())
    commit_jpegs(store, images)  # the pool needs image objects; they are not compared here
    pool = open_pool(store)
    filled = 0
    for _, x, _, view in pool_items(pool, rand.epochs):
        assert view == sample_view(7, view.image_id, view.view_id, len(images), SIDE, rand)
        box = view.mix_box
        region = x[:, box.top:box.top + box.height, box.left:box.left + box.width]
        filled += int(torch.all(region == view.fill[0] / 255.0))
    assert filled > 0


def test_eval_resize_short_side_resize_crop_and_squash():
    img = Image.fromarray(torch.randint(0, 256, (40, 80, 3), dtype=torch.uint8).numpy())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    expect_squash = torch.from_numpy(__import__("numpy").array(img.resize((28, 28), Image.Resampling.BILINEAR)))
    assert torch.equal((decode_image(data, 28, "x", "squash") * 255).round().byte(), expect_squash.permute(2, 0, 1))
    big = img.resize((64, 32), Image.Resampling.BILINEAR).crop((18, 2, 46, 30))  # short side 32 = 28 / 0.875
    expect_crop = torch.from_numpy(__import__("numpy").array(big)).permute(2, 0, 1)
    assert torch.equal((decode_image(data, 28, "x", "resize_crop") * 255).round().byte(), expect_crop)
    assert decode_image(data, 28, "x", "short_side").shape == (3, 28, 28)
    assert decode_image(data, 0, "x", "none").shape == (3, 40, 80)


def test_squeeze_random_resized_crop_sums_do_not_depend_on_the_partitions():
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (30, 1, 12, 12), dtype=torch.uint8)
    data = TensorClassDataset(pixels, torch.arange(30) % 3, 255.0, ImageSpec(1, 12, (0.5,), (0.25,)), ["a", "b", "c"])
    teacher = tiny_teacher().eval()
    whole = squeeze_partition(teacher, data_partition(data, 0, 1), 7, "random_resized_crop", 4, 0)
    parts = [squeeze_partition(teacher, data_partition(data, p, 3), 5, "random_resized_crop", 4,
                               partition_start(len(data), p, 3)) for p in range(3)]
    total = parts[0] + parts[1] + parts[2]
    for a, b in zip(whole.sums + whole.sumsqs, total.sums + total.sumsqs):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-9)
    center = squeeze_partition(teacher, data_partition(data, 0, 1), 7)
    assert not torch.allclose(center.sums[0], whole.sums[0])


def test_statistics_are_a_setting_independent_of_batching():
    shards = plan_class_shards(4, 2)
    ablation = {"+ class-wise batching": ("class_wise", "global"), "LPLD": ("class_wise", "class_wise"),
                "SRe2L": ("across_classes", "global")}
    wanted = {"+ class-wise batching": ["global"], "LPLD": ["shard-00000", "shard-00001"], "SRe2L": ["global"]}
    for row, (batching, statistics) in ablation.items():
        cfg = config_from_dict({"recover": {"batching": batching, "statistics": statistics}})
        assert output_shards("squeeze", cfg, shards) == wanted[row], row
    assert config_from_dict({"recover": {"batching": "across_classes"}}).recover.statistics == "global"
    with pytest.raises(ConfigError, match="recover.statistics"):
        RecoverConfig(batching="across_classes", statistics="class_wise")


def test_decode_reads_png_and_jpeg_alike():
    x = torch.rand(3, 8, 8)
    assert torch.equal(decode_png(encode_image(x, "png")), (x * 255).round() / 255)
    assert decode_png(encode_image(x, "jpeg", 90)).shape == (3, 8, 8)
