"""Experiment grid: methods x IPC x compression x seeds through the real pipeline; a table of the reports."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from lpld_ray.cli import main as distill
from lpld_ray.store.manifest import copy_stage
from lpld_ray.store.storage import Store

log = logging.getLogger("grid")

METHODS = {
    "lpld": ["recover.batching=class_wise", "recover.statistics=class_wise"],
    "cwb": ["recover.batching=class_wise", "recover.statistics=global"],  # the ablation's "+ class-wise batching"
    "sre2l": ["recover.batching=across_classes", "recover.statistics=global", "runner.class_shard_size=10",
              "recover.classes_per_pass=10",
              "runner.cpus_per_worker=2"],
    "real": ["recover.source=real"],
    "rded": ["recover.source=rded"],
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="jobs/configs/fashion_mnist.yaml")
    p.add_argument("--teacher", required=True, help="teacher weights path/URI shared by every cell")
    p.add_argument("--out", required=True, help="folder for one run per cell and results.json / results.md")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--ipc", nargs="+", type=int, default=[10, 50])
    p.add_argument("--compression", nargs="+", type=float, default=[1, 10, 40])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--stats-from", help="a finished run with the same teacher, data and class shards: copy its squeeze stats (lpld, cwb)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    return p.parse_args()


def run_cell(args: argparse.Namespace, method: str, ipc: int, k: float, seed: int, images_from: str | None) -> dict:
    """One pipeline run; images are copied from the same (method, ipc, seed) run at another k when given,
    since recover does not depend on the label pool."""
    run_dir = f"{args.out}/{method}_ipc{ipc}_k{k:g}_s{seed}"
    overrides = [*METHODS[method], f"recover.ipc={ipc}", f"relabel.compression={k}", f"seed={seed}",
                 f"teacher.weights={args.teacher}", *args.overrides]
    stages = "recover,relabel,train,report" if method in ("real", "rded") else "squeeze,recover,relabel,train,report"
    if args.stats_from and method in ("lpld", "cwb"):  # stats depend only on the teacher, the data and the shard size
        copy_stage(Store(args.stats_from), Store(run_dir), "stats")
    if images_from and not Path(run_dir, "report", "report.json").exists():
        copy_stage(Store(images_from), Store(run_dir), "images")
        stages = "relabel,train,report"
    cli = ["--config", args.config, "--run-dir", run_dir, "--stages", stages]
    for item in overrides:
        cli += ["--set", item]
    if distill(cli) != 0:
        raise SystemExit(f"cell {run_dir} failed")
    report = json.loads(Path(run_dir, "report", "report.json").read_text())
    report.update(method=method, run_dir=run_dir)
    return report


def markdown(rows: list[dict]) -> str:
    head = "| method | IPC | k | seed | student top-1 | label bytes (logits + aug) | image bytes |\n|---|---|---|---|---|---|---|\n"
    return head + "".join(
        f"| {r['method']} | {r['ipc']} | {r['compression']:g} | {r['seed']} | {100 * r['student_top1']:.2f}% | "
        f"{r['label_bytes']:,} ({r['label_bytes_logits']:,} + {r['label_bytes_aug']:,}) | {r['image_bytes']:,} |\n"
        for r in rows
    )


def by_seeds(out: str) -> str:
    """Every finished cell under ``out`` (this run's and earlier ones'), one row per method, IPC and k: the student
    top-1 of each seed, their mean and their spread (max - min)."""
    cells: dict[tuple, dict[int, float]] = {}
    for path in sorted(Path(out).glob("*/report/report.json")):
        report = json.loads(path.read_text())
        if report.get("student_top1") is None:
            continue
        method = path.parents[1].name.split("_ipc")[0]
        cells.setdefault((method, report["ipc"], report["compression"]), {})[report["seed"]] = report["student_top1"]
    head = "| method | IPC | k | top-1 by seed | mean | spread |\n|---|---|---|---|---|---|\n"
    rows = []
    for (method, ipc, k), seeds in cells.items():
        values = [100 * seeds[s] for s in sorted(seeds)]
        by_seed = ", ".join(f"{s}: {100 * seeds[s]:.2f}%" for s in sorted(seeds))
        rows.append(f"| {method} | {ipc} | {k:g} | {by_seed} | {sum(values) / len(values):.2f}% | "
                    f"{max(values) - min(values):.2f} |\n")
    return head + "".join(rows)


def main() -> None:
    args = parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods:
        for ipc in args.ipc:
            for seed in args.seeds:
                first = None
                for k in args.compression:
                    rows.append(run_cell(args, method, ipc, k, seed, first))
                    first = first or rows[-1]["run_dir"]
                    Path(args.out, "results.json").write_text(json.dumps(rows, indent=2))
                    Path(args.out, "results.md").write_text(markdown(rows))
    log.info("\n%s", markdown(rows))
    Path(args.out, "by_seeds.md").write_text(by_seeds(args.out))


if __name__ == "__main__":
    main()
