"""Benchmark: the same recover work on 1 and on 2 shard actors (runner.num_workers), side by side."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from lpld_ray.config_io import load_config, replace
from lpld_ray.distributed.driver import run_pipeline
from lpld_ray.machine import describe_machine
from lpld_ray.store.manifest import copy_stage
from lpld_ray.store.storage import Store

log = logging.getLogger("bench_actors")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="jobs/configs/fashion_mnist.yaml")
    p.add_argument("--teacher", required=True, help="teacher weights path/URI")
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="e.g. recover.iterations=200 (default work: 10 one-class shards, IPC 10, 200 iterations)")
    return p.parse_args()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_actors_"))
    overrides = ["recover.ipc=10", "recover.iterations=200", "runner.class_shard_size=1", "runner.cpus_per_worker=1",
                 f"teacher.weights={args.teacher}", *args.overrides]
    cfg = load_config(args.config, overrides)
    stats = Store(str(out / "stats_run"))
    num_classes = cfg.data.num_classes or 10
    run_pipeline(cfg, stats, ["squeeze"], num_classes)  # once; every timed run copies it
    runs = []
    for repeat in range(args.repeats):
        for workers in args.workers:
            store = Store(str(out / f"w{workers}_r{repeat}"))
            copy_stage(stats, store, "stats")
            started = time.time()
            run_pipeline(replace(cfg, runner=replace(cfg.runner, num_workers=workers)), store, ["recover"], num_classes)
            runs.append({"workers": workers, "repeat": repeat, "seconds": round(time.time() - started, 2)})
            log.info("%d actor(s): %.1fs", workers, runs[-1]["seconds"])
    best = {w: min(r["seconds"] for r in runs if r["workers"] == w) for w in args.workers}
    base = best[args.workers[0]]
    result = {"machine": describe_machine(),
              "work": overrides[:4], "runs": runs, "best_seconds": best,
              "speedup_vs_first": {w: round(base / s, 3) for w, s in best.items()}}
    (out / "bench_actors.json").write_text(json.dumps(result, indent=2))
    log.info("result:\n%s", json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
