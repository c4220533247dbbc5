"""The ResNet presets end to end on an ImageFolder tree of real Fashion-MNIST images (PNG, 32 px, class folders),
on local disk or on (moto's) S3, through `ray job submit`, with tiny overrides: the ImageNet path at a size this
machine can run."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import REPO
from PIL import Image

from lpld_ray.config import DataConfig
from lpld_ray.data.datasets import load_dataset
from lpld_ray.store.manifest import list_shards, verify_shard
from lpld_ray.store.storage import Store

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


def tree_on_s3(moto_s3, tree, tmp_path, preset: str) -> tuple[str, str]:
    """The tree copied to a moto bucket, and the preset with a storage: section that reaches it."""
    root = f"s3://{moto_s3.make_bucket()}/fashion"
    remote = Store(root, moto_s3.options())
    for path in sorted(tree.rglob("*.png")):
        remote.write_bytes(str(path.relative_to(tree)), path.read_bytes())
    config = yaml.safe_load((REPO / f"jobs/configs/{preset}.yaml").read_text())
    config["storage"] = moto_s3.storage_section()
    path = tmp_path / "with_storage.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, str(path)


@pytest.mark.parametrize("preset,data_on,extra", [
    ("tiny_imagenet_rn18", "s3", []),  # the tree read from object storage by every stage
    # Cutout relabel, no flip; two Ray Train workers (DDP), each reading only the label shards the shard sampler gives it
    ("imagenet21kp_rn18", "local", ["train.arch=resnet18_small", "teacher.arch=resnet18_small", "train.num_workers=2",
                                    "train.sampler=shard"]),
])
def test_resnet_preset_runs_every_stage_on_an_image_folder(ray_cluster, moto_s3, fashion_tree, tmp_path, preset, data_on,
                                                           extra):
    run_dir = tmp_path / preset
    root, config = str(fashion_tree), f"jobs/configs/{preset}.yaml"
    if data_on == "s3":
        root, config = tree_on_s3(moto_s3, fashion_tree, tmp_path, preset)
    args = ["--config", config, "--run-dir", str(run_dir)]
    for item in [f"data.root={root}", *SMALL, *extra]:
        args += ["--set", item]
    result = ray_cluster.submit(args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert moto_s3.secret_key not in result.stdout + result.stderr
    store = Store(str(run_dir))
    for stage in ("teacher", "images", "labels", "train"):
        for shard in list_shards(store, stage):
            assert verify_shard(store, stage, shard) is not None, (stage, shard)
    assert len(list_shards(store, "images")) == 2  # 3 classes in shards of 2
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["ipc"] == 2 and report["label_records"] == CLASSES * 2 * 6 // 2
    assert report["label_bytes_logits"] == report["label_records"] * CLASSES * 2  # fp16 over the classes in use
    assert 0.0 <= report["student_top1"] <= 1.0 and report["teacher_top1"] > 1 / CLASSES
