"""Ray Train runs of the teacher and the student: TorchTrainer set-up, checkpoints under the run, once per inputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from lpld_ray.distributed.cluster import cluster_has_gpus
from lpld_ray.store.manifest import current_shard
from lpld_ray.store.storage import Store

log = logging.getLogger(__name__)


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
