"""The shared training loop without Ray: the epoch schedule, sharded evaluation counts, checkpoints and resume."""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from lpld_ray.config import DataConfig, TeacherConfig
from lpld_ray.distributed.train import TrainerSpec
from lpld_ray.distributed.train_loop import CHECKPOINT_FILE, WorkerEnv, load_state, run_task, save_state
from lpld_ray.method.images import ImageSpec
from lpld_ray.method.training import (
    EpochSchedule,
    TrainSetup,
    evaluate,
    evaluate_counts,
    rank_slice,
)
from lpld_ray.pipeline.history import HISTORY_OBJECT, read_history
from lpld_ray.pipeline.teacher import (
    TEACHER_SHARD,
    TEACHER_STAGE,
    TeacherJob,
    teacher_run_key,
)
from lpld_ray.store.manifest import verify_shard
from lpld_ray.store.storage import Store

SPEC = ImageSpec(1, 4, (0.5,), (0.25,))


class CountingSet(Dataset):
    """Four separable classes of 1x4x4 images; counts the items read (an evaluation reads each once)."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 4
        self.images = torch.rand(n, 1, 4, 4, generator=gen) * 0.2
        self.images[torch.arange(n), 0, self.labels, 0] = 1.0  # the class is the bright row
        self.reads = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        self.reads += 1
        return self.images[i], int(self.labels[i])


@dataclass
class FakeTask:
    """A TrainTask over CountingSet: records what the loop did with it."""

    schedule: EpochSchedule
    label: str = "fake"
    seed: int = 0
    threads: int = 1
    test_set: CountingSet = field(default_factory=lambda: CountingSet(40, 1))
    epochs_set: list = field(default_factory=list)
    commits: list = field(default_factory=list)
    histories: list = field(default_factory=list)
    model: nn.Module | None = None

    def setup(self, rank: int, world: int) -> TrainSetup:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
        loader = DataLoader(CountingSet(64, 2), batch_size=16, shuffle=False)
        return TrainSetup(self.model, loader, self.test_set, SPEC, nn.CrossEntropyLoss(), self.epochs_set.append)

    def optimizer(self, model: nn.Module, steps_per_epoch: int):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=steps_per_epoch, gamma=0.9)

    def commit(self, model: nn.Module, test_top1: float, resumed_from: int, seconds: float,
               history: list[dict] | None = None) -> None:
        self.commits.append((test_top1, resumed_from))
        self.histories.append(history)

    @property
    def evaluations(self) -> int:
        reads, n = self.test_set.reads, len(self.test_set)
        assert reads % n == 0
        return reads // n


def fake_env(saved: Path, resume_from: Path | None = None, rank: int = 0, world: int = 1,
             reduced: list | None = None) -> tuple[WorkerEnv, list]:
    """A worker whose reports land in a list and whose checkpoints are copied under ``saved``; its all-reduce adds
    the counts of the other ranks from ``reduced``."""
    reports: list = []

    def all_reduce_sum(counts: torch.Tensor) -> None:
        counts += torch.tensor(reduced.pop(0), dtype=counts.dtype)

    def report(metrics: dict, folder: str | None) -> None:
        if folder is not None:
            shutil.copytree(folder, saved / f"epoch-{metrics['epoch']}")
        reports.append((dict(metrics), folder is not None))

    env = WorkerEnv(rank=rank, world=world, device=torch.device("cpu"), prepare_model=lambda m: m,
                    prepare_loader=lambda loader: loader,
                    latest_checkpoint=lambda: nullcontext(str(resume_from) if resume_from else None),
                    report=report, all_reduce_sum=all_reduce_sum)
    return env, reports


@pytest.mark.parametrize("epochs, ev, ck", [(10, 4, 3), (4, 4, 1), (7, 100, 100), (6, 2, 3)])
def test_schedule_reports_union_and_last_epoch_once(epochs, ev, ck):
    s = EpochSchedule(epochs, ev, ck)
    evals = [d for d in range(1, epochs + 1) if s.evaluates(d)]
    ckpts = [d for d in range(1, epochs + 1) if s.checkpoints(d)]
    reports = [d for d in range(1, epochs + 1) if s.reports(d)]
    assert evals[-1] == ckpts[-1] == reports[-1] == epochs
    assert evals == sorted(set(range(ev, epochs + 1, ev)) | {epochs})
    assert ckpts == sorted(set(range(ck, epochs + 1, ck)) | {epochs})
    assert reports == sorted(set(evals) | set(ckpts))


def test_schedule_example():
    s = EpochSchedule(10, 4, 3)
    assert [d for d in range(1, 11) if s.evaluates(d)] == [4, 8, 10]
    assert [d for d in range(1, 11) if s.checkpoints(d)] == [3, 6, 9, 10]
    assert [d for d in range(1, 11) if s.reports(d)] == [3, 4, 6, 8, 9, 10]


@pytest.mark.parametrize("n, world", [(10, 3), (7, 2), (2, 4), (1000, 8)])
def test_rank_slices_cover_once_in_order(n, world):
    parts = [rank_slice(n, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))


def test_evaluate_counts_of_two_slices_sum_to_the_whole():
    data = CountingSet(37, 3)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    whole = evaluate_counts(model, DataLoader(data, batch_size=5), SPEC, torch.device("cpu"))
    parts = [evaluate_counts(model, DataLoader(Subset(data, rank_slice(37, r, 2)), batch_size=5), SPEC,
                             torch.device("cpu")) for r in range(2)]
    assert whole[1] == 37 and 0 < whole[0] < 37  # an untrained model: neither none nor all right
    assert (parts[0][0] + parts[1][0], parts[0][1] + parts[1][1]) == whole
    assert evaluate(model, DataLoader(data, batch_size=5), SPEC, torch.device("cpu")) == pytest.approx(whole[0] / 37)


def test_fresh_run_evaluates_checkpoints_and_reports_once_per_due_epoch(tmp_path):
    task = FakeTask(EpochSchedule(5, eval_every=2, checkpoint_every=2))
    env, reports = fake_env(tmp_path)
    run_task(task, env)
    assert task.epochs_set == [0, 1, 2, 3, 4]
    assert [m["epoch"] for m, _ in reports] == [2, 4, 5]
    assert [m["epoch"] for m, saved in reports if saved] == [2, 4, 5]
    assert task.evaluations == 3  # epochs 2, 4 and 5: none twice, none for the commit
    last = reports[-1][0]
    assert task.commits == [(last["test_top1"], 0)]
    assert last["test_top1"] > 0.9  # the classes are separable: it learned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-2", "epoch-4", "epoch-5"]


def test_other_ranks_report_the_same_epochs_without_checkpoints_or_commit(tmp_path):
    task = FakeTask(EpochSchedule(3, eval_every=5, checkpoint_every=1))
    env, reports = fake_env(tmp_path, rank=1, world=2, reduced=[[7, 20]])  # rank 0: 7 of its 20 right
    run_task(task, env)
    assert [(m["epoch"], saved) for m, saved in reports] == [(1, False), (2, False), (3, False)]
    assert task.commits == [] and task.test_set.reads == 20  # one evaluation, of its half of the test set
    mine, seen = evaluate_counts(task.model, DataLoader(Subset(task.test_set, range(20, 40))), SPEC,
                                 torch.device("cpu"))
    assert seen == 20 and reports[-1][0]["test_top1"] == pytest.approx((7 + mine) / 40)  # counts summed over ranks


def test_restore_returns_the_next_epoch_and_resumes_there(tmp_path):
    first = FakeTask(EpochSchedule(5, eval_every=2, checkpoint_every=2))
    (tmp_path / "a").mkdir()
    env, first_reports = fake_env(tmp_path / "a")
    run_task(first, env)
    checkpoint = tmp_path / "a" / "epoch-4"
    task = FakeTask(EpochSchedule(5, eval_every=2, checkpoint_every=2))
    task.setup(0, 1)
    opt, sched = task.optimizer(task.model, 4)
    assert load_state(str(checkpoint), task.model, opt, sched)[:2] == (4, first_reports[1][0]["test_top1"])
    assert sched.last_epoch == 16  # the schedule stepped once per batch of 4 epochs
    assert load_state(None, task.model, opt, sched) == (0, None, [])

    resumed = FakeTask(EpochSchedule(5, eval_every=2, checkpoint_every=2))
    (tmp_path / "b").mkdir()
    env, reports = fake_env(tmp_path / "b", resume_from=checkpoint)
    run_task(resumed, env)
    assert resumed.epochs_set == [4]  # only epoch 5 (0-based 4) is trained again
    assert [(m["epoch"], m["resumed_from"]) for m, _ in reports] == [(5, 4)]
    assert resumed.evaluations == 1 and resumed.commits[0][1] == 4
    # the same seeded run, interrupted after epoch 4 or not, ends with the same weights
    fresh, resumed_state = first.model.state_dict(), resumed.model.state_dict()
    assert all(torch.allclose(fresh[k], resumed_state[k]) for k in fresh)


def test_resume_from_the_last_epoch_commits_its_top1_without_training_or_evaluating(tmp_path):
    task = FakeTask(EpochSchedule(3, eval_every=3, checkpoint_every=3))
    task.setup(0, 1)
    opt, sched = task.optimizer(task.model, 4)
    save_state(str(tmp_path), task.model, opt, sched, epoch=3, test_top1=0.625)
    again = FakeTask(EpochSchedule(3, eval_every=3, checkpoint_every=3))
    env, reports = fake_env(tmp_path / "out", resume_from=tmp_path)
    run_task(again, env)
    assert reports == [] and again.epochs_set == [] and again.evaluations == 0
    assert again.commits == [(0.625, 3)]


def test_teacher_trains_and_commits_through_the_loop(tmp_path):
    data = DataConfig(name="digits", num_classes=4, train_per_class=40, image_size=8)
    cfg = TeacherConfig(epochs=2, batch_size=16, eval_every=4, checkpoint_every=1, cpus_per_worker=1)
    store = Store(str(tmp_path / "run"))
    job = TeacherJob(data, cfg, store, seed=3)
    (tmp_path / "ckpt").mkdir()
    env, reports = fake_env(tmp_path / "ckpt")
    run_task(job, env)
    assert [(m["epoch"], saved, "test_top1" in m) for m, saved in reports] == [(1, True, False), (2, True, True)]
    manifest = verify_shard(store, TEACHER_STAGE, TEACHER_SHARD)
    assert manifest is not None and manifest.meta["test_top1"] == reports[-1][0]["test_top1"]
    assert manifest.meta["resumed_from"] == 0
    assert HISTORY_OBJECT in [e.name for e in manifest.objects]  # verified with the weights
    history = read_history(store, TEACHER_STAGE, TEACHER_SHARD)
    assert [(r["epoch"], r["loss"], r.get("test_top1")) for r in history] == [
        (m["epoch"], m["loss"], m.get("test_top1")) for m, _ in reports]


def test_teacher_run_key_names_the_same_run_for_the_same_inputs():
    data, cfg = DataConfig(num_classes=4), TeacherConfig()
    key = teacher_run_key(data, cfg, 0)
    assert key == teacher_run_key(DataConfig(num_classes=4), TeacherConfig(checkpoint_every=3, max_failures=0), 0)
    assert len({key, teacher_run_key(data, cfg, 1), teacher_run_key(DataConfig(num_classes=5), cfg, 0),
                teacher_run_key(data, TeacherConfig(epochs=6), 0)}) == 4
    spec = TrainerSpec.of(cfg, run_key=key)
    assert spec.run_name == f"ray_train-{key[:16]}" and spec.inputs == ""
    assert (spec.checkpoints_to_keep, spec.max_failures) == (cfg.checkpoints_to_keep, cfg.max_failures)
    assert TrainerSpec(1, 1, inputs="abc").run_name == "ray_train-abc"


def test_history_keeps_every_epoch_with_top1_where_evaluated(tmp_path):
    task = FakeTask(EpochSchedule(5, eval_every=2, checkpoint_every=2))
    env, reports = fake_env(tmp_path)
    run_task(task, env)
    [history] = task.histories
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in history if "test_top1" in r] == [2, 4, 5]
    assert {r["epoch"]: r["test_top1"] for r in history if "test_top1" in r} == {
        m["epoch"]: m["test_top1"] for m, _ in reports}
    assert {r["epoch"]: r["loss"] for r in history if r["epoch"] in (2, 4, 5)} == {m["epoch"]: m["loss"] for m, _ in reports}
    assert all(r["seconds"] >= 0 and set(r) <= {"epoch", "loss", "test_top1", "seconds"} for r in history)
    assert history[0]["loss"] > history[-1]["loss"]  # it learned


def test_history_survives_a_resume(tmp_path):
    first = FakeTask(EpochSchedule(5, eval_every=2, checkpoint_every=2))
    (tmp_path / "a").mkdir()
    run_task(first, fake_env(tmp_path / "a")[0])
    resumed = FakeTask(EpochSchedule(5, eval_every=2, checkpoint_every=2))
    (tmp_path / "b").mkdir()
    run_task(resumed, fake_env(tmp_path / "b", resume_from=tmp_path / "a" / "epoch-4")[0])
    [full], [after] = first.histories, resumed.histories
    assert [r["epoch"] for r in after] == [1, 2, 3, 4, 5]  # epochs 1-4 from the checkpoint, 5 trained again
    assert after[:4] == full[:4]
    assert after[4]["loss"] == pytest.approx(full[4]["loss"]) and after[4]["test_top1"] == full[4]["test_top1"]
    # the checkpoint of epoch 5 keeps the whole history again, for a later resume
    task = FakeTask(EpochSchedule(5, eval_every=2, checkpoint_every=2))
    task.setup(0, 1)
    opt, sched = task.optimizer(task.model, 4)
    assert [r["epoch"] for r in load_state(str(tmp_path / "b" / "epoch-5"), task.model, opt, sched)[2]] == [1, 2, 3, 4, 5]


def test_a_checkpoint_without_history_still_resumes_with_an_empty_one(tmp_path):
    task = FakeTask(EpochSchedule(3, eval_every=1, checkpoint_every=1))
    task.setup(0, 1)
    opt, sched = task.optimizer(task.model, 4)
    old = {"model": task.model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
           "epoch": 2}  # a student checkpoint of before test_top1 and history were kept
    torch.save(old, tmp_path / CHECKPOINT_FILE)
    assert load_state(str(tmp_path), task.model, opt, sched) == (2, None, [])
    again = FakeTask(EpochSchedule(3, eval_every=1, checkpoint_every=1))
    run_task(again, fake_env(tmp_path / "out", resume_from=tmp_path)[0])
    assert [r["epoch"] for r in again.histories[0]] == [3]
