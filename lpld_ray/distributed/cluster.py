"""The Ray cluster: joining or starting it, what it holds, how many shard actors fit, task errors as user errors."""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable

import ray
import torch

from lpld_ray.config import RunnerConfig
from lpld_ray.distributed.ray_logs import filter_forwarded_logs
from lpld_ray.errors import LpldError
from lpld_ray.pipeline.plan import workers_that_fit

log = logging.getLogger(__name__)


def init_ray() -> None:
    """Join the cluster of ``ray job submit`` (RAY_ADDRESS) or start a local Ray on this machine."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING, log_to_driver=True)
        filter_forwarded_logs()  # Ray's own lines that no setting switches off
        log.info("ray cluster resources: %s", {k: v for k, v in ray.cluster_resources().items() if "node" not in k})


def node_resources() -> list[dict[str, float]]:
    """The resources of every alive node of the cluster."""
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def cluster_resources() -> tuple[float, float]:
    """(GPUs, CPUs) of the cluster this driver is connected to."""
    resources = ray.cluster_resources()
    return resources.get("GPU", 0.0), resources.get("CPU", 1.0)


def cluster_has_gpus() -> bool:
    return cluster_resources()[0] > 0


@ray.remote(num_cpus=0)
def _sees_cuda() -> bool:
    return torch.cuda.is_available()


def declared_gpus_without_cuda(timeout_s: float = 60.0) -> bool:
    """On a cluster that declares GPUs: True when a task given one sees no CUDA device (nodes started with --num-gpus on
    machines without CUDA, or a CPU build of torch there). A probe that waits longer than ``timeout_s`` for a free
    GPU proves nothing: False, and a line saying so."""
    probe = _sees_cuda.options(num_gpus=1).remote()
    try:
        return not ray.get(probe, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(probe, force=True)
        log.info("CUDA on the GPU nodes not checked: no GPU was free for %.0f s", timeout_s)
        return False


def check_training_gpus(trains: bool, gpus: float) -> None:
    """Refuse in one line a Ray Train stage on ``gpus`` declared GPUs without CUDA: Ray Train would start NCCL and
    fail."""
    if trains and gpus and declared_gpus_without_cuda():
        raise LpldError(f"the cluster declares {gpus:g} GPUs but a task given one sees no CUDA (torch.cuda.is_available() "
                        "is false there): Ray Train's NCCL cannot start; start those nodes without --num-gpus or with a "
                        "CUDA build of torch (squeeze, recover and relabel alone do run, on the CPU)")


def actor_options(runner: RunnerConfig) -> dict[str, Any]:
    """One GPU (and a CPU to feed it) per shard actor on a GPU cluster, else runner.cpus_per_worker CPUs."""
    if cluster_has_gpus():
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": runner.cpus_per_worker}


def actor_count(runner: RunnerConfig, pending: int) -> int:
    """As many shard actors as fit the cluster (or as asked), never more than the work."""
    return max(1, min(workers_that_fit(runner, *cluster_resources()), pending))


def planned_actors(runner: RunnerConfig) -> str:
    """How many shard actors this cluster allows (joins it when RAY_ADDRESS is set; never starts a local Ray)."""
    if os.environ.get("RAY_ADDRESS"):
        init_ray()
        where, (gpus, cpus) = "cluster", cluster_resources()
    else:
        where, gpus, cpus = "this machine", torch.cuda.device_count(), os.cpu_count() or 1
    unit = f"{int(gpus)} GPUs, one actor each" if gpus else f"{int(cpus)} CPUs, {runner.cpus_per_worker} per actor"
    return f"{workers_that_fit(runner, gpus, cpus)} on {where} ({unit})"


def user_error_in(err: BaseException) -> LpldError | None:
    """The LpldError a Ray error carries, however wrapped (a task's cause, Ray Train's worker failures, chained
    exceptions); None when there is none."""
    pending, seen = [err], set()
    while pending:
        e = pending.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, LpldError) and not isinstance(e, ray.exceptions.RayError):
            return e
        pending += [getattr(e, "cause", None), getattr(e, "controller_failure", None), e.__cause__, e.__context__,
                    *(getattr(e, "worker_failures", None) or {}).values()]
    return None


def raise_user_error(err: BaseException) -> None:
    """Re-raise a task's LpldError (e.g. the store became unreachable) as itself: one line, not a traceback."""
    found = user_error_in(err)
    if found is not None:
        raise found from None
    raise err


def get_or_raise(ref: ray.ObjectRef) -> Any:
    """``ray.get`` with a task's LpldError raised as itself."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        raise_user_error(err)


def request_from_autoscaler(bundles: list[dict[str, float]]) -> None:
    """Ask the cluster's autoscaler (if any) for ``bundles`` at once; an empty list withdraws the request. Without an
    autoscaler nothing happens."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as err:  # no autoscaler, or an SDK that changed: the wait below still times out
        log.debug("autoscaler request of %s not made: %s", bundles, err)


def wait_for_resources(check: Callable[[list[dict[str, float]]], None], nodes: Callable[[], list[dict[str, float]]],
                       wait_s: float, bundles: list[dict[str, float]], poll_s: float = 5.0) -> None:
    """``check(nodes())`` at once; on a cluster that may autoscale (``wait_s`` > 0, runner.resource_wait_s) ask its
    autoscaler for ``bundles`` and check again every ``poll_s`` seconds, saying what it waits for, until ``wait_s``
    have passed; then fail with one line. With ``wait_s`` 0 (a fixed cluster) the first failure is final."""
    try:
        check(nodes())
        return
    except LpldError as err:
        if wait_s <= 0:
            raise
        missing = err
    request_from_autoscaler(bundles)
    started = time.monotonic()
    said = -math.inf
    while (waited := time.monotonic() - started) < wait_s:
        if waited - said >= 60:
            log.warning("waiting up to %.0f s more (runner.resource_wait_s) for the cluster to grow: %s",
                        wait_s - waited, missing)
            said = waited
        time.sleep(min(poll_s, wait_s - waited))
        try:
            check(nodes())
            log.info("the cluster now holds what this run asks for (after %.0f s)", time.monotonic() - started)
            return
        except LpldError as err:
            missing = err
    raise LpldError(f"{missing}; waited {wait_s:g} s (runner.resource_wait_s) for the cluster to grow")
