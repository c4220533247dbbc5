"""Command line of jobs/distill.py: parse, validate everything before writing, hold the run's lease, run the stages."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Sequence

from lpld_ray.config import Config, load_config
from lpld_ray.data.datasets import check_dataset, load_dataset
from lpld_ray.distributed.cluster import init_ray, node_resources, planned_actors
from lpld_ray.distributed.driver import run_pipeline
from lpld_ray.errors import LpldError
from lpld_ray.method.models import build_model, load_weights
from lpld_ray.pipeline.estimate import dataset_shape, plan_lines
from lpld_ray.pipeline.plan import check_resources, check_stage_inputs
from lpld_ray.pipeline.shards import plan_class_shards
from lpld_ray.pipeline.stages import STAGE_NAMES
from lpld_ray.pipeline.start_over import require_a_run, start_over
from lpld_ray.store.lease import RunLease
from lpld_ray.store.run_record import check_run_record, write_run_record
from lpld_ray.store.storage import Store, read_uri_bytes, storage_options

log = logging.getLogger("lpld_ray")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LPLD dataset distillation on Ray.")
    parser.add_argument("--config", help="YAML preset (default: built-in Fashion-MNIST defaults)")
    parser.add_argument("--run-dir", default="runs/default", help="run root: a path, or a file://, s3:// or gs:// URI")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. recover.iterations=4000 (repeatable)")
    parser.add_argument("--stages", default=",".join(STAGE_NAMES), help=f"comma-separated subset of {','.join(STAGE_NAMES)}")
    parser.add_argument("--force-new", action="store_true",
                        help="delete this run directory's run.yaml and stage outputs and start over")
    parser.add_argument("--plan", action="store_true", help="print work units, storage and memory estimates; run nothing")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args, extra = parser.parse_known_args(argv)
    if extra:  # e.g. `--set recover.ipc 5`: say what --set takes instead of argparse's "unrecognized arguments"
        parser.error(f"unexpected argument '{extra[0]}' (allowed: the options of --help; --set takes KEY=VALUE as one "
                     "word, e.g. --set recover.ipc=5)")
    return args


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


def preflight(cfg: Config, run_dir: str) -> tuple[Store, int]:
    """Every check that can fail on user input, done before anything is written."""
    check_run_dir(run_dir)
    root = run_dir if "://" in run_dir else os.path.abspath(run_dir)
    store = Store(root, storage_options(cfg.storage, root))
    store.check_reachable()
    data_options = storage_options(cfg.storage, cfg.data.root)
    check_dataset(cfg.data, data_options)
    probe = load_dataset(cfg.data, "test", data_options)
    if cfg.data.name != "image_folder":  # small files: read the training split now, not after run.yaml is written
        load_dataset(cfg.data, "train", data_options)
    if cfg.teacher.weights:
        options = storage_options(cfg.storage, cfg.teacher.weights)
        load_weights(build_model(cfg.teacher.arch, probe.num_classes, probe.spec.channels, probe.spec.size),
                     cfg.teacher.weights, lambda uri: read_uri_bytes(uri, options))
    return store, probe.num_classes


def interrupt_on(signum: int):
    """Turn ``signum`` (e.g. the SIGTERM of `ray job stop`) into SystemExit so the lease is released on the way out;
    returns the handler it replaced (None off the main thread, where nothing is changed)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signum, lambda *_: sys.exit(128 + signum))


def show_plan(cfg: Config) -> None:
    """--plan: estimates only; reads no data beyond folder listings and writes nothing."""
    for line in plan_lines(cfg, dataset_shape(cfg.data), planned_actors(cfg.runner)):
        log.info("plan: %s", line)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.plan:
        try:
            parse_stages(args.stages)
            check_run_dir(args.run_dir)
            show_plan(load_config(args.config, args.overrides))
        except LpldError as err:
            log.error("%s", err)
            return 2
        return 0

    lease, previous_handler = None, None
    try:
        cfg = load_config(args.config, args.overrides)
        stages = parse_stages(args.stages)
        store, num_classes = preflight(cfg, args.run_dir)
        if args.force_new:
            require_a_run(store)
        resuming = False if args.force_new else check_run_record(store, cfg)
        check_stage_inputs(cfg, store, stages, plan_class_shards(num_classes, cfg.runner.class_shard_size), args.force_new)
        init_ray()  # the cluster of `ray job submit`, or a local Ray on this machine
        check_resources(cfg, stages, node_resources())
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
        summary = run_pipeline(cfg, store, stages, num_classes)
    except LpldError as err:
        log.error("%s", err)
        return 2
    finally:
        if lease is not None:
            lease.release()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    log.info("summary: %s", json.dumps(summary, sort_keys=True))
    return 0
