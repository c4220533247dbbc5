"""Every bad input of issue 18 ("the first hour of a new user"), run through ``lpld_ray.cli.main`` in this process on
a fake 2-CPU node: exit 2 with one line naming the value and what is allowed, within seconds, and the run directory
byte-identical (or never created); or, where the issue asks for it, the documented right thing.

With LPLD_BAD_INPUT_TABLE=FILE the module writes a Markdown table of every outcome to FILE (docs/RESULTS.md)."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, assert_one_line_error
from PIL import Image

from lpld_ray.config import RunnerConfig
from lpld_ray.config_io import load_config
from lpld_ray.pipeline.plan import workers_that_fit
from lpld_ray.store.manifest import ShardWriter
from lpld_ray.store.run_record import write_run_record
from lpld_ray.store.storage import Store

PRESET = str(REPO / "jobs" / "configs" / "fashion_mnist.yaml")
ROWS: list[dict] = []  # one per case, for the table


@dataclass(frozen=True)
class Case:
    kind: str  # the heading
    args: tuple[str, ...]  # after the preset, --run-dir {run} and data.root={fm}; {run} {fm} {tmp} {folders} filled in
    fragment: str  # in the one ERROR line
    run: str = "earlier"  # the run dir: "earlier" (a run and a user's file), "user" (the user's files only), "new"
    hide: str = ""  # a module made impossible to import, as if not installed


FOLDER = ("--set", "data.name=image_folder", "--set", "data.image_size=16", "--set", "data.num_classes=2")
CASES: dict[str, Case] = {
    # data loss
    "--force-new on a folder that holds no run": Case("data loss", ("--force-new",), "holds no run (no run.yaml)", "user"),
    "--run-dir ''": Case("data loss", ("--run-dir", ""), "--run-dir is empty"),
    "--run-dir '' with --force-new": Case("data loss", ("--run-dir", "", "--force-new"), "--run-dir is empty"),
    # hangs: more than the cluster holds
    "teacher.num_workers=4": Case("hang", ("--set", "teacher.num_workers=4"), "4 x 2 = 8 CPUs, but this Ray cluster has 2",
                                   "new"),
    "teacher.cpus_per_worker=4": Case("hang", ("--set", "teacher.cpus_per_worker=4"),
                                      "teacher.cpus_per_worker is 4, but the largest node of this Ray cluster has 2 CPUs"),
    "train.num_workers=4": Case("hang", ("--set", "train.num_workers=4"), "4 x 2 = 8 CPUs", "new"),
    "runner.cpus_per_worker=8": Case("hang", ("--set", "runner.cpus_per_worker=8"), "runner.cpus_per_worker is 8"),
    "autoscaling cluster that never grows": Case(
        "hang", ("--set", "teacher.num_workers=4", "--set", "runner.resource_wait_s=0.3"),
        "waited 0.3 s (runner.resource_wait_s) for the cluster to grow", "new"),
    # accepted nonsense
    "recover.lr=.inf": Case("nonsense", ("--set", "recover.lr=.inf"), "'recover.lr': inf (allowed: a finite number > 0)"),
    "train.lr=.nan": Case("nonsense", ("--set", "train.lr=.nan"), "'train.lr': nan (allowed: a finite number > 0)"),
    "seed=1e23": Case("nonsense", ("--set", "seed=1e23"), "bad value for 'seed': '1e23' (allowed: an integer in [0, 2**63)"),
    "seed=2**64": Case("nonsense", ("--set", f"seed={2**64}"), f"'seed': {2**64} (allowed: an integer in [0, 2**63)"),
    "data.image_size=64 with fashion_mnist": Case(
        "nonsense", ("--set", "data.image_size=64"), "'data.image_size': 64 (allowed: 28, the size of fashion_mnist"),
    "--plan with data.image_size=64": Case("nonsense", ("--plan", "--set", "data.image_size=64"), "'data.image_size': 64"),
    "--plan with recover.ipc=1000000000": Case(
        "nonsense", ("--plan", "--set", "recover.ipc=1000000000"), "recover needs ~", "new"),
    "--plan with recover.ipc=1e9": Case("nonsense", ("--plan", "--set", "recover.ipc=1e9"), "'recover.ipc': '1e9'"),
    "--plan --stages train,distil": Case("nonsense", ("--plan", "--stages", "train,distil"), "unknown stage 'distil'"),
    "--plan --run-dir ''": Case("nonsense", ("--plan", "--run-dir", ""), "--run-dir is empty"),
    "--plan --run-dir memory://x": Case("nonsense", ("--plan", "--run-dir", "memory://x"), "memory:// store"),
    "--plan --run-dir a file": Case("nonsense", ("--plan", "--run-dir", "{tmp}/a_file"), "is a file, not a folder"),
    "--plan on a run of another config": Case("nonsense", ("--plan", "--set", "recover.ipc=5"),
                                              "recover.ipc (was 10, now 5)"),
    "--plan --stages train on a new run": Case("nonsense", ("--plan", "--stages", "train"),
                                               "run with --stages teacher,squeeze,recover,relabel,train", "new"),
    # late failures: now refused before run.yaml is written
    "malformed training file": Case("late failure", ("--set", "data.root={tmp}/fm_bad_train",),
                                    "fm_bad_train/train-images-idx3-ubyte.gz': magic number", "new"),
    "ImageFolder class folder with no images": Case(
        "late failure", (*FOLDER, "--set", "data.root={folders}/empty_class"), "empty_class/train/b' holds no", "new"),
    "ImageFolder val/ with no images": Case(
        "late failure", (*FOLDER, "--set", "data.root={folders}/empty_val"), "the test split of image_folder at", "new"),
    "ImageFolder val/ class folder not in train/": Case(
        "late failure", (*FOLDER, "--set", "data.root={folders}/extra_val"), "has no counterpart in train/", "new"),
    "ImageFolder image that does not decode": Case(
        "late failure", (*FOLDER, "--set", "data.root={folders}/bad_image"), "cannot decode image", "new"),
    "recover.ipc=1000000000": Case("late failure", ("--set", "recover.ipc=1000000000"),
                                   "(allowed: recover.ipc up to ~", "new"),
    "random-real ipc above train_per_class": Case(
        "late failure", ("--set", "recover.source=real", "--set", "data.train_per_class=5", "--set", "recover.ipc=10"),
        "at most data.train_per_class (5) with recover.source real", "new"),
    "random-real ipc above a class's images": Case(
        "late failure", ("--set", "recover.source=real", "--set", "recover.ipc=13"),
        "'recover.ipc': 13 (allowed: at most 12 with recover.source real: class 'T-shirt/top' has 12", "new"),
    # tracebacks for ordinary mistakes
    "--run-dir is a file": Case("traceback", ("--run-dir", "{tmp}/a_file"), "is a file, not a folder"),
    "--run-dir is read-only": Case("traceback", ("--run-dir", "/proc/sys/lpld-run"), "is not writable"),
    "--config is a folder": Case("traceback", ("--config", "{tmp}"), "is a folder (allowed: a YAML file"),
    "teacher.weights is a folder": Case("traceback", ("--set", "teacher.weights={tmp}"),
                                        "is a folder (allowed: a file of torch.save'd weights)"),
    "config not UTF-8": Case("traceback", ("--config", "{tmp}/latin1.yaml"), "is not UTF-8 text (byte 13)"),
    "run.yaml not UTF-8": Case("traceback", ("--run-dir", "{tmp}/latin1_run"), "is not a valid run record"),
    "s3:// without s3fs": Case("traceback", ("--run-dir", "s3://bucket/run"), "needs the s3 extra of lpld-ray", "new",
                               hide="s3fs"),
    "gs:// without gcsfs": Case("traceback", ("--run-dir", "gs://bucket/run"), "needs the gcs extra of lpld-ray"),
    "--run-dir memory://run": Case("traceback", ("--run-dir", "memory://run"), "memory:// store lives in one process"),
    # unclear messages
    "invalid YAML": Case("unclear", ("--config", "{tmp}/broken.yaml"), "is not valid YAML at line 3, column 1: expected ',' or ']'"),
    "--set recover.ipc 5": Case("unclear", ("--set", "recover.ipc", "5"), "--set takes KEY=VALUE as one word"),
    "resume with another config": Case("unclear", ("--set", "recover.ipc=5"),
                                       "recover.ipc (was 10, now 5): use the same config to resume"),
    "--stages train on an empty run": Case("unclear", ("--stages", "train"),
                                           "run with --stages teacher,squeeze,recover,relabel,train", "new"),
    "--force-new --stages recover,relabel": Case(
        "unclear", ("--force-new", "--stages", "recover,relabel"), "teacher/model is deleted by --force-new"),
}


def idx_file(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def fake_fashion(root: Path, per_class: tuple[int, int] = (12, 2), bad_train: bool = False) -> None:
    """Fashion-MNIST idx files of ``per_class`` (train, test) random images per class."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for (images, labels), n in zip((("train-images", "train-labels"), ("t10k-images", "t10k-labels")), per_class):
        targets = np.repeat(np.arange(10), n)
        idx_file(root / f"{images}-idx3-ubyte.gz", 2051, rng.integers(0, 256, (len(targets), 28, 28)))
        idx_file(root / f"{labels}-idx1-ubyte.gz", 2049, targets)
    if bad_train:
        (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0\0\0\0not an idx file"))


def image_tree(root: Path, variant: str) -> None:
    """An ImageFolder tree of classes a and b, broken as ``variant`` says."""
    for split, name in (("train", "a"), ("train", "b"), ("val", "a"), ("val", "b")):
        folder = root / split / name
        folder.mkdir(parents=True)
        if not (variant == "empty_class" and (split, name) == ("train", "b")) and not (
                variant == "empty_val" and split == "val"):
            Image.new("RGB", (20, 20), (10, 200, 30)).save(folder / "x.png")
    (root / "train" / "b" / "readme.txt").write_text("not an image")
    if variant == "extra_val":
        (root / "val" / "c").mkdir()
    if variant == "bad_image":
        (root / "val" / "a" / "x.png").write_bytes(b"not a png")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("data")
    fake_fashion(base / "fm")
    fake_fashion(base / "fm_bad_train", bad_train=True)
    for variant in ("empty_class", "empty_val", "extra_val", "bad_image"):
        image_tree(base / "folders" / variant, variant)
    inputs(base)
    return {"fm": base / "fm", "tmp": base, "folders": base / "folders"}


def earlier_run(run: Path, fm: Path) -> None:
    """A run of the preset (on the fake data) with its teacher committed, and a file of the user's beside it."""
    store = Store(str(run))
    write_run_record(store, load_config(PRESET, [f"data.root={fm}"]))
    writer = ShardWriter(store, "teacher", "model")
    writer.put("teacher.pt", b"weights")
    writer.commit(seed=0)
    (run / "notes.txt").write_text("the user's own")


def inputs(base: Path) -> None:
    """The files some cases name: a file where a folder belongs, a Latin-1 config and run record, broken YAML."""
    (base / "a_file").write_text("not a folder")
    (base / "latin1.yaml").write_bytes("seed: 0\n# caf\xe9\n".encode("latin-1"))
    (base / "broken.yaml").write_text("seed: 0\ndata: [1, 2\n")
    (base / "latin1_run").mkdir()
    (base / "latin1_run" / "run.yaml").write_bytes(b"\xff\xfe schema_version")


def tree_state(root: Path) -> dict[str, tuple[str, int] | None]:
    """Every file (sha256, mtime) and folder (None) below root: byte-identical means equal states."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module", autouse=True)
def table():
    """Writes the table of outcomes to $LPLD_BAD_INPUT_TABLE after the module's cases ran."""
    yield
    target = os.environ.get("LPLD_BAD_INPUT_TABLE")
    if not target or not ROWS:
        return
    lines = ["| issue heading | cases | one-line error, exit 2 | documented right thing | run dir changed | "
             "slowest (s) |", "|---|---|---|---|---|---|"]
    for kind in dict.fromkeys(r["kind"] for r in ROWS):
        rows = [r for r in ROWS if r["kind"] == kind]
        ok = sum(r["one_line"] for r in rows)
        lines.append(f"| {kind} | {len(rows)} | {ok} | {len(rows) - ok} | {sum(not r['unchanged'] for r in rows)} | "
                     f"{max(r['seconds'] for r in rows):.2f} |")
    ok = sum(r["one_line"] for r in ROWS)
    lines += [f"| all | {len(ROWS)} | {ok} | {len(ROWS) - ok} | {sum(not r['unchanged'] for r in ROWS)} | "
              f"{max(r['seconds'] for r in ROWS):.2f} |", "",
              "| case | issue heading | exit | one line | run dir unchanged | s | what the user reads |",
              "|---|---|---|---|---|---|---|"]
    for r in ROWS:
        cells = [r["case"], r["kind"], str(r["exit"]), "yes" if r["one_line"] else "no",
                 "yes" if r["unchanged"] else "no", f"{r['seconds']:.2f}", r["message"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    Path(target).write_text("\n".join(lines) + "\n")


@pytest.fixture
def quiet_autoscaler(monkeypatch):
    import lpld_ray.cli as cli_module
    import lpld_ray.distributed.cluster as cluster

    asked: list = []
    monkeypatch.setattr(cluster, "request_from_autoscaler", asked.append)
    monkeypatch.setattr(cli_module, "request_from_autoscaler", asked.append)
    return asked


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, cli, data, tmp_path, monkeypatch, quiet_autoscaler):
    case = CASES[name]
    cwd, run = tmp_path / "cwd", tmp_path / "run"  # an empty --run-dir would be the current folder
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    if case.run == "earlier":
        earlier_run(run, data["fm"])
    elif case.run == "user":
        for rel in ("images/holiday.png", "report/notes.txt", "train/model.pt"):
            (run / rel).parent.mkdir(parents=True, exist_ok=True)
            (run / rel).write_bytes(b"the user's own")
    if case.hide:
        loaded = importlib.import_module("fsspec.registry")._registry  # filesystem classes fsspec imported already
        monkeypatch.setitem(sys.modules, case.hide, None)
        for scheme in [k for k, v in loaded.items() if v.__module__.startswith(case.hide)]:
            monkeypatch.delitem(loaded, scheme)
    places = {k: str(v) for k, v in {**data, "run": run}.items()}
    args = [a.format(**places) for a in ("--config", PRESET, "--run-dir", "{run}", "--set", "data.root={fm}",
                                         *case.args)]
    before = (tree_state(run) if run.exists() else None, tree_state(data["tmp"]), tree_state(cwd))
    started = time.monotonic()
    outcome = cli(args)
    seconds = time.monotonic() - started
    after = (tree_state(run) if run.exists() else None, tree_state(data["tmp"]), tree_state(cwd))
    code, errors, _ = outcome
    one_line = code == 2 and len(errors) == 1 and case.fragment in errors[0] and "\n" not in errors[0]
    message = errors[0] if errors else ""
    for key, value in places.items():  # the table shows where, not this machine's temporary folders
        message = message.replace(value, key.upper())
    ROWS.append({"case": name, "kind": case.kind, "exit": code, "one_line": one_line, "unchanged": before == after,
                 "seconds": seconds, "message": message})
    assert_one_line_error(outcome, case.fragment)
    assert after == before
    assert seconds < 30


def run_accepted(cli, monkeypatch, args: list[str]) -> int:
    """main(args) with the stages replaced by nothing: for input that must be accepted."""
    import lpld_ray.cli as cli_module

    monkeypatch.setattr(cli_module, "run_pipeline", lambda *_a, **_k: {})
    code, errors, _ = cli(args)
    assert code == 0 and not errors, errors
    return code


def test_force_new_keeps_the_files_no_manifest_lists(cli, data, tmp_path, monkeypatch):
    """--force-new on a real run deletes what the run wrote (listed objects, manifests, run.yaml) and keeps the rest."""
    run = tmp_path / "run"
    earlier_run(run, data["fm"])
    foreign = {"notes.txt", "teacher/model/mine.txt", "report/mine.md", "images/holiday.png"}
    for rel in foreign - {"notes.txt"}:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("the user's own")
    started = time.monotonic()
    code = run_accepted(cli, monkeypatch, ["--config", PRESET, "--run-dir", str(run), "--set", f"data.root={data['fm']}",
                                           "--force-new"])
    left = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}
    assert foreign <= left and "teacher/model/teacher.pt" not in left and "teacher/model/_MANIFEST.json" not in left
    ROWS.append({"case": "--force-new on a run with the user's files beside it", "kind": "data loss", "exit": code,
                 "one_line": False, "unchanged": True, "seconds": time.monotonic() - started,
                 "message": f"right thing: the run's objects deleted, the user's {len(foreign)} files kept"})


def test_shard_actors_never_outnumber_what_fits():
    """runner.num_workers=2 with runner.cpus_per_worker=2 on 2 CPUs: one actor at a time, not a deadlock."""
    assert workers_that_fit(RunnerConfig(num_workers=2, cpus_per_worker=2), 0.0, 2.0) == 1
    ROWS.append({"case": "runner.num_workers=2 with runner.cpus_per_worker=2 on 2 CPUs", "kind": "hang", "exit": 0,
                 "one_line": False, "unchanged": True, "seconds": 0.0,
                 "message": "right thing: 1 shard actor at a time (what fits), never a queued one that cannot start"})


def test_an_autoscaling_cluster_is_waited_for(cli, data, tmp_path, monkeypatch, quiet_autoscaler, caplog):
    """With runner.resource_wait_s the job says what it waits for, asks the autoscaler, and goes on once it grew."""
    import lpld_ray.cli as cli_module

    sizes = iter([[{"CPU": 2.0}]] * 2 + [[{"CPU": 2.0}, {"CPU": 8.0}]] * 10)
    monkeypatch.setattr(cli_module, "node_resources", lambda: next(sizes))
    started = time.monotonic()
    run_accepted(cli, monkeypatch, ["--config", PRESET, "--run-dir", str(tmp_path / "run"), "--set",
                                    f"data.root={data['fm']}", "--set", "teacher.num_workers=4", "--set",
                                    "runner.resource_wait_s=30", "--set", "runner.progress_every_s=0.1"])
    waits = [r.getMessage() for r in caplog.records if "for the cluster to grow" in r.getMessage()]
    assert waits and "teacher.num_workers x teacher.cpus_per_worker is 4 x 2 = 8 CPUs" in waits[0]
    assert quiet_autoscaler[0] == [{"CPU": 2.0}] * 4 and quiet_autoscaler[-1] == []  # asked, then withdrawn
    ROWS.append({"case": "autoscaling cluster that grows while the job waits", "kind": "hang", "exit": 0,
                 "one_line": False, "unchanged": True, "seconds": time.monotonic() - started,
                 "message": "right thing: " + waits[0]})


def test_training_on_declared_gpus_without_cuda_is_refused(cli, data, tmp_path, monkeypatch):
    """Nodes started with --num-gpus on machines without CUDA: Ray Train would fail in NCCL after its restarts."""
    import lpld_ray.cli as cli_module
    import lpld_ray.distributed.cluster as cluster

    monkeypatch.setattr(cli_module, "node_resources", lambda: [{"CPU": 2.0}, {"CPU": 2.0, "GPU": 1.0}])
    monkeypatch.setattr(cluster, "declared_gpus_without_cuda", lambda: True)
    run = tmp_path / "run"
    started = time.monotonic()
    outcome = cli(["--config", PRESET, "--run-dir", str(run), "--set", f"data.root={data['fm']}"])
    message = assert_one_line_error(outcome, "the cluster declares 1 GPUs but a task given one sees no CUDA")
    assert not run.exists()
    ROWS.append({"case": "declared GPUs without CUDA (teacher and student on Ray Train)", "kind": "late failure",
                 "exit": outcome[0], "one_line": True, "unchanged": True, "seconds": time.monotonic() - started,
                 "message": message.replace(str(run), "RUN")})


@pytest.mark.ray
def test_the_cuda_probe_runs_on_a_declared_gpu():
    """The probe itself on a real local Ray whose only node declares a GPU that this machine does not have."""
    import tempfile

    from lpld_ray.testing.ray_nodes import child_env

    tmp_path = tempfile.mkdtemp(prefix="ray-probe-")  # short: Ray's socket paths are limited to 107 bytes
    script = ("import ray, torch; ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, "
              f"_temp_dir={str(tmp_path)!r}); from lpld_ray.distributed.cluster import declared_gpus_without_cuda; "
              "print('probe:', declared_gpus_without_cuda(), torch.cuda.is_available()); ray.shutdown()")
    try:
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=child_env(), capture_output=True,
                                text=True, timeout=180)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "probe: True False" in result.stdout
