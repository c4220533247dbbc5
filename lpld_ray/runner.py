"""Stage planning, the class-shard queue over Ray actors, Ray Train runs, and progress: all of Ray is here."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import ray
import torch

from lpld_ray.config import Config, DataConfig, RecoverConfig, RelabelConfig, RunnerConfig
from lpld_ray.data import ClassDataset, load_dataset
from lpld_ray.models import build_teacher
from lpld_ray.progress import Progress
from lpld_ray.squeeze import reduce_in_order
from lpld_ray.plan import STAGE_ORDER, require_verified
from lpld_ray.stages import (
    GLOBAL_SHARD,
    IMAGES_STAGE,
    STATS_STAGE,
    ClassShard,
    contact_sheet,
    data_partition,
    load_images,
    load_shard_images,
    plan_class_shards,
    recover_shard,
    squeeze_partition,
    write_stats,
)
from lpld_ray.errors import LpldError
from lpld_ray.manifest import current_shard, inputs_digest, read_manifest
from lpld_ray.storage import Store, storage_options
from lpld_ray.teacher import (
    GIVEN_SHARD,
    TEACHER_SHARD,
    TEACHER_STAGE,
    TeacherJob,
    commit_given_teacher,
    evaluate_given_teacher,
    recorded_teacher_top1,
    teacher_state_bytes,
    teacher_train_loop,
)

log = logging.getLogger(__name__)

SHEET_CLASSES = 100  # rows of the contact sheet


def init_ray() -> None:
    """Join the cluster of ``ray job submit`` (RAY_ADDRESS) or start a local Ray on this machine."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING, log_to_driver=True)
    log.info("ray cluster resources: %s", {k: v for k, v in ray.cluster_resources().items() if "node" not in k})


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def actor_options(runner: RunnerConfig) -> dict[str, Any]:
    if cluster_has_gpus():
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": runner.cpus_per_worker}


def actor_count(runner: RunnerConfig, pending: int) -> int:
    """As many as asked, or as the cluster's GPUs (else CPUs / cpus_per_worker) allow, never more than the work."""
    if runner.num_workers:
        wanted = runner.num_workers
    elif cluster_has_gpus():
        wanted = int(ray.cluster_resources()["GPU"])
    else:
        wanted = max(1, int(ray.cluster_resources().get("CPU", 1)) // runner.cpus_per_worker)
    return max(1, min(wanted, pending))


def planned_actors(runner: RunnerConfig) -> str:
    """How many shard actors this cluster allows (joins it when RAY_ADDRESS is set; never starts a local Ray)."""
    if os.environ.get("RAY_ADDRESS"):
        init_ray()
        where, gpus, cpus = "cluster", ray.cluster_resources().get("GPU", 0), ray.cluster_resources().get("CPU", 1)
    else:
        where, gpus, cpus = "this machine", torch.cuda.device_count(), os.cpu_count() or 1
    count = runner.num_workers or (int(gpus) if gpus else max(1, int(cpus) // runner.cpus_per_worker))
    unit = f"{int(gpus)} GPUs, one actor each" if gpus else f"{int(cpus)} CPUs, {runner.cpus_per_worker} per actor"
    return f"{count} on {where} ({unit})"


@ray.remote
class ShardWorker:
    """Loads the teacher once, then does the class shards the driver hands it."""

    def __init__(self, store_root: str, storage_options: dict | None, data: DataConfig, data_options: dict,
                 num_classes: int, arch: str, state: bytes, threads: int) -> None:
        from lpld_ray.data import image_spec

        torch.set_num_threads(threads)
        self.spec, self.data, self.data_options = image_spec(data), data, data_options
        self.store = Store(store_root, storage_options)
        self.teacher = build_teacher(arch, state, num_classes, self.spec.channels, self.spec.size)
        self.device = next(self.teacher.parameters()).device
        self.real_train = None

    def pid(self) -> int:
        return os.getpid()

    def recover(self, shard: ClassShard, cfg: RecoverConfig, seed: int, inputs: str) -> dict:
        if cfg.source == "real" and self.real_train is None:  # read once per actor, not per shard
            self.real_train = load_dataset(self.data, "train", self.data_options)
        return recover_shard(self.store, self.teacher, self.spec, cfg, shard, seed, self.device, self.real_train, inputs)

    def relabel(self, shard: ClassShard, shards: list[ClassShard], cfg: RelabelConfig, ipc: int, num_classes: int,
                seed: int, inputs: str) -> dict:
        """One labels shard, reading only its own images and its views' CutMix partners."""
        from lpld_ray.data import normalize
        from lpld_ray.labels import image_id_of, images_needed, relabel_shard, view_counts

        counts = view_counts(num_classes * ipc, cfg.epochs, cfg.compression, seed)
        ids = [image_id_of(c, i, ipc) for c in shard.class_ids for i in range(ipc)]
        images = load_images(self.store, ipc, images_needed(seed, ids, counts, cfg, self.spec.size), shards)
        return relabel_shard(self.store, self.teacher, lambda x: normalize(x, self.spec), images, ids, counts,
                             num_classes, cfg, seed, self.device, shard.name, inputs)


@ray.remote
def squeeze_task(part: ClassDataset, arch: str, state: bytes, batch_size: int, threads: int):
    torch.set_num_threads(threads)
    teacher = build_teacher(arch, state, part.num_classes, part.spec.channels, part.spec.size)
    return squeeze_partition(teacher, part, batch_size)


@ray.remote
def evaluate_teacher_task(data: DataConfig, data_options: dict, arch: str, state: bytes, batch_size: int,
                          threads: int) -> float:
    torch.set_num_threads(threads)
    return evaluate_given_teacher(data, data_options, arch, state, batch_size)


def shard_worker(cfg: Config, store: Store, state_ref: ray.ObjectRef, num_classes: int) -> Any:
    """A new shard actor: one GPU (or runner.cpus_per_worker CPUs), the teacher from the object store."""
    return ShardWorker.options(**actor_options(cfg.runner)).remote(
        store.root, store.storage_options, cfg.data, data_options(cfg), num_classes, cfg.teacher.arch, state_ref,
        cfg.runner.cpus_per_worker)


def data_options(cfg: Config) -> dict:
    """fsspec options of the dataset's root (an ImageFolder on object storage), from the storage: section."""
    return storage_options(cfg.storage, cfg.data.root)


def raise_user_error(err: ray.exceptions.RayTaskError) -> None:
    """Re-raise a task's LpldError (e.g. the store became unreachable) as itself: one line, not a traceback."""
    if isinstance(err.cause, LpldError):
        raise err.cause from None
    raise err


def get_or_raise(ref: ray.ObjectRef) -> Any:
    """``ray.get`` with a task's LpldError raised as itself."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        raise_user_error(err)


def run_shard_queue(
    stage: str,
    pending: list[ClassShard],
    make_actor: Callable[[], Any],
    submit: Callable[[Any, ClassShard], ray.ObjectRef],
    runner: RunnerConfig,
) -> list[dict]:
    """Hand shards to actors as they free up; a dead actor's shard goes back on the queue (bounded retries)."""
    queue, results, attempts = deque(pending), [], {s.index: 0 for s in pending}
    progress = Progress(stage, len(pending), runner.progress_every_s)
    actors = [make_actor() for _ in range(actor_count(runner, len(pending)))]
    idle, in_flight = list(range(len(actors))), {}
    while queue or in_flight:
        while queue and idle:
            slot, shard = idle.pop(), queue.popleft()
            in_flight[submit(actors[slot], shard)] = (slot, shard)
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        slot, shard = in_flight.pop(ready[0])
        try:
            results.append(ray.get(ready[0]))
            progress.advance()
        except ray.exceptions.RayTaskError as err:
            raise_user_error(err)
        except ray.exceptions.RayActorError as err:
            attempts[shard.index] += 1
            if attempts[shard.index] > runner.max_shard_retries:
                raise RuntimeError(f"{stage} shard {shard.name} lost its worker {attempts[shard.index]} times") from err
            log.warning("%s: worker for %s died (%s); shard goes back on the queue", stage, shard.name, type(err).__name__)
            queue.appendleft(shard)
            actors[slot] = make_actor()
        idle.append(slot)
    return results


@dataclass(frozen=True)
class TrainerSpec:
    """One Ray Train run of a stage: workers, CPUs each, failures to recover from, and what it is trained on."""

    num_workers: int
    cpus_per_worker: int
    max_failures: int = 0
    inputs: str = ""

    @property
    def run_name(self) -> str:
        """Same name = resume from its checkpoints; other inputs get another name, hence a fresh start."""
        return f"ray_train-{self.inputs[:16]}" if self.inputs else "ray_train"


def fit_with_ray_train(store: Store, stage: str, loop: Callable[[Any], None], job: Any, spec: TrainerSpec) -> None:
    """One TorchTrainer run whose checkpoints live under ``<run>/<stage>/<run_name>``; a failed worker group is
    restarted from the last checkpoint up to ``max_failures`` times."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    filesystem, path = store.pyarrow_fs()
    trainer = TorchTrainer(
        lambda config: loop(config["job"]),
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=cluster_has_gpus(),
                                     resources_per_worker={"CPU": spec.cpus_per_worker}),
        run_config=RunConfig(name=spec.run_name, storage_path=f"{path}/{stage}", storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=spec.max_failures)),
    )
    trainer.fit()


def train_once(store: Store, stage: str, shard: str, loop: Callable[[Any], None], job: Any, spec: TrainerSpec):
    """The stage's verified model manifest, training it with Ray Train first when there is none for these inputs."""
    manifest = current_shard(store, stage, shard, spec.inputs)
    if manifest is not None:
        log.info("%s: verified model already in the run; skipping", stage)
        return manifest
    fit_with_ray_train(store, stage, loop, job, spec)
    manifest = current_shard(store, stage, shard, spec.inputs)
    if manifest is None:
        raise RuntimeError(f"{stage}: training finished but committed no verified model")
    return manifest


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
    spec = TrainerSpec(cfg.teacher.num_workers, cfg.teacher.cpus_per_worker)
    manifest = train_once(store, TEACHER_STAGE, TEACHER_SHARD, teacher_train_loop, job, spec)
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
    from lpld_ray.labels import current_labels

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
    from lpld_ray.student import STUDENT_SHARD, STUDENT_STAGE, StudentJob, student_train_loop

    from lpld_ray.labels import LABELS_STAGE

    names = [s.name for s in shards]
    require_verified(store, LABELS_STAGE, names, "train", "relabel")  # never train on a truncated or altered object
    require_verified(store, IMAGES_STAGE, names, "train", "recover")
    inputs = inputs_digest(store, (LABELS_STAGE, IMAGES_STAGE), names)  # what the student learns from
    job = StudentJob(cfg.data, cfg.train, store.root, store.storage_options, cfg.seed, cfg.recover.ipc, inputs,
                     data_options(cfg))
    spec = TrainerSpec(cfg.train.num_workers, cfg.train.cpus_per_worker, cfg.train.max_failures, inputs)
    manifest = train_once(store, STUDENT_STAGE, STUDENT_SHARD, student_train_loop, job, spec)
    log.info("train: student test top-1 %.4f (resumed from epoch %d)", manifest.meta["student_top1"], manifest.meta["resumed_from"])
    return {"student_top1": manifest.meta["student_top1"], "resumed_from": manifest.meta["resumed_from"]}


def run_report(cfg: Config, store: Store, summary: dict[str, dict]) -> dict:
    """report/report.json from the committed shards, and the human summary line."""
    from lpld_ray.report import build_report, human_summary, write_report
    from lpld_ray.student import STUDENT_SHARD, STUDENT_STAGE

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
