"""Command line of jobs/distill.py: parse, validate everything before writing, hold the run's lease, run the stages."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable, Sequence

import torch

from lpld_ray.config import Config
from lpld_ray.config_errors import bad_value
from lpld_ray.config_io import load_config
from lpld_ray.data.base import ClassDataset, image_spec
from lpld_ray.data.datasets import check_dataset, read_both_splits
from lpld_ray.distributed.cluster import (
    check_training_gpus,
    init_ray,
    node_resources,
    planned_actors,
    request_from_autoscaler,
    wait_for_resources,
)
from lpld_ray.distributed.driver import run_pipeline
from lpld_ray.errors import LpldError
from lpld_ray.method.models import build_model, load_weights
from lpld_ray.pipeline.estimate import DatasetShape, dataset_shape, plan_lines
from lpld_ray.pipeline.fits import check_fits, local_memory, node_memory
from lpld_ray.pipeline.plan import check_resources, check_stage_inputs, wanted_bundles
from lpld_ray.pipeline.report_md import REPORT_MD_OBJECT
from lpld_ray.pipeline.shards import plan_class_shards
from lpld_ray.pipeline.stages import STAGE_NAMES
from lpld_ray.pipeline.start_over import require_a_run, start_over
from lpld_ray.store.lease import RunLease
from lpld_ray.store.run_record import check_run_record, data_checked_before, write_run_record
from lpld_ray.store.storage import Store, read_uri_bytes, storage_options

log = logging.getLogger("lpld_ray")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The options, and any words argparse did not recognise (refused with one line once logging is set up)."""
    parser = argparse.ArgumentParser(description="LPLD dataset distillation on Ray.")
    parser.add_argument("--config", help="YAML preset (default: built-in Fashion-MNIST defaults)")
    parser.add_argument("--run-dir", default="runs/default", help="run root: a path, or a file://, s3:// or gs:// URI")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. recover.iterations=4000 (repeatable)")
    parser.add_argument("--stages", default=",".join(STAGE_NAMES), help=f"comma-separated subset of {','.join(STAGE_NAMES)}")
    parser.add_argument("--force-new", action="store_true",
                        help="delete this run directory's run.yaml and stage outputs and start over")
    parser.add_argument("--verify", action="store_true",
                        help="also read back every object of the shards the asked stages find committed (size, "
                             "sha256) and redo the damaged ones; without it only manifests decide what is done, and "
                             "each object is checked by the worker that reads it")
    parser.add_argument("--plan", action="store_true",
                        help="check the input, print work units, storage and memory estimates; run nothing")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_known_args(argv)


def refuse_extra(extra: list[str]) -> None:
    """e.g. `--set recover.ipc 5`: say what --set takes instead of argparse's "unrecognized arguments"."""
    if extra:
        raise LpldError(f"unexpected argument '{extra[0]}' (allowed: the options of --help; --set takes KEY=VALUE as "
                        "one word, e.g. --set recover.ipc=5)")


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    for stage in stages:
        if stage not in STAGE_NAMES:
            raise LpldError(f"unknown stage '{stage}' in --stages (allowed: {', '.join(STAGE_NAMES)})")
    if not stages:
        raise LpldError(f"--stages is empty (allowed: a comma-separated subset of {', '.join(STAGE_NAMES)})")
    return stages


def check_run_dir(run_dir: str) -> None:
    """A run directory every Ray process can reach: not empty (that would be the current folder), not memory://."""
    if not run_dir.strip():
        raise LpldError("--run-dir is empty (allowed: a path, or a file://, s3:// or gs:// URI)")
    if run_dir.startswith("memory://"):
        raise LpldError(f"--run-dir '{run_dir}': a memory:// store lives in one process, and the stages run in Ray "
                        "workers (allowed: a path, or a file://, s3:// or gs:// URI)")


def open_run_dir(cfg: Config, run_dir: str) -> Store:
    """The run directory's Store, checked reachable and writable; nothing is created."""
    check_run_dir(run_dir)
    root = run_dir if "://" in run_dir else os.path.abspath(run_dir)
    store = Store(root, storage_options(cfg.storage, root))
    store.check_reachable()
    return store


def check_real_images(cfg: Config, train: ClassDataset) -> None:
    """recover.source real draws recover.ipc distinct training images of every class: each class must have them."""
    if cfg.recover.source != "real":
        return
    counts = torch.bincount(train.targets, minlength=train.num_classes)
    fewest = int(counts.argmin())
    if int(counts[fewest]) < cfg.recover.ipc:
        raise bad_value("recover.ipc", cfg.recover.ipc, f"at most {int(counts[fewest])} with recover.source real: class "
                        f"'{train.class_names[fewest]}' has {int(counts[fewest])} training images")


def check_data(cfg: Config, checked_before: bool = False) -> DatasetShape:
    """The dataset (both splits read or listed, an image of each decoded; only its files or class folders when
    ``checked_before`` by the job that started the run) and the teacher's weights."""
    data_options = storage_options(cfg.storage, cfg.data.root)
    if checked_before:
        spec = image_spec(cfg.data)
        shape = DatasetShape(check_dataset(cfg.data, data_options), spec.channels, spec.size, None)
    else:
        train, test = read_both_splits(cfg.data, data_options)
        check_real_images(cfg, train)
        shape = DatasetShape(test.num_classes, test.spec.channels, test.spec.size, len(train))
    if cfg.teacher.weights:
        options = storage_options(cfg.storage, cfg.teacher.weights)
        load_weights(build_model(cfg.teacher.arch, shape.num_classes, shape.channels, shape.size),
                     cfg.teacher.weights, lambda uri: read_uri_bytes(uri, options))
    return shape


def check_the_run(cfg: Config, store: Store, stages: list[str], num_classes: int, force_new: bool) -> bool:
    """What is in the run directory: a run this config may resume (True), none, or one --force-new may start over;
    and each asked stage's input. Reads only."""
    if force_new:
        require_a_run(store)
    resuming = False if force_new else check_run_record(store, cfg)
    check_stage_inputs(cfg, store, stages, plan_class_shards(num_classes, cfg.runner.class_shard_size), force_new)
    return resuming


def show_plan(args: argparse.Namespace) -> None:
    """--plan: the checks that need no data read beyond folder listings, the estimates, and whether the work fits
    (this machine, or the cluster of RAY_ADDRESS); writes nothing."""
    cfg = load_config(args.config, args.overrides)
    stages = parse_stages(args.stages)
    store = open_run_dir(cfg, args.run_dir)
    shape = dataset_shape(cfg.data)
    check_the_run(cfg, store, stages, shape.num_classes, args.force_new)
    for line in plan_lines(cfg, shape, planned_actors(cfg.runner)):
        log.info("plan: %s", line)
    if os.environ.get("RAY_ADDRESS"):
        nodes = node_resources()
        check_fits(cfg, shape, stages, node_memory(nodes), args.run_dir, gpus=any(n.get("GPU") for n in nodes))
    else:
        check_fits(cfg, shape, stages, local_memory(), args.run_dir, "this machine (RAY_ADDRESS plans for a cluster)",
                   gpus=torch.cuda.is_available())
    log.info("plan: the asked stages fit (memory per worker, disk at the run directory)")


def check_cluster(cfg: Config, stages: list[str], shape: DatasetShape, run_dir: str) -> None:
    """Workers and memory against the cluster: refused at once on a fixed one, waited for (runner.resource_wait_s)
    on one that may autoscale."""
    gpus = sum(node.get("GPU", 0.0) for node in node_resources())
    wait_for_resources(lambda nodes: check_resources(cfg, stages, nodes), node_resources,
                       cfg.runner.resource_wait_s, wanted_bundles(cfg, stages, gpus > 0))
    check_fits(cfg, shape, stages, node_memory(node_resources()), run_dir, gpus=gpus > 0)
    check_training_gpus("train" in stages or ("teacher" in stages and not cfg.teacher.weights), gpus)


def interrupt_on(signum: int) -> Callable[..., Any] | int | None:
    """Turn ``signum`` (e.g. the SIGTERM of `ray job stop`) into SystemExit so the lease is released on the way out;
    returns the handler it replaced (None off the main thread, where nothing is changed)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signum, lambda *_: sys.exit(128 + signum))


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.plan:
        try:
            refuse_extra(extra)
            show_plan(args)
        except LpldError as err:
            log.error("%s", err)
            return 2
        return 0

    lease, previous_handler, asked_autoscaler = None, None, False
    try:
        refuse_extra(extra)
        cfg = load_config(args.config, args.overrides)
        stages = parse_stages(args.stages)
        store = open_run_dir(cfg, args.run_dir)
        shape = check_data(cfg, checked_before=not args.force_new and data_checked_before(store, cfg))
        resuming = check_the_run(cfg, store, stages, shape.num_classes, args.force_new)
        init_ray()  # the cluster of `ray job submit`, or a local Ray on this machine
        asked_autoscaler = cfg.runner.resource_wait_s > 0
        check_cluster(cfg, stages, shape, args.run_dir)
        lease = RunLease(store, cfg.storage)
        lease.acquire()
        previous_handler = interrupt_on(signal.SIGTERM)
        lease.keep_fresh(lambda job: (log.error("another job (%s) took over this run's lease: stopping", job),
                                      signal.raise_signal(signal.SIGTERM)))
        if args.force_new:
            removed = start_over(store)
            log.warning("--force-new: deleted the %d objects of the earlier run at %s", removed, store.root)
        if not resuming:
            write_run_record(store, cfg)
        summary = run_pipeline(cfg, store, stages, shape.num_classes, args.verify)
    except LpldError as err:
        log.error("%s", err)
        return 2
    finally:
        if lease is not None:
            lease.release()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        if asked_autoscaler:
            request_from_autoscaler([])  # withdraw what the wait asked for
    log.info("summary: %s", json.dumps(summary, sort_keys=True))
    if "report" in summary:
        log.info("done: the report to read is %s", summary["report"]["report_md"])
    else:
        log.info("done: no report this time; add report to --stages to write it at %s", store.uri(REPORT_MD_OBJECT))
    return 0
