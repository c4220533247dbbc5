"""The job's shard actors and the class-shard queue: shards handed out as actors free up, a dead actor's requeued."""

from __future__ import annotations

import logging
from typing import Any, Callable

import ray

from lpld_ray.config import RunnerConfig
from lpld_ray.distributed.cluster import actor_count, get_or_raise, raise_user_error
from lpld_ray.pipeline.progress import Progress
from lpld_ray.pipeline.queue import ShardLost, ShardQueue
from lpld_ray.pipeline.shards import ClassShard

log = logging.getLogger(__name__)

Call = Callable[[Any], ray.ObjectRef]  # a method call on one actor


class ActorPool:
    """The shard actors of one job, kept from stage to stage (squeeze, recover, relabel: each actor starts and loads
    the teacher once), released before a stage that needs their CPUs (Ray Train) and at the end of the job."""

    def __init__(self, make_actor: Callable[[], Any]) -> None:
        self._make_actor = make_actor
        self.actors: list[Any] = []

    def take(self, count: int) -> list[Any]:
        """The first ``count`` actors, started as needed."""
        while len(self.actors) < count:
            self.actors.append(self._make_actor())
        return self.actors[:count]

    def replace(self, slot: int) -> Any:
        """A new actor in ``slot`` (its old one died)."""
        self.actors[slot] = self._make_actor()
        return self.actors[slot]

    def run(self, slot: int, call: Call, retries: int, what: str) -> Any:
        """``call`` on the actor of ``slot``, and its result (see result)."""
        return self.result(slot, call, call(self.actors[slot]), retries, what)

    def result(self, slot: int, call: Call, first: ray.ObjectRef, retries: int, what: str) -> Any:
        """The result of ``first`` (``call`` made on the actor of ``slot``); when that actor dies, ``call`` again on a
        new one, at most ``retries`` times."""
        ref = first
        for attempt in range(retries + 1):
            try:
                return get_or_raise(ref)
            except ray.exceptions.RayActorError as err:
                if attempt == retries:
                    raise ShardLost(f"{what} lost its worker {retries + 1} times (runner.max_shard_retries is "
                                       f"{retries}); last: {type(err).__name__}") from None
                log.warning("%s: its worker died (%s); it goes to a new one", what, type(err).__name__)
                ref = call(self.replace(slot))

    def release(self) -> None:
        """Stop every actor (their CPUs or GPUs go back to the cluster)."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def run_shard_queue(stage: str, pending: list[ClassShard], pool: ActorPool,
                    submit: Callable[[Any, ClassShard], ray.ObjectRef], runner: RunnerConfig) -> list[dict]:
    """Hand shards to the pool's actors as they free up; a dead actor's shard goes back on the queue (bounded
    retries)."""
    queue, results = ShardQueue(stage, pending, runner.max_shard_retries), []
    progress = Progress(stage, len(pending), runner.progress_every_s)
    actors = pool.take(actor_count(runner, len(pending)))
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
            actors[slot] = pool.replace(slot)
        idle.append(slot)
    return results
