"""A ResNet preset end to end on an ImageFolder tree of real Fashion-MNIST images (PNG, 32 px, class folders) on
(moto's) S3, through `ray job submit`, with tiny overrides: the ImageNet path at a size this machine can run. The
teacher is trained here, in this process, and given to the run as weights (teacher training with Ray Train is covered
by the e2e run; local ImageFolder trees by tests/test_data.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, submit_ok
from PIL import Image

from lpld_ray.config import DataConfig
from lpld_ray.data.datasets import load_dataset
from lpld_ray.method.models import build_model, save_weights_bytes
from lpld_ray.method.training import evaluate, random_flip, train_epoch
from lpld_ray.store.manifest import list_shards, verify_shard
from lpld_ray.store.storage import Store

pytestmark = pytest.mark.ray

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SIDE = 3, 60, 20, 32
TEACHER_ARCH = "resnet18_small"  # both presets' runs are given it
SMALL = [f"data.num_classes={CLASSES}", f"data.image_size={SIDE}", f"teacher.arch={TEACHER_ARCH}",
         "teacher.batch_size=32", "teacher.cpus_per_worker=1", "squeeze.partitions=2",
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


@pytest.fixture(scope="module")
def folder_teacher(fashion_tree, tmp_path_factory) -> tuple[Path, float]:
    """A small ResNet teacher trained on the tree's train split in this process; (weights file, its val top-1)."""
    torch.manual_seed(0)
    preset = yaml.safe_load((REPO / f"jobs/configs/{PRESET}.yaml").read_text())["data"]
    data = DataConfig(name="image_folder", root=str(fashion_tree), num_classes=CLASSES, image_size=SIDE,
                      normalization=preset["normalization"], eval_resize=preset["eval_resize"])  # as the run sees them
    train_set, val_set = load_dataset(data, "train"), load_dataset(data, "test")
    model = build_model(TEACHER_ARCH, CLASSES, 3, SIDE)
    loader = torch.utils.data.DataLoader(train_set, batch_size=30, shuffle=True, drop_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    epochs = 1  # its accuracy is not asserted, only that the run scores it as this process does
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=epochs * len(loader))
    cpu = torch.device("cpu")
    for _ in range(epochs):
        train_epoch(model, loader, torch.nn.CrossEntropyLoss(), optimizer, scheduler, train_set.spec, cpu, random_flip)
    top1 = evaluate(model, torch.utils.data.DataLoader(val_set, batch_size=60), val_set.spec, cpu)
    path = tmp_path_factory.mktemp("folder_teacher") / "teacher.pt"
    path.write_bytes(save_weights_bytes(model))
    return path, top1


def tree_on_s3(moto_s3, tree, tmp_path, preset: str) -> tuple[str, str]:
    """The tree copied to a moto bucket (under fashion/), and the preset with a storage: section that reaches it."""
    root = f"s3://{moto_s3.make_bucket()}/fashion"
    remote = Store(root, moto_s3.options())
    for path in sorted(tree.rglob("*.png")):
        remote.write_bytes(str(path.relative_to(tree)), path.read_bytes())
    config = yaml.safe_load((REPO / f"jobs/configs/{preset}.yaml").read_text())
    config["storage"] = moto_s3.storage_section()
    path = tmp_path / "with_storage.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, str(path)


# The 21K-P preset (Cutout relabel, no flip) with its tree read from object storage by every stage, the run itself on
# object storage too (Ray Train's checkpoints included), and two Ray Train workers (DDP), each reading only the label
# shards the shard sampler gives it.
PRESET = "imagenet21kp_rn18"
EXTRA = ["train.arch=resnet18_small", "train.num_workers=2", "train.sampler=shard"]


def test_resnet_preset_runs_every_stage_on_an_image_folder_on_s3(ray_cluster, moto_s3, fashion_tree, folder_teacher,
                                                                 tmp_path):
    root, config = tree_on_s3(moto_s3, fashion_tree, tmp_path, PRESET)
    run_dir = root.replace("/fashion", f"/{PRESET}")
    weights, teacher_top1 = folder_teacher
    args = ["--config", config, "--run-dir", str(run_dir)]
    for item in [f"data.root={root}", f"teacher.weights={weights}", *SMALL, *EXTRA]:
        args += ["--set", item]
    out, summary = submit_ok(ray_cluster, args)
    assert moto_s3.secret_key not in out
    store = Store(run_dir, moto_s3.options())
    assert verify_shard(store, "teacher", "given") is not None
    for stage in ("stats", "images", "labels", "train"):
        for shard in list_shards(store, stage):
            assert verify_shard(store, stage, shard) is not None, (stage, shard)
    assert len(list_shards(store, "images")) == 2  # 3 classes in shards of 2
    assert summary["recover"]["shards_done"] == summary["relabel"]["shards_done"] == 2
    assert store.list("train/model") == ["_MANIFEST.json", "history.json", "student.pt"]
    assert [c for c in store.list("train") if "/checkpoint_" in c]  # Ray Train's, on S3
    report = json.loads(store.read_text("report/report.json"))
    assert report["ipc"] == 2 and report["label_records"] == CLASSES * 2 * 6 // 2
    assert report["label_bytes_logits"] == report["label_records"] * CLASSES * 2  # fp16 over the classes in use
    # the given weights scored on the val split as here, in this process; the student's score is of those 60 images
    assert report["teacher_top1"] == pytest.approx(teacher_top1, abs=1.01 / (CLASSES * VAL_PER_CLASS)) == summary["teacher"]["test_top1"]
    assert report["student_top1"] == summary["train"]["student_top1"]
    hits = report["student_top1"] * CLASSES * VAL_PER_CLASS
    assert abs(hits - round(hits)) < 1e-6, report["student_top1"]
