"""Command line of jobs/distill.py: parse, validate everything before writing, then run the stages."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from lpld_ray.config import Config, load_config
from lpld_ray.errors import LpldError
from lpld_ray.plan import STAGE_ORDER as STAGES

log = logging.getLogger("lpld_ray")




def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LPLD dataset distillation on Ray.")
    parser.add_argument("--config", help="YAML preset (default: built-in Fashion-MNIST defaults)")
    parser.add_argument("--run-dir", default="runs/default", help="run root: a path, file://, s3://, gs:// or memory:// URI")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. recover.iterations=4000 (repeatable)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    for stage in stages:
        if stage not in STAGES:
            raise LpldError(f"unknown stage '{stage}' in --stages (allowed: {', '.join(STAGES)})")
    if not stages:
        raise LpldError(f"--stages is empty (allowed: a comma-separated subset of {', '.join(STAGES)})")
    return stages


def preflight(cfg: Config, run_dir: str) -> tuple["Store", int]:  # noqa: F821
    """Every check that can fail on user input, done before anything is written."""
    from lpld_ray.data import check_dataset, load_dataset
    from lpld_ray.models import build_model, load_weights
    from lpld_ray.storage import Store

    store = Store(run_dir if "://" in run_dir else os.path.abspath(run_dir))
    check_dataset(cfg.data)
    probe = load_dataset(cfg.data, "test")
    if cfg.teacher.weights:
        load_weights(build_model(cfg.teacher.arch, probe.num_classes, probe.spec.channels, probe.spec.size), cfg.teacher.weights)
    return store, probe.num_classes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = load_config(args.config, args.overrides)
        stages = parse_stages(args.stages)
        store, num_classes = preflight(cfg, args.run_dir)
        from lpld_ray.plan import check_stage_inputs
        from lpld_ray.run_record import check_run_record, write_run_record
        from lpld_ray.stages import plan_class_shards

        resuming = check_run_record(store, cfg)
        check_stage_inputs(cfg, store, stages, plan_class_shards(num_classes, cfg.runner.class_shard_size))
        if not resuming:
            write_run_record(store, cfg)
    except LpldError as err:
        log.error("%s", err)
        return 2
    from lpld_ray.runner import run_pipeline

    try:
        summary = run_pipeline(cfg, store, stages, num_classes)
    except LpldError as err:
        log.error("%s", err)
        return 2
    log.info("summary: %s", json.dumps(summary, sort_keys=True))
    return 0
