"""The stage table and what follows from it without Ray: input checks, stages to run, worker arithmetic,
the shard queue's retries, the contact sheet and the report."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from lpld_ray.config import Config, RunnerConfig
from lpld_ray.config_io import config_from_dict
from lpld_ray.errors import LpldError, StorageError
from lpld_ray.pipeline.plan import check_resources, check_stage_inputs, stages_to_run, workers_that_fit
from lpld_ray.pipeline.queue import ShardLost, ShardQueue
from lpld_ray.pipeline.report import build_report
from lpld_ray.pipeline.shards import ClassShard, plan_class_shards
from lpld_ray.pipeline.sheet import contact_sheet, sheet_objects
from lpld_ray.pipeline.stages import BY_NAME, STAGE_NAMES, STAGES, output_shards
from lpld_ray.store.codecs import encode_png
from lpld_ray.store.layout import FOLDERS, image_object_name
from lpld_ray.store.manifest import ShardWriter
from lpld_ray.store.storage import Store

SHARDS = plan_class_shards(4, 2)


def commit(store: Store, stage: str, names: list[str], meta: dict | None = None) -> None:
    for name in names:
        writer = ShardWriter(store, FOLDERS[stage], name)
        writer.put("object.bin", b"x")
        writer.commit(seed=0, meta=meta)


def with_keys(**sections) -> Config:
    return config_from_dict({k: v for k, v in sections.items()})


def test_table_order_folders_and_dispatch_cover_every_stage():
    from lpld_ray.distributed.driver import RUNNERS

    assert STAGE_NAMES == ("teacher", "squeeze", "recover", "relabel", "train", "report")
    assert [s.folder for s in STAGES] == ["teacher", "stats", "images", "labels", "train", "report"]
    assert set(RUNNERS) == set(STAGE_NAMES)
    for stage in STAGES:  # a stage reads only stages before it
        assert all(STAGE_NAMES.index(p) < STAGE_NAMES.index(stage.name) for p in stage.reads(Config()))


def test_what_needs_the_teacher_follows_from_the_table():
    trained, given = Config(), with_keys(teacher={"weights": "/w.pt"})
    assert [s.name for s in STAGES if s.needs_teacher(trained)] == ["squeeze", "recover", "relabel"]
    assert [s.name for s in STAGES if s.needs_teacher(given)] == ["teacher", "squeeze", "recover", "relabel"]
    real = with_keys(recover={"source": "real"})
    assert BY_NAME["recover"].reads(real) == ("teacher",)  # random real images need no stats


def test_recover_reads_class_stats_or_the_global_row():
    assert output_shards("squeeze", Config(), SHARDS) == ["shard-00000", "shard-00001"]
    assert output_shards("squeeze", with_keys(recover={"batching": "across_classes"}), SHARDS) == ["global"]
    assert output_shards("teacher", with_keys(teacher={"weights": "/w.pt"}), SHARDS) == []


def test_missing_input_names_the_shard_and_every_stage_to_run(tmp_path):
    store = Store(str(tmp_path / "run"))
    with pytest.raises(LpldError) as err:
        check_stage_inputs(Config(), store, ["train"], SHARDS)
    assert str(err.value) == ("train needs the recover stage's output, but images/shard-00000 is missing (2 of 2 "
                              "shards): run with --stages teacher,squeeze,recover,relabel,train")
    commit(store, "teacher", ["model"])
    commit(store, "recover", ["shard-00000", "shard-00001"])
    with pytest.raises(LpldError, match=r"train needs the relabel stage's output.*--stages relabel,train$"):
        check_stage_inputs(Config(), store, ["train"], SHARDS)
    check_stage_inputs(Config(), store, ["relabel", "train"], SHARDS)  # relabel makes what train reads


def test_fresh_run_counts_nothing_already_there(tmp_path):
    store = Store(str(tmp_path / "run"))
    commit(store, "teacher", ["model"])
    check_stage_inputs(Config(), store, ["squeeze"], SHARDS)
    with pytest.raises(LpldError, match="squeeze needs the teacher stage's output"):
        check_stage_inputs(Config(), store, ["squeeze"], SHARDS, fresh=True)
    assert stages_to_run(Config(), store, ["squeeze"], SHARDS, fresh=True) == ["teacher", "squeeze"]


def test_labels_of_another_schema_are_refused_before_train(tmp_path):
    store = Store(str(tmp_path / "run"))
    commit(store, "recover", ["shard-00000", "shard-00001"])
    commit(store, "relabel", ["shard-00000", "shard-00001"], {"schema_version": 99})
    with pytest.raises(LpldError, match="label schema version 99 is not supported"):
        check_stage_inputs(Config(), store, ["train"], SHARDS)


@pytest.mark.parametrize("runner,gpus,cpus,expected", [
    (RunnerConfig(), 0, 2, 2),
    (RunnerConfig(cpus_per_worker=2), 0, 5, 2),
    (RunnerConfig(cpus_per_worker=8), 0, 2, 1),
    (RunnerConfig(), 4, 64, 4),
    (RunnerConfig(num_workers=3), 4, 64, 3),
    (RunnerConfig(num_workers=2, cpus_per_worker=2), 0, 2, 1),  # never more actors than run at once
])
def test_workers_that_fit(runner, gpus, cpus, expected):
    assert workers_that_fit(runner, gpus, cpus) == expected


@pytest.mark.parametrize("overrides,asked,message", [
    ({"teacher": {"num_workers": 4}}, ["teacher"], "teacher.num_workers x teacher.cpus_per_worker is 4 x 2 = 8 CPUs, "
     "but this Ray cluster has 4 (allowed: at most 4 CPUs in all)"),
    ({"teacher": {"cpus_per_worker": 4}}, ["teacher"], "teacher.cpus_per_worker is 4, but the largest node of this "
     "Ray cluster has 2 CPUs (allowed: at most 2)"),
    ({"runner": {"cpus_per_worker": 8}}, ["recover"], "runner.cpus_per_worker is 8"),
    ({"train": {"num_workers": 3, "cpus_per_worker": 1, "batch_size": 51}}, ["train"], None),
    ({"teacher": {"num_workers": 4, "weights": "/w.pt"}}, ["teacher"], None),  # given weights: no Ray Train run
])
def test_workers_must_fit_the_cluster_before_anything_starts(overrides, asked, message):
    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    if message is None:
        check_resources(with_keys(**overrides), asked, nodes)
    else:
        with pytest.raises(LpldError) as err:
            check_resources(with_keys(**overrides), asked, nodes)
        assert str(err.value).startswith(message)


def test_shard_queue_puts_a_lost_shard_first_and_gives_up_after_the_retries():
    a, b = ClassShard(0, (0,)), ClassShard(1, (1,))
    queue = ShardQueue("recover", [a, b], max_retries=1)
    assert queue.take() == a
    queue.worker_lost(a, "RayActorError")
    assert len(queue) == 2 and queue.take() == a
    with pytest.raises(ShardLost, match="recover shard shard-00000 lost its worker 2 times"):
        queue.worker_lost(a, "RayActorError")
    assert queue.take() == b and not queue


def write_images(store: Store, ipc: int, size: int, shards: list[ClassShard]) -> None:
    for shard in shards:
        writer = ShardWriter(store, "images", shard.name)
        for c in shard.class_ids:
            for i in range(ipc):
                writer.put(image_object_name(c, i), encode_png(torch.full((3, size, size), (c + 1) / 10)))
        writer.commit(seed=0, meta={"classes": list(shard.class_ids)})


def test_contact_sheet_reads_only_what_it_shows_and_is_bounded_in_size(tmp_path):
    store = Store(str(tmp_path / "run"))
    shards = plan_class_shards(3, 2)
    write_images(store, ipc=5, size=200, shards=shards)
    shown = sheet_objects(store, shards, max_classes=2, per_class=3)
    assert shown == [("shard-00000", image_object_name(c, i)) for c in range(2) for i in range(3)]
    sheet = Image.open(io.BytesIO(contact_sheet(store, shards, max_classes=2, per_class=3, class_names=["a", "b"])))
    grid_w = 3 * 96 + 4 * 2  # thumbnails of 96 px, 2 px padding
    assert sheet.size[1] == 2 * 96 + 3 * 2 and grid_w < sheet.size[0] < grid_w + 50  # and a column of row labels


def test_report_counts_storage_from_the_manifests(tmp_path):
    store = Store(str(tmp_path / "run"))
    write_images(store, ipc=2, size=8, shards=SHARDS)
    commit(store, "relabel", ["shard-00000"], {"logit_bytes": 100, "aug_bytes": 20, "records": 7})
    report = build_report(store, Config(), 0.9, 0.8, {"recover": 1.5})
    image_bytes = sum(p.stat().st_size for p in (tmp_path / "run" / "images").rglob("*.png"))
    assert report["image_bytes"] == image_bytes
    assert (report["label_bytes"], report["label_bytes_logits"], report["label_bytes_aug"]) == (120, 100, 20)
    assert report["label_records"] == 7 and report["label_file_bytes"] == 1
    assert (report["teacher_top1"], report["student_top1"], report["wall_seconds"]) == (0.9, 0.8, {"recover": 1.5})


def test_inputs_digests_follow_what_each_stage_reads(tmp_path):
    from lpld_ray.pipeline.stages import recover_inputs, relabel_inputs, train_inputs

    store = Store(str(tmp_path / "run"))
    commit(store, "squeeze", ["shard-00000", "shard-00001", "global"])
    write_images(store, ipc=1, size=8, shards=SHARDS)
    commit(store, "relabel", ["shard-00000", "shard-00001"])
    lpld, sre2l = Config(), with_keys(recover={"batching": "across_classes"})
    own, shared = recover_inputs(lpld, store, SHARDS[:2]), recover_inputs(sre2l, store, SHARDS[:2])
    assert own["shard-00000"] != own["shard-00001"]  # own class stats
    assert shared["shard-00000"] == shared["shard-00001"] != own["shard-00000"]  # the global row
    assert recover_inputs(with_keys(recover={"source": "real"}), store, SHARDS[:1]) == {"shard-00000": ""}
    store.delete("stats/shard-00001/_MANIFEST.json")
    with pytest.raises(StorageError, match="stats/shard-00001 has no valid manifest"):
        recover_inputs(lpld, store, SHARDS[:2])
    assert relabel_inputs(store, SHARDS, "a" * 64) != relabel_inputs(store, SHARDS, "b" * 64)  # the teacher counts
    before = (relabel_inputs(store, SHARDS, "a" * 64), train_inputs(store, SHARDS))
    write_images(store, ipc=2, size=8, shards=SHARDS[1:])  # one images shard redone with other bytes
    after = (relabel_inputs(store, SHARDS, "a" * 64), train_inputs(store, SHARDS))
    assert before[0] != after[0] and before[1] != after[1]


def test_starting_over_deletes_what_the_run_wrote_and_nothing_else(tmp_path):
    from lpld_ray.pipeline.start_over import start_over, written_by_the_run

    root = tmp_path / "run"
    store = Store(str(root))
    store.write_text("run.yaml", "schema_version: 1\nconfig: {}\n")
    write_images(store, ipc=1, size=8, shards=SHARDS)
    commit(store, "teacher", ["model"])
    for rel in ("teacher/ray_train-0123/checkpoint_1/state.pt", "report/report.json", "report/contact_sheet.png"):
        store.write_bytes(rel, b"written by the run")
    mine = ["images/holiday.png", "images/shard-00000/notes.txt", "train/model.pt", "teacher/README", "data.csv"]
    for rel in mine:
        store.write_bytes(rel, b"the user's own")
    assert written_by_the_run(store)[-1] == "run.yaml"  # the run record goes last
    assert start_over(store) == 6 + 2 + 3 + 1  # 4 images + 2 manifests, teacher object + manifest, 3 others, run.yaml
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert left == sorted(mine)


def test_actor_pool_keeps_its_actors_and_redoes_a_call_whose_actor_died(monkeypatch):
    """The pool starts actors only when more are asked for; a call whose actor died is made again on a new one in the
    same slot, at most max_shard_retries times (the actors and Ray itself are stand-ins here)."""
    import ray.exceptions

    from lpld_ray.distributed import shard_queue

    started = []
    pool = shard_queue.ActorPool(lambda: started.append(f"actor-{len(started)}") or started[-1])
    assert pool.take(2) == ["actor-0", "actor-1"] and pool.take(1) == ["actor-0"] and len(started) == 2
    dead = {"actor-1"}

    def answer(ref):  # the result of a call: refs name the actor that was called
        if ref in dead:
            raise ray.exceptions.RayActorError()
        return f"done by {ref}"

    monkeypatch.setattr(shard_queue, "get_or_raise", answer)
    assert pool.run(1, lambda actor: actor, retries=2, what="a squeeze partition") == "done by actor-2"
    assert pool.actors == ["actor-0", "actor-2"]
    dead.update({"actor-2", "actor-3"})
    with pytest.raises(ShardLost, match="a squeeze partition lost its worker 2 times"):
        pool.run(1, lambda actor: actor, retries=1, what="a squeeze partition")
