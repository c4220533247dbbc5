"""Taking a run away: jobs/export.py (ImageFolder tree, label Parquet, README) and examples/train_plain.py, on a tiny
finished run made without Ray (images shards of PNGs, labels shards from the real relabel unit, run.yaml)."""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from test_labels import IPC, Recorder, make_images, tiny_teacher

from lpld_ray.config_io import load_config
from lpld_ray.method.views import image_id_of, view_counts
from lpld_ray.pipeline.export import class_folders, known_class_names, safe_folder_name
from lpld_ray.pipeline.labels import relabel_shard, relabel_task
from lpld_ray.pipeline.shards import plan_class_shards
from lpld_ray.store.codecs import encode_png
from lpld_ray.store.label_table import label_schema
from lpld_ray.store.layout import IMAGES_STAGE, LABELS_OBJECT, LABELS_STAGE, image_object_name
from lpld_ray.store.manifest import ShardWriter
from lpld_ray.store.run_record import write_run_record
from lpld_ray.store.storage import Store

REPO = Path(__file__).resolve().parents[1]
CLASSES = 3  # the dataset's first three classes
SIDE = {"fashion_mnist": 28, "digits": 8}  # its image size
FOLDERS = ["T-shirt_top", "Trouser", "Pullover"]
OVERRIDES = ["data.num_classes=3", f"recover.ipc={IPC}", "relabel.epochs=4", "relabel.compression=2",
             "relabel.mix=cutmix", "runner.class_shard_size=2", "train.temperature=3.0"]


def load_script(rel: str):
    """A script of the repository (jobs/, examples/) as a module, to call its main in this process."""
    spec = importlib.util.spec_from_file_location(Path(rel).stem + "_under_test", REPO / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXPORT = load_script("jobs/export.py")


class TinyRun:
    """A finished tiny run on disk, and what the teacher saw for every view."""

    def __init__(self, root: Path, dataset: str = "fashion_mnist", extra: tuple[str, ...] = ()) -> None:
        self.root, self.cfg = root, load_config(None, [f"data.name={dataset}", *OVERRIDES, *extra])
        side = SIDE[dataset]
        self.images = make_images(classes=CLASSES, ipc=IPC, side=side)
        self.seen: dict[tuple[int, int], torch.Tensor] = {}
        store = Store(str(root))
        write_run_record(store, self.cfg)
        self.shards = plan_class_shards(CLASSES, self.cfg.runner.class_shard_size)
        for shard in self.shards:
            writer = ShardWriter(store, IMAGES_STAGE, shard.name)
            for c in shard.class_ids:
                for i in range(IPC):
                    writer.put(image_object_name(c, i), encode_png(self.images[image_id_of(c, i, IPC)]))
            writer.commit(self.cfg.seed, {})
        relabel = self.cfg.relabel
        counts = view_counts(len(self.images), relabel.epochs, relabel.compression, self.cfg.seed)
        teacher = tiny_teacher(CLASSES)
        for shard in self.shards:
            ids = [image_id_of(c, i, IPC) for c in shard.class_ids for i in range(IPC)]
            task = relabel_task(shard.name, ids, relabel, self.cfg.seed, IPC, CLASSES, side)
            recorder = Recorder()
            relabel_shard(store, teacher, recorder, self.images, task, "cpu")
            self.seen.update(zip([(v.image_id, v.view_id) for v in task.views], recorder.seen()))
        self.records = int(counts.sum())

    def stored_png(self, image_id: int) -> bytes:
        c, i = divmod(image_id, IPC)
        shard = next(s.name for s in self.shards if c in s.class_ids)
        return (self.root / IMAGES_STAGE / shard / image_object_name(c, i)).read_bytes()

    def copy(self, dest: Path) -> Path:
        shutil.copytree(self.root, dest)
        return dest


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> TinyRun:
    return TinyRun(tmp_path_factory.mktemp("export") / "run")


@pytest.fixture
def export(caplog, capsys):
    """jobs/export.py's main in this process: (exit code, ERROR messages, everything printed)."""

    def run(argv: list[str]) -> tuple[int, list[str], str]:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            code = EXPORT.main(argv)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        printed = capsys.readouterr()
        return code, errors, printed.out + printed.err

    return run


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def python_block(readme: str) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    return code


# ----------------------------------------------------------------------------- the export


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("out") / "fm_export"
    assert EXPORT.main(["--run-dir", str(tiny_run.root), "--to", str(dest)]) == 0
    return dest


def test_export_writes_an_image_folder_tree_of_the_stored_pngs(tiny_run, exported):
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "images", "labels.parquet"]
    assert sorted(p.name for p in (exported / "images").iterdir()) == sorted(FOLDERS)
    written = files_under(exported / "images")
    assert len(written) == CLASSES * IPC
    for image_id, image in tiny_run.images.items():
        c, i = divmod(image_id, IPC)
        data = written[f"{FOLDERS[c]}/{image_object_name(c, i)}"]
        assert data == tiny_run.stored_png(image_id) == encode_png(image)


def test_the_parquet_holds_every_record_with_its_file(tiny_run, exported):
    table = pq.read_table(exported / "labels.parquet")
    assert table.column_names == [*label_schema(CLASSES).names, "file"]
    assert table.num_rows == tiny_run.records == sum(
        pq.read_metadata(tiny_run.root / LABELS_STAGE / s.name / LABELS_OBJECT).num_rows for s in tiny_run.shards)
    rows = table.to_pylist()
    assert {(r["image_id"], r["view_id"]) for r in rows} == set(tiny_run.seen)
    assert [(r["image_id"], r["view_id"]) for r in rows] == sorted(tiny_run.seen)
    for row in rows:
        c, i = divmod(row["image_id"], IPC)
        assert row["file"] == f"{FOLDERS[c]}/{image_object_name(c, i)}"
        assert (exported / "images" / row["file"]).is_file()
    stored = pq.read_table(tiny_run.root / LABELS_STAGE / "shard-00001" / LABELS_OBJECT).to_pylist()
    by_key = {(r["image_id"], r["view_id"]): r for r in rows}
    for record in stored:  # the records themselves unchanged
        assert {k: v for k, v in by_key[(record["image_id"], record["view_id"])].items() if k != "file"} == record
    assert any(r["mix"] == 1 for r in rows)


def test_a_seeded_top_k_pool_exports_its_views_drawn_again(tiny_run, exported, tmp_path, monkeypatch):
    seeded = TinyRun(tmp_path / "run", extra=("relabel.params=seeded", "relabel.topk=2"))
    assert "image_id" not in pq.read_schema(seeded.root / LABELS_STAGE / "shard-00001" / LABELS_OBJECT).names
    assert EXPORT.main(["--run-dir", str(seeded.root), "--to", str(tmp_path / "out")]) == 0
    table = pq.read_table(tmp_path / "out" / "labels.parquet")
    assert table.column_names == [*label_schema(CLASSES, topk=2).names, "file"]
    reference = pq.read_table(exported / "labels.parquet")
    params = [n for n in reference.column_names if n != "logits"]
    assert table.select(params).equals(reference.select(params))  # the same views, ids and files as a stored pool
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "topk = 2" in readme and "`classes`" in readme
    namespace: dict = {}
    monkeypatch.chdir(tmp_path / "out")
    exec(python_block(readme), namespace)  # its example lines run too
    row = table.slice(0, 1).to_pylist()[0]
    logits = torch.full((CLASSES,), float("-inf"))
    logits[row["classes"]] = torch.tensor(row["logits"], dtype=torch.float32)
    assert torch.allclose(namespace["kd_target"](row), torch.softmax(logits / 3.0, dim=0))
    assert int((namespace["kd_target"](row) == 0).sum()) == CLASSES - 2


def test_the_readme_describes_every_column_and_the_run(exported):
    readme = (exported / "README.md").read_text()
    documented = re.findall(r"^\| `(\w+)` \|", readme, flags=re.M)
    assert documented == [*label_schema(CLASSES).names, "file"]  # a new schema column fails here
    for fragment in ("compression k = 2", "epochs E = 4", "mix = cutmix", "temperature T = 3", "softmax(logits / T)",
                     "| 0 | T-shirt/top | `T-shirt_top` |", "[top, left, height, width]"):
        assert fragment in readme, fragment


def test_the_readme_code_rebuilds_every_view_the_teacher_saw(tiny_run, exported, monkeypatch):
    monkeypatch.chdir(exported)
    scope: dict = {}
    exec(python_block((exported / "README.md").read_text()), scope)  # its example lines run too
    assert scope["target"].shape == (CLASSES,)
    table = pq.read_table(exported / "labels.parquet")
    file_of = dict(zip(table["image_id"].to_pylist(), table["file"].to_pylist()))
    for row in table.to_pylist():
        view = scope["rebuild_view"](row, "images", file_of)
        assert torch.equal(view, tiny_run.seen[(row["image_id"], row["view_id"])])
        target = scope["kd_target"](row)
        assert torch.allclose(target, torch.softmax(torch.tensor(row["logits"]) / 3.0, 0)) and target.sum() > 0.999


def test_class_folder_names():
    assert safe_folder_name("T-shirt/top") == "T-shirt_top" and safe_folder_name("a:b*c") == "a_b_c"
    assert class_folders(["T-shirt/top", "x", "x", "", "../up"], 6) == [
        "T-shirt_top", "x", "class_00002", "class_00003", "_up", "class_00005"]
    assert class_folders(None, 2) == ["class_00000", "class_00001"]
    fashion, digits = (load_config(None, [f"data.name={name}"]) for name in ("fashion_mnist", "digits"))
    assert class_folders(known_class_names(fashion), 10)[0] == "T-shirt_top"
    assert class_folders(known_class_names(digits), 10) == [str(d) for d in range(10)]


def test_image_folder_runs_use_the_tree_s_folder_names(tmp_path, caplog):
    for split in ("train", "val"):
        for name in ("n02", "n01"):
            (tmp_path / "tree" / split / name).mkdir(parents=True)
    cfg = load_config(None, ["data.name=image_folder", f"data.root={tmp_path / 'tree'}"])
    assert known_class_names(cfg) == ["n01", "n02"]
    gone = load_config(None, ["data.name=image_folder", f"data.root={tmp_path / 'gone'}"])
    with caplog.at_level(logging.WARNING):
        assert known_class_names(gone) is None
    assert "class_NNNNN" in caplog.text


# ----------------------------------------------------------------------------- refusals: exit 2, one line, nothing written


def refused(outcome: tuple[int, list[str], str], fragment: str) -> str:
    code, errors, printed = outcome
    assert code == 2 and len(errors) == 1, (code, errors)
    assert fragment in errors[0] and "\n" not in errors[0] and "Traceback" not in printed, errors[0]
    return errors[0]


def test_a_folder_without_a_run_is_refused(tmp_path, export):
    (tmp_path / "empty").mkdir()
    refused(export(["--run-dir", str(tmp_path / "empty"), "--to", str(tmp_path / "out")]), "holds no run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_an_unfinished_run_is_refused(tiny_run, tmp_path, export):
    run = tiny_run.copy(tmp_path / "run")
    (run / LABELS_STAGE / "shard-00001" / "_MANIFEST.json").unlink()
    refused(export(["--run-dir", str(run), "--to", str(tmp_path / "out")]), "labels/shard-00001 has no manifest")
    assert not (tmp_path / "out").exists()


def test_a_non_empty_destination_is_refused_and_left_alone(tiny_run, tmp_path, export):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep")
    refused(export(["--run-dir", str(tiny_run.root), "--to", str(dest)]), "exists and is not empty")
    assert files_under(dest) == {"mine.txt": b"keep"}


def test_an_altered_image_is_refused_and_nothing_is_left_behind(tiny_run, tmp_path, export):
    run = tiny_run.copy(tmp_path / "run")
    png = run / IMAGES_STAGE / "shard-00001" / image_object_name(2, 1)
    png.write_bytes(png.read_bytes()[:-1] + b"\0")
    (tmp_path / "out").mkdir()  # an empty destination is allowed, and stays empty
    refused(export(["--run-dir", str(run), "--to", str(tmp_path / "out")]), "00002_0001.png: sha256 mismatch")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"] and not any((tmp_path / "out").iterdir())


def test_an_empty_destination_is_filled(tiny_run, tmp_path, export):
    (tmp_path / "out").mkdir()
    assert export(["--run-dir", str(tiny_run.root), "--to", str(tmp_path / "out")])[0] == 0
    assert (tmp_path / "out" / "labels.parquet").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_s3_run_exports_the_same_files(tiny_run, exported, tmp_path, moto_s3, monkeypatch, export):
    import s3fs

    bucket = moto_s3.make_bucket()
    remote = Store(f"s3://{bucket}/run", moto_s3.options())
    for path in sorted(p for p in tiny_run.root.rglob("*") if p.is_file()):
        remote.write_bytes(str(path.relative_to(tiny_run.root)), path.read_bytes())
    for name, value in {"AWS_ACCESS_KEY_ID": moto_s3.access_key, "AWS_SECRET_ACCESS_KEY": moto_s3.secret_key,
                        "AWS_ENDPOINT_URL": moto_s3.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        assert export(["--run-dir", f"s3://{bucket}/run", "--to", str(tmp_path / "out")])[0] == 0
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    ours, theirs = files_under(tmp_path / "out"), files_under(exported)
    assert ours.keys() == theirs.keys()
    assert all(ours[k] == theirs[k] for k in ours if k != "README.md")  # the README names the run's root


# ----------------------------------------------------------------------------- the plain PyTorch example


def test_the_plain_pytorch_example_trains_an_epoch_and_reports_accuracy(tmp_path, caplog):
    run = TinyRun(tmp_path / "run", "digits")  # a small real test set: 8x8 digits of three classes
    example = load_script("examples/train_plain.py")
    with caplog.at_level(logging.INFO):
        accuracy = example.main(["--run-dir", str(run.root), "--epochs", "1", "--batch-size", "4"])
    assert 0.0 <= accuracy <= 1.0
    assert re.search(r"epoch 1/1: KD loss \d+\.\d+, test top-1 \d+\.\d+%", caplog.text), caplog.text
    assert "label pool: 12 images, 3 classes" in caplog.text
