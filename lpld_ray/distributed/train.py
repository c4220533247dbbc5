"""Ray Train runs of the teacher and the student: TorchTrainer set-up, checkpoints under the run, once per inputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from lpld_ray.distributed.cluster import cluster_has_gpus, raise_user_error
from lpld_ray.distributed.ray_logs import TRAIN_LOG_LEVEL
from lpld_ray.distributed.train_loop import TrainTask, train_task_loop
from lpld_ray.store.layout import TRAIN_RUN_PREFIX
from lpld_ray.store.manifest import Manifest, current_shard
from lpld_ray.store.storage import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerSpec:
    """One Ray Train run of a stage: workers, CPUs each, failures to recover from, checkpoints kept, and what it is
    trained on (``inputs``: checked against the committed model's manifest; ``run_key``: names the run)."""

    num_workers: int
    cpus_per_worker: int
    max_failures: int = 0
    inputs: str = ""
    checkpoints_to_keep: int | None = None  # None: Ray keeps every checkpoint
    run_key: str = ""  # defaults to inputs

    @classmethod
    def of(cls, section: Any, inputs: str = "", run_key: str = "") -> "TrainerSpec":
        """From a teacher/train config section (num_workers, cpus_per_worker, max_failures, checkpoints_to_keep)."""
        return cls(section.num_workers, section.cpus_per_worker, section.max_failures, inputs,
                   section.checkpoints_to_keep, run_key)

    @property
    def run_name(self) -> str:
        """Same name = resume from its checkpoints; other inputs get another name, hence a fresh start."""
        key = self.run_key or self.inputs
        return f"{TRAIN_RUN_PREFIX}-{key[:16]}" if key else TRAIN_RUN_PREFIX


def fit_with_ray_train(store: Store, stage: str, task: TrainTask, spec: TrainerSpec) -> None:
    """One TorchTrainer run of the shared loop whose checkpoints live under ``<run>/<stage>/<run_name>`` (the newest
    ``checkpoints_to_keep`` of them); a failed worker group restarts from the last one up to ``max_failures`` times,
    and a re-run with the same run name resumes from it."""
    filesystem, path = store.pyarrow_fs()
    trainer = TorchTrainer(
        train_task_loop,
        train_loop_config={"task": task},
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=cluster_has_gpus(),
                                     resources_per_worker={"CPU": spec.cpus_per_worker}),
        run_config=RunConfig(name=spec.run_name, storage_path=f"{path}/{stage}", storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=spec.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoints_to_keep),
                             logging_config=LoggingConfig(log_level=TRAIN_LOG_LEVEL)),  # not Ray Train's chatter
    )
    try:
        trainer.fit()
    except Exception as err:  # a worker's LpldError (a damaged input: CorruptShard) as itself, not Ray's wrapping
        raise_user_error(err)


def train_once(store: Store, stage: str, shard: str, task: TrainTask, spec: TrainerSpec,
               verify: bool = False) -> Manifest:
    """The stage's committed model manifest, training it with Ray Train first when there is none for these inputs
    (``verify``: the model's objects are checked too)."""
    manifest = current_shard(store, stage, shard, spec.inputs, verify)
    if manifest is not None:
        log.info("%s: model already committed for these inputs; skipping", stage)
        return manifest
    fit_with_ray_train(store, stage, task, spec)
    store.forget(stage)  # Ray Train's rank 0 committed there
    manifest = current_shard(store, stage, shard, spec.inputs)
    if manifest is None:
        raise RuntimeError(f"{stage}: training finished but committed no verified model")
    return manifest
