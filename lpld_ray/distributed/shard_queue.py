"""The class-shard queue: shards handed to actors as they free up; a dead actor's shard goes back on the queue."""

from __future__ import annotations

import logging
from typing import Any, Callable

import ray

from lpld_ray.config import RunnerConfig
from lpld_ray.distributed.cluster import actor_count, raise_user_error
from lpld_ray.pipeline.progress import Progress
from lpld_ray.pipeline.queue import ShardQueue
from lpld_ray.pipeline.shards import ClassShard

log = logging.getLogger(__name__)


def run_shard_queue(
    stage: str,
    pending: list[ClassShard],
    make_actor: Callable[[], Any],
    submit: Callable[[Any, ClassShard], ray.ObjectRef],
    runner: RunnerConfig,
) -> list[dict]:
    """Hand shards to actors as they free up; a dead actor's shard goes back on the queue (bounded retries)."""
    queue, results = ShardQueue(stage, pending, runner.max_shard_retries), []
    progress = Progress(stage, len(pending), runner.progress_every_s)
    actors = [make_actor() for _ in range(actor_count(runner, len(pending)))]
    idle, in_flight = list(range(len(actors))), {}
    while queue or in_flight:
        while queue and idle:
            slot, shard = idle.pop(), queue.take()
            in_flight[submit(actors[slot], shard)] = (slot, shard)
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        slot, shard = in_flight.pop(ready[0])
        try:
            results.append(ray.get(ready[0]))
            progress.advance()
        except ray.exceptions.RayTaskError as err:
            raise_user_error(err)
        except ray.exceptions.RayActorError as err:
            queue.worker_lost(shard, type(err).__name__)
            actors[slot] = make_actor()
        idle.append(slot)
    return results
