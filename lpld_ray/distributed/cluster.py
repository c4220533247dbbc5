"""The Ray cluster: joining or starting it, what it holds, how many shard actors fit, task errors as user errors."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
import torch

from lpld_ray.config import RunnerConfig
from lpld_ray.errors import LpldError

log = logging.getLogger(__name__)


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
