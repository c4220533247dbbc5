"""Stage planning, the class-shard queue over Ray actors, Ray Train runs, and progress: all of Ray is here."""

from __future__ import annotations

import hashlib
import logging
import time

import ray
import torch

from lpld_ray.config import (
    Config,
    RecoverConfig,
)
from lpld_ray.data.datasets import load_dataset
from lpld_ray.distributed.actors import (
    data_options,
    evaluate_teacher_task,
    shard_worker,
    squeeze_task,
)
from lpld_ray.distributed.cluster import actor_options, get_or_raise, init_ray
from lpld_ray.distributed.shard_queue import run_shard_queue
from lpld_ray.distributed.train import TrainerSpec, train_once
from lpld_ray.method.squeeze import reduce_in_order
from lpld_ray.pipeline.plan import STAGE_ORDER, require_verified
from lpld_ray.pipeline.progress import Progress
from lpld_ray.pipeline.teacher import (
    GIVEN_SHARD,
    TEACHER_SHARD,
    TEACHER_STAGE,
    TeacherJob,
    commit_given_teacher,
    recorded_teacher_top1,
    teacher_state_bytes,
)
from lpld_ray.pipeline.units import (
    GLOBAL_SHARD,
    IMAGES_STAGE,
    STATS_STAGE,
    ClassShard,
    contact_sheet,
    data_partition,
    load_shard_images,
    plan_class_shards,
    write_stats,
)
from lpld_ray.store.manifest import current_shard, inputs_digest, read_manifest
from lpld_ray.store.storage import Store, storage_options

log = logging.getLogger(__name__)

SHEET_CLASSES = 100  # rows of the contact sheet


def recover_inputs(cfg: RecoverConfig, store: Store, shard: ClassShard) -> str:
    """Digest of the stats a class shard's images are made from ('' for random real images)."""
    if cfg.source == "real":
        return ""
    return inputs_digest(store, (STATS_STAGE,), [shard.name if cfg.batching == "class_wise" else GLOBAL_SHARD])


def run_teacher(cfg: Config, store: Store, state_ref: ray.ObjectRef | None, teacher_sha: str) -> dict:
    """Train the teacher with Ray Train unless a verified one exists; given weights are evaluated on the test set."""
    if cfg.teacher.weights:
        given = current_shard(store, TEACHER_STAGE, GIVEN_SHARD, teacher_sha)
        if given is None:
            task = evaluate_teacher_task.options(**actor_options(cfg.runner))
            top1 = get_or_raise(task.remote(cfg.data, data_options(cfg), cfg.teacher.arch, state_ref,
                                            cfg.teacher.batch_size, cfg.runner.cpus_per_worker))
            commit_given_teacher(store, top1, teacher_sha, cfg.seed)
        else:
            top1 = given.meta["test_top1"]
        log.info("teacher: given weights %s, test top-1 %.4f", cfg.teacher.weights, top1)
        return {"test_top1": top1, "given": True}
    job = TeacherJob(cfg.data, cfg.teacher, store.root, store.storage_options, cfg.seed, data_options(cfg))
    spec = TrainerSpec.of(cfg.teacher, run_key=job.run_key)  # same data, seed and schedule: resume its checkpoints
    manifest = train_once(store, TEACHER_STAGE, TEACHER_SHARD, job, spec)
    log.info("teacher: test top-1 %.4f", manifest.meta["test_top1"])
    return {"test_top1": manifest.meta["test_top1"]}


def run_squeeze(cfg: Config, store: Store, shards: list[ClassShard], state_ref: ray.ObjectRef, teacher_sha: str) -> dict:
    """Per-class BN sums over data partitions (Ray tasks), reduced and committed per class shard."""
    names = [s.name for s in shards] + [GLOBAL_SHARD]
    missing = [n for n in names if current_shard(store, STATS_STAGE, n, teacher_sha) is None]
    if not missing:
        log.info("squeeze: all %d stats shards verified; skipping", len(names))
        return {"shards_written": 0}
    parts = cfg.squeeze.partitions
    slots = max(1, int(ray.cluster_resources().get("CPU", 1)) // cfg.runner.cpus_per_worker)
    window = 2 * slots  # partition sums in flight: what the object store holds of them; the driver holds two

    train_set = load_dataset(cfg.data, "train", data_options(cfg))  # listed once here; each task gets its slice

    def submit(p: int) -> ray.ObjectRef:
        return squeeze_task.options(num_cpus=cfg.runner.cpus_per_worker).remote(
            data_partition(train_set, p, parts), cfg.teacher.arch, state_ref, cfg.squeeze.batch_size,
            cfg.runner.cpus_per_worker)

    progress = Progress("squeeze", parts, cfg.runner.progress_every_s)
    total = reduce_in_order(submit, parts, window, get_or_raise, progress.advance)
    written = write_stats(store, total, shards, cfg.seed, teacher_sha)
    log.info("squeeze: committed %d stats shards (%d were missing)", written, len(missing))
    return {"shards_written": written}


def run_recover(cfg: Config, store: Store, shards: list[ClassShard], state_ref: ray.ObjectRef, num_classes: int) -> dict:
    """Recover every class shard without a verified manifest on a pool of actors; then the contact sheet."""
    inputs = {s.name: recover_inputs(cfg.recover, store, s) for s in shards}
    pending = [s for s in shards if current_shard(store, IMAGES_STAGE, s.name, inputs[s.name]) is None]
    log.info("recover: %d of %d class shards to do", len(pending), len(shards))
    if pending:
        run_shard_queue(
            "recover",
            pending,
            lambda: shard_worker(cfg, store, state_ref, num_classes),
            lambda actor, shard: actor.recover.remote(shard, cfg.recover, cfg.seed, inputs[shard.name]),
            cfg.runner,
        )
    sheet_shards = [s for s in shards if s.class_ids[0] < SHEET_CLASSES]  # read only what the sheet shows
    images, labels = zip(*(load_shard_images(store, s.name) for s in sheet_shards))
    sheet = contact_sheet(torch.cat(images), torch.cat(labels), max_classes=SHEET_CLASSES)
    store.write_bytes("report/contact_sheet.png", sheet)
    log.info("recover: contact sheet at %s", store.uri("report/contact_sheet.png"))
    return {"shards_done": len(pending), "contact_sheet": store.uri("report/contact_sheet.png")}


def run_relabel(cfg: Config, store: Store, shards: list[ClassShard], state_ref: ray.ObjectRef, num_classes: int,
                teacher_sha: str) -> dict:
    """One label shard per class shard; every images shard must exist (CutMix partners come from any class)."""
    from lpld_ray.pipeline.labels import current_labels

    images = inputs_digest(store, (IMAGES_STAGE,), [s.name for s in shards])  # CutMix partners come from any shard
    inputs = hashlib.sha256(f"{images}:{teacher_sha}".encode()).hexdigest()
    pending = [s for s in shards if current_labels(store, s.name, inputs) is None]
    log.info("relabel: %d of %d class shards to do", len(pending), len(shards))
    if pending:
        run_shard_queue(
            "relabel",
            pending,
            lambda: shard_worker(cfg, store, state_ref, num_classes),
            lambda actor, shard: actor.relabel.remote(shard, shards, cfg.relabel, cfg.recover.ipc, num_classes, cfg.seed, inputs),
            cfg.runner,
        )
    return {"shards_done": len(pending)}


def run_train(cfg: Config, store: Store, shards: list[ClassShard]) -> dict:
    """Student training with Ray Train; re-running resumes from the last checkpoint under <run>/train/."""
    from lpld_ray.pipeline.labels import LABELS_STAGE
    from lpld_ray.pipeline.student import (
        STUDENT_SHARD,
        STUDENT_STAGE,
        StudentJob,
    )

    names = [s.name for s in shards]
    require_verified(store, LABELS_STAGE, names, "train", "relabel")  # never train on a truncated or altered object
    require_verified(store, IMAGES_STAGE, names, "train", "recover")
    inputs = inputs_digest(store, (LABELS_STAGE, IMAGES_STAGE), names)  # what the student learns from
    job = StudentJob(cfg.data, cfg.train, store.root, store.storage_options, cfg.seed, cfg.recover.ipc, inputs,
                     data_options(cfg))
    spec = TrainerSpec.of(cfg.train, inputs)
    manifest = train_once(store, STUDENT_STAGE, STUDENT_SHARD, job, spec)
    log.info("train: student test top-1 %.4f (resumed from epoch %d)", manifest.meta["student_top1"], manifest.meta["resumed_from"])
    return {"student_top1": manifest.meta["student_top1"], "resumed_from": manifest.meta["resumed_from"]}


def run_report(cfg: Config, store: Store, summary: dict[str, dict]) -> dict:
    """report/report.json from the committed shards, and the human summary line."""
    from lpld_ray.pipeline.report import build_report, human_summary, write_report
    from lpld_ray.pipeline.student import STUDENT_SHARD, STUDENT_STAGE

    student = read_manifest(store, STUDENT_STAGE, STUDENT_SHARD)
    walls = {stage: part["wall_seconds"] for stage, part in summary.items()}
    report = build_report(store, cfg, recorded_teacher_top1(store, bool(cfg.teacher.weights)),
                          student.meta.get("student_top1") if student else None, walls)
    uri = write_report(store, report)
    log.info("report: %s", uri)
    log.info("summary: %s", human_summary(report))
    return {"report": uri}


def run_pipeline(cfg: Config, store: Store, stages: list[str], num_classes: int) -> dict[str, dict]:
    """Run the asked stages in order; each does only the work whose shards do not verify."""
    shards = plan_class_shards(num_classes, cfg.runner.class_shard_size)
    init_ray()
    summary: dict[str, dict] = {}
    state_ref, teacher_sha = None, ""
    needs_state = {"squeeze", "recover", "relabel"} | ({"teacher"} if cfg.teacher.weights else set())
    for stage in STAGE_ORDER:
        if stage not in stages:
            continue
        started = time.time()
        if stage in needs_state and state_ref is None:
            state = teacher_state_bytes(store, cfg.teacher, storage_options(cfg.storage, cfg.teacher.weights or ""))
            state_ref, teacher_sha = ray.put(state), hashlib.sha256(state).hexdigest()  # in the object store once
        if stage == "teacher":
            summary[stage] = run_teacher(cfg, store, state_ref, teacher_sha)
        elif stage == "squeeze":
            summary[stage] = run_squeeze(cfg, store, shards, state_ref, teacher_sha)
        elif stage == "recover":
            summary[stage] = run_recover(cfg, store, shards, state_ref, num_classes)
        elif stage == "relabel":
            summary[stage] = run_relabel(cfg, store, shards, state_ref, num_classes, teacher_sha)
        elif stage == "train":
            summary[stage] = run_train(cfg, store, shards)
        else:
            summary[stage] = run_report(cfg, store, summary)
        summary[stage]["wall_seconds"] = round(time.time() - started, 2)
        log.info("%s: done in %.1fs", stage, summary[stage]["wall_seconds"])
    return summary
