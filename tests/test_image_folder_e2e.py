"""The ResNet presets end to end on an ImageFolder tree of real Fashion-MNIST images (PNG, 32 px, class folders),
through `ray job submit`, with tiny overrides: the ImageNet path at a size this machine can run."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lpld_ray.config import DataConfig
from lpld_ray.data import load_dataset
from lpld_ray.manifest import list_shards, verify_shard
from lpld_ray.storage import Store

pytestmark = pytest.mark.ray

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIDE = 3, 60, 20, 32
SMALL = [f"data.num_classes={CLASSES}", f"data.image_size={SIDE}", "teacher.weights=null", "teacher.epochs=3",
         "teacher.batch_size=32", "teacher.cpus_per_worker=1", "teacher.lr=0.05", "squeeze.partitions=2",
         "squeeze.batch_size=64", "recover.ipc=2", "recover.iterations=10", "recover.classes_per_pass=2",
         "relabel.epochs=6", "relabel.compression=2", "relabel.batch_size=32", "train.epochs=6", "train.batch_size=4",
         "train.eval_every=3", "train.checkpoint_every=3", "train.num_workers=1", "train.cpus_per_worker=1",
         "runner.class_shard_size=2", "runner.cpus_per_worker=1"]


@pytest.fixture(scope="module")
def fashion_tree(tmp_path_factory):
    """root/{train,val}/<class>/<n>.png from the real Fashion-MNIST files, resized to 32 px RGB."""
    root = tmp_path_factory.mktemp("imagefolder")
    for split, per_class, source in (("train", TRAIN_PER_CLASS, "train"), ("val", VAL_PER_CLASS, "test")):
        ds = load_dataset(DataConfig(num_classes=CLASSES), source)
        for c in range(CLASSES):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for n, i in enumerate(ds.indices_of_class(c)[:per_class].tolist()):
                pixels = (ds.image(i)[0] * 255).round().to(torch.uint8).numpy()
                Image.fromarray(pixels, "L").convert("RGB").resize((SIDE, SIDE)).save(folder / f"{n:04d}.png")
    return root


@pytest.mark.parametrize("preset,extra", [
    ("tiny_imagenet_rn18", []),
    # Cutout relabel, no flip; two Ray Train workers (DDP), each reading only the label shards the shard sampler gives it
    ("imagenet21kp_rn18", ["train.arch=resnet18_small", "teacher.arch=resnet18_small", "train.num_workers=2",
                           "train.sampler=shard"]),
])
def test_resnet_preset_runs_every_stage_on_an_image_folder(ray_cluster, fashion_tree, tmp_path, preset, extra):
    run_dir = tmp_path / preset
    args = ["--config", f"jobs/configs/{preset}.yaml", "--run-dir", str(run_dir)]
    for item in [f"data.root={fashion_tree}", *SMALL, *extra]:
        args += ["--set", item]
    result = ray_cluster.submit(args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    store = Store(str(run_dir))
    for stage in ("teacher", "images", "labels", "train"):
        for shard in list_shards(store, stage):
            assert verify_shard(store, stage, shard) is not None, (stage, shard)
    assert len(list_shards(store, "images")) == 2  # 3 classes in shards of 2
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["ipc"] == 2 and report["label_records"] == CLASSES * 2 * 6 // 2
    assert report["label_bytes_logits"] == report["label_records"] * CLASSES * 2  # fp16 over the classes in use
    assert 0.0 <= report["student_top1"] <= 1.0 and report["teacher_top1"] > 1 / CLASSES
