"""The driver: each stage of the table run over Ray (tasks, shard actors, Ray Train), in order."""

from __future__ import annotations

import hashlib
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Callable

import ray

from lpld_ray.config import Config
from lpld_ray.data.datasets import class_names, load_dataset
from lpld_ray.distributed.actors import data_options, shard_worker
from lpld_ray.distributed.cluster import actor_count, init_ray
from lpld_ray.distributed.shard_queue import ActorPool, run_shard_queue
from lpld_ray.distributed.train import TrainerSpec, train_once
from lpld_ray.errors import LpldError
from lpld_ray.method.squeeze import reduce_in_order
from lpld_ray.pipeline.labels import current_labels
from lpld_ray.pipeline.plan import require_verified
from lpld_ray.pipeline.plots import training_histories
from lpld_ray.pipeline.progress import Progress
from lpld_ray.pipeline.report import (
    REPORT_OBJECT,
    REPORT_SHARD,
    build_report,
    human_summary,
    report_inputs,
    write_report,
)
from lpld_ray.pipeline.report_md import REPORT_MD_OBJECT, write_report_md
from lpld_ray.pipeline.shards import GLOBAL_SHARD, ClassShard, plan_class_shards
from lpld_ray.pipeline.sheet import SHEET_OBJECT, write_contact_sheet
from lpld_ray.pipeline.stages import (
    STAGE_NAMES,
    STAGES,
    Stage,
    recover_inputs,
    relabel_inputs,
    train_inputs,
)
from lpld_ray.pipeline.student import STUDENT_SHARD, StudentJob
from lpld_ray.pipeline.teacher import (
    GIVEN_SHARD,
    TEACHER_SHARD,
    TeacherJob,
    commit_given_teacher,
    recorded_teacher_top1,
    teacher_state_bytes,
)
from lpld_ray.pipeline.units import (
    data_partition,
    partition_start,
    write_stats,
)
from lpld_ray.store.layout import (
    IMAGES_STAGE,
    LABELS_STAGE,
    PRODUCERS,
    REPORT_STAGE,
    STATS_STAGE,
    STUDENT_STAGE,
    TEACHER_STAGE,
)
from lpld_ray.store.manifest import (
    MANIFEST_NAME,
    CorruptShard,
    ShardWriter,
    current_shard,
    current_shards,
    read_manifest,
)
from lpld_ray.store.storage import Store, storage_options

log = logging.getLogger(__name__)

MAX_REDOS = 3  # damaged shards redone within one job before it gives up with one line



def run_teacher(ctx: StageRun) -> dict:
    """Train the teacher with Ray Train unless a verified one exists; given weights are evaluated on the test set."""
    cfg, store = ctx.cfg, ctx.store
    if cfg.teacher.weights:
        given = current_shard(store, TEACHER_STAGE, GIVEN_SHARD, ctx.teacher_sha)
        if given is None:
            ctx.pool.take(1)
            top1 = ctx.pool.run(0, lambda actor: actor.evaluate_teacher.remote(cfg.teacher.batch_size),
                                cfg.runner.max_shard_retries, "the given teacher's evaluation")
            commit_given_teacher(store, top1, ctx.teacher_sha, cfg.seed)
        else:
            top1 = given.meta["test_top1"]
        log.info("teacher: given weights %s, test top-1 %.4f", cfg.teacher.weights, top1)
        return {"test_top1": top1, "given": True}
    ctx.pool.release()  # Ray Train's workers need the CPUs
    job = TeacherJob(cfg.data, cfg.teacher, store, cfg.seed, data_options(cfg))
    spec = TrainerSpec.of(cfg.teacher, run_key=job.run_key)  # same data, seed and schedule: resume its checkpoints
    manifest = train_once(store, TEACHER_STAGE, TEACHER_SHARD, job, spec, ctx.verify)
    log.info("teacher: test top-1 %.4f", manifest.meta["test_top1"])
    return {"test_top1": manifest.meta["test_top1"]}


def run_squeeze(ctx: StageRun) -> dict:
    """Per-class BN sums over data partitions (on the shard actors), reduced and committed per class shard."""
    cfg, store, shards = ctx.cfg, ctx.store, ctx.shards
    names = [s.name for s in shards] + [GLOBAL_SHARD]
    done = current_shards(store, STATS_STAGE, dict.fromkeys(names, ctx.teacher_sha), ctx.verify)
    missing = [n for n in names if done[n] is None]
    if not missing:
        log.info("squeeze: all %d stats shards committed; skipping", len(names))
        return {"shards_written": 0}
    parts, squeeze = cfg.squeeze.partitions, cfg.squeeze
    actors = ctx.pool.take(actor_count(cfg.runner, parts))
    window = 2 * len(actors)  # partition sums in flight: what the object store holds of them; the driver holds two
    train_set = load_dataset(cfg.data, "train", data_options(cfg))  # listed once here; each actor gets its slice

    def submit(p: int) -> tuple:
        def call(actor):
            return actor.squeeze.remote(data_partition(train_set, p, parts), squeeze.batch_size, squeeze.transform,
                                        cfg.seed, partition_start(len(train_set), p, parts))

        slot = p % len(actors)
        return slot, call, call(ctx.pool.actors[slot])

    def get(submitted: tuple):
        return ctx.pool.result(*submitted, cfg.runner.max_shard_retries, "a squeeze partition")

    progress = Progress("squeeze", parts, cfg.runner.progress_every_s)
    total = reduce_in_order(submit, parts, window, get, progress.advance)
    written = write_stats(store, total, shards, cfg.seed, ctx.teacher_sha, set(missing))
    log.info("squeeze: committed %d stats shards (%d were missing)", written, len(missing))
    return {"shards_written": written}


def run_recover(ctx: StageRun) -> dict:
    """Recover every class shard not committed for its inputs on a pool of actors; then the contact sheet."""
    cfg, store, shards = ctx.cfg, ctx.store, ctx.shards
    inputs = recover_inputs(cfg, store, shards, ctx.teacher_sha)
    done = current_shards(store, IMAGES_STAGE, inputs, ctx.verify)
    pending = [s for s in shards if done[s.name] is None]
    log.info("recover: %d of %d class shards to do", len(pending), len(shards))
    if pending:
        run_shard_queue(
            "recover",
            pending,
            ctx.pool,
            lambda actor, shard: actor.recover.remote(shard, cfg.recover, cfg.seed, inputs[shard.name], cfg.rded),
            cfg.runner,
        )
        store.forget(IMAGES_STAGE)  # the actors committed there
    if pending or not store.exists(SHEET_OBJECT):  # a no-op re-run reads no image for it
        log.info("recover: contact sheet at %s", write_contact_sheet(store, shards, class_names(cfg.data, data_options(cfg))))
    sheet = store.uri(SHEET_OBJECT)
    return {"shards_done": len(pending), "contact_sheet": sheet}


def run_relabel(ctx: StageRun) -> dict:
    """One label shard per class shard; every images shard must exist (CutMix partners come from any class)."""
    cfg, store, shards, num_classes = ctx.cfg, ctx.store, ctx.shards, ctx.num_classes
    inputs = relabel_inputs(store, shards, ctx.teacher_sha)
    done = current_labels(store, [s.name for s in shards], inputs, ctx.verify)
    pending = [s for s in shards if done[s.name] is None]
    log.info("relabel: %d of %d class shards to do", len(pending), len(shards))
    if pending:
        run_shard_queue(
            "relabel",
            pending,
            ctx.pool,
            lambda actor, shard: actor.relabel.remote(shard, shards, cfg.relabel, cfg.recover.ipc, num_classes, cfg.seed, inputs),
            cfg.runner,
        )
        store.forget(LABELS_STAGE)  # the actors committed there
    return {"shards_done": len(pending)}


def run_train(ctx: StageRun) -> dict:
    """Student training with Ray Train; re-running resumes from the last checkpoint under <run>/train/."""
    cfg, store, shards = ctx.cfg, ctx.store, ctx.shards
    ctx.pool.release()  # Ray Train's workers need the CPUs
    if ctx.verify:  # else the student's readers check each object they read (never training on a bad one)
        names = [s.name for s in shards]
        require_verified(store, LABELS_STAGE, names, "train", "relabel")
        require_verified(store, IMAGES_STAGE, names, "train", "recover")
    inputs = train_inputs(store, shards)
    job = StudentJob(cfg.data, cfg.train, store, cfg.seed, cfg.recover.ipc, inputs,
                     data_options(cfg))
    spec = TrainerSpec.of(cfg.train, inputs)
    manifest = train_once(store, STUDENT_STAGE, STUDENT_SHARD, job, spec, ctx.verify)
    log.info("train: student test top-1 %.4f (resumed from epoch %d)", manifest.meta["student_top1"], manifest.meta["resumed_from"])
    return {"student_top1": manifest.meta["student_top1"], "resumed_from": manifest.meta["resumed_from"]}


def run_report(ctx: StageRun) -> dict:
    """report/report.json from the committed shards, report/report.md (with the training curve) for people, and the
    human summary line."""
    cfg, store, summary = ctx.cfg, ctx.store, ctx.summary
    inputs = report_inputs(store, cfg)
    built = current_shard(store, REPORT_STAGE, REPORT_SHARD, inputs, ctx.verify)
    if built is not None and store.exists(REPORT_MD_OBJECT):  # a no-op re-run: the report of the jobs that did the work
        log.info("report: up to date for what the run holds; summary: %s", built.meta.get("summary", ""))
        log.info("report to read: %s", store.uri(REPORT_MD_OBJECT))
        return {"report": store.uri(REPORT_OBJECT), "report_md": store.uri(REPORT_MD_OBJECT), "rebuilt": False}
    writer = ShardWriter(store, REPORT_STAGE, REPORT_SHARD)  # its manifest goes last, once the report is whole
    student = read_manifest(store, STUDENT_STAGE, STUDENT_SHARD)
    walls = {stage: part["wall_seconds"] for stage, part in summary.items()}
    report = build_report(store, cfg, recorded_teacher_top1(store, bool(cfg.teacher.weights)),
                          student.meta.get("student_top1") if student else None, walls)
    uri = write_report(store, report)
    names = class_names(cfg.data, data_options(cfg))  # the contact sheet's legend
    markdown = write_report_md(store, report, names, training_histories(store, bool(cfg.teacher.weights)))
    log.info("report: %s", uri)
    log.info("summary: %s", human_summary(report))
    writer.commit(cfg.seed, {"inputs": inputs, "summary": human_summary(report)})
    log.info("report to read: %s", markdown)
    return {"report": uri, "report_md": markdown, "rebuilt": True}


@dataclass
class StageRun:
    """What a stage's driver function gets: the run, its class shards, and the teacher once loaded."""

    cfg: Config
    store: Store
    shards: list[ClassShard]
    num_classes: int
    summary: dict[str, dict] = field(default_factory=dict)
    state_ref: ray.ObjectRef | None = None  # the teacher's state dict bytes, in the object store once
    teacher_sha: str = ""
    verify: bool = False  # --verify: check every object of the shards a stage finds committed, not only manifests
    pool: ActorPool = field(init=False)

    def __post_init__(self) -> None:
        self.pool = ActorPool(lambda: shard_worker(self.cfg, self.store, self.state_ref, self.num_classes))

    def load_teacher(self) -> None:
        """Put the teacher's weights into the object store (once per run)."""
        if self.state_ref is None:
            options = storage_options(self.cfg.storage, self.cfg.teacher.weights or "")
            state = teacher_state_bytes(self.store, self.cfg.teacher, options)
            self.state_ref, self.teacher_sha = ray.put(state), hashlib.sha256(state).hexdigest()


# the driver function of every stage of lpld_ray.pipeline.stages.STAGES (a test checks the names match)
RUNNERS: dict[str, Callable[[StageRun], dict]] = {
    "teacher": run_teacher,
    "squeeze": run_squeeze,
    "recover": run_recover,
    "relabel": run_relabel,
    "train": run_train,
    "report": run_report,
}


def peak_rss_mib() -> float:
    """This process's peak resident set so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_pipeline(cfg: Config, store: Store, stages: list[str], num_classes: int, verify: bool = False) -> dict[str, dict]:
    """Run the asked stages in table order; each does only the shards not committed for its inputs. When a reader
    finds a committed object damaged (CorruptShard), that shard's manifest goes and the stages from its producer on
    run again (at most MAX_REDOS times), so it is redone before anything uses it."""
    ctx = StageRun(cfg, store, plan_class_shards(num_classes, cfg.runner.class_shard_size), num_classes, verify=verify)
    init_ray()
    todo, redos = [stage for stage in STAGES if stage.name in stages], 0
    store.remember_texts(MANIFEST_NAME)  # each manifest read once per job, unless a stage wrote its folder since
    try:
        while todo:
            try:
                run_stage(ctx, todo[0])
                todo.pop(0)
            except CorruptShard as bad:
                producer = redo_shard(ctx, todo[0].name, bad, stages, redos)
                todo, redos = [stage for stage in STAGES[STAGE_NAMES.index(producer):] if stage.name in stages], redos + 1
    finally:
        store.remember_texts(None)
        ctx.pool.release()
    return ctx.summary


def run_stage(ctx: StageRun, stage: Stage) -> None:
    """One stage's driver function, with its wall time, the driver's own CPU time and peak RSS in the summary."""
    started, driver_cpu = time.time(), time.process_time()
    if stage.needs_teacher(ctx.cfg):
        ctx.load_teacher()
    ctx.summary[stage.name] = RUNNERS[stage.name](ctx)
    ctx.summary[stage.name].update(wall_seconds=round(time.time() - started, 2),
                                   driver_cpu_seconds=round(time.process_time() - driver_cpu, 2),
                                   driver_peak_rss_mib=peak_rss_mib())
    log.info("%s: done in %.1fs", stage.name, ctx.summary[stage.name]["wall_seconds"])


def redo_shard(ctx: StageRun, reader: str, bad: CorruptShard, stages: list[str], redos: int) -> str:
    """The damaged shard's manifest removed (it no longer counts as done) and the stage that makes it, to run again;
    one line when that stage is not asked or redoing keeps finding damage."""
    ctx.pool.release()  # its actors may still run the stage's other units
    producer = PRODUCERS[bad.stage]
    ctx.store.delete(f"{bad.stage}/{bad.shard}/{MANIFEST_NAME}")
    if producer not in stages or redos >= MAX_REDOS:
        why = "redone " + str(redos) + " times already" if redos >= MAX_REDOS else "its stage is not asked"
        raise LpldError(f"{reader} found {bad} ({why}); the shard now counts as not done: run with --stages "
                        f"{','.join(n for n in STAGE_NAMES if n == producer or n in stages)}")
    log.warning("%s found %s: redoing %s/%s from the %s stage on", reader, bad, bad.stage, bad.shard, producer)
    if bad.stage == TEACHER_STAGE:
        ctx.state_ref = None  # the teacher is loaded again once redone
    return producer
