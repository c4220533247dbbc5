"""Before any work: what each asked stage needs from the run already, checked from the stage table."""

from __future__ import annotations

from lpld_ray.config import Config, RunnerConfig
from lpld_ray.errors import LpldError
from lpld_ray.pipeline.shards import ClassShard
from lpld_ray.pipeline.stages import BY_NAME, STAGE_NAMES, output_shards
from lpld_ray.store.label_table import LABEL_SCHEMA_VERSION
from lpld_ray.store.layout import LABELS_STAGE
from lpld_ray.store.manifest import read_manifests, shard_problem
from lpld_ray.store.storage import Store


def missing_shards(store: Store, stage: str, names: list[str], fresh: bool) -> list[str]:
    """The shards of ``stage`` among ``names`` without a manifest (all of them when the run is about to be emptied).
    Only manifests are read here; the stage that reads the objects verifies them."""
    folder = BY_NAME[stage].folder
    return list(names) if fresh else [n for n, m in read_manifests(store, folder, names).items() if m is None]


def stages_to_run(cfg: Config, store: Store, asked: list[str], shards: list[ClassShard], fresh: bool) -> list[str]:
    """``asked`` plus every stage upstream of them whose output the run lacks, in table order: what a user must run."""
    wanted, pending = set(asked), list(asked)
    while pending:
        for producer in BY_NAME[pending.pop()].reads(cfg):
            names = output_shards(producer, cfg, shards)
            if producer not in wanted and missing_shards(store, producer, names, fresh):
                wanted.add(producer)
                pending.append(producer)
    return [name for name in STAGE_NAMES if name in wanted]


def check_stage_inputs(cfg: Config, store: Store, asked: list[str], shards: list[ClassShard], fresh: bool = False) -> None:
    """Before any work: every asked stage's input is either made by an earlier asked stage or already in the run
    (``fresh``: the run is about to be emptied, so nothing in it counts). Fails with one line naming the first
    missing shard and the stages to run."""
    for stage in (BY_NAME[name] for name in STAGE_NAMES if name in asked):
        for producer in stage.reads(cfg):
            if producer in asked:
                continue
            names = output_shards(producer, cfg, shards)
            missing = missing_shards(store, producer, names, fresh)
            if missing:
                chain = ",".join(stages_to_run(cfg, store, asked, shards, fresh))
                where = f"{BY_NAME[producer].folder}/{missing[0]}"
                gone = "is deleted by --force-new" if fresh and not missing_shards(store, producer, names, False) \
                    else f"is missing ({len(missing)} of {len(names)} shards)"
                raise LpldError(f"{stage.name} needs the {producer} stage's output, but {where} {gone}: "
                                f"run with --stages {chain}")
            if producer == "relabel":
                require_label_schema(store, names)


def require_label_schema(store: Store, names: list[str]) -> None:
    """Fail with one line naming the shard when a labels shard has a schema version this lpld_ray cannot read."""
    for name, manifest in read_manifests(store, LABELS_STAGE, names).items():
        found = manifest.meta.get("schema_version") if manifest else LABEL_SCHEMA_VERSION
        if found != LABEL_SCHEMA_VERSION:
            raise LpldError(f"train cannot read {LABELS_STAGE}/{name}: label schema version {found} is not supported "
                            f"(supported: {LABEL_SCHEMA_VERSION}): run with --stages relabel,train to redo it")


def require_verified(store: Store, stage: str, names: list[str], needed_by: str, producer: str) -> None:
    """Fail with one line naming the object when an input shard does not verify (truncated, altered, missing)."""
    for name in names:
        _manifest, problem = shard_problem(store, stage, name)
        if problem is not None:
            raise LpldError(f"{needed_by} will not use {stage}/{name}: {problem}; run with --stages {producer},{needed_by} "
                            "to redo it")


def workers_that_fit(runner: RunnerConfig, gpus: float, cpus: float) -> int:
    """Shard actors (or squeeze task slots) that run at once: one per GPU, else CPUs // runner.cpus_per_worker, at
    most runner.num_workers when set; at least one. Never more than fit: a queued actor would wait for a finished
    one, which keeps its resources, forever."""
    fit = int(gpus) if gpus >= 1 else max(1, int(cpus) // runner.cpus_per_worker)
    return min(runner.num_workers, fit) if runner.num_workers else fit


def check_resources(cfg: Config, asked: list[str], nodes: list[dict[str, float]]) -> None:
    """Before anything starts: the workers of every asked stage fit this cluster's nodes (Ray would otherwise wait
    for resources that never come). ``nodes``: each alive node's resources, e.g. {"CPU": 16, "GPU": 8}."""
    most = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    cpus, gpus = sum(n.get("CPU", 0.0) for n in nodes), sum(n.get("GPU", 0.0) for n in nodes)
    if {"squeeze", "recover", "relabel"} & set(asked) or ("teacher" in asked and cfg.teacher.weights):
        _fits_a_node("runner.cpus_per_worker", cfg.runner.cpus_per_worker, 1 if gpus else most)
    trained = [(name, section) for name, section in (("teacher", cfg.teacher), ("train", cfg.train))
               if name in asked and not (name == "teacher" and cfg.teacher.weights)]
    for name, section in trained:
        _fits_a_node(f"{name}.cpus_per_worker", section.cpus_per_worker, most)
        need = section.num_workers * section.cpus_per_worker
        if need > cpus:
            raise LpldError(f"{name}.num_workers x {name}.cpus_per_worker is {section.num_workers} x "
                            f"{section.cpus_per_worker} = {need} CPUs, but this Ray cluster has {cpus:g} "
                            f"(allowed: at most {cpus:g} CPUs in all)")
        if gpus and section.num_workers > gpus:
            raise LpldError(f"{name}.num_workers is {section.num_workers}, one GPU each, but this Ray cluster has "
                            f"{gpus:g} GPUs (allowed: at most {gpus:g})")


def _fits_a_node(key: str, wanted: int, most: float) -> None:
    if wanted > most:
        raise LpldError(f"{key} is {wanted}, but the largest node of this Ray cluster has {most:g} CPUs "
                        f"(allowed: at most {most:g})")


def wanted_bundles(cfg: Config, asked: list[str], gpus: bool) -> list[dict[str, float]]:
    """What to ask an autoscaler for: the resource bundles of the asked stage that needs the most at once (a trained
    stage's worker group, or one shard actor)."""
    groups = [[{"CPU": float(cfg.runner.cpus_per_worker), **({"GPU": 1.0} if gpus else {})}]]
    for name, section in (("teacher", cfg.teacher), ("train", cfg.train)):
        if name in asked and not (name == "teacher" and cfg.teacher.weights):
            worker = {"CPU": float(section.cpus_per_worker), **({"GPU": 1.0} if gpus else {})}
            groups.append([dict(worker) for _ in range(section.num_workers)])
    return max(groups, key=lambda group: sum(b["CPU"] for b in group))
