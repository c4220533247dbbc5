"""Experiment grid: methods x IPC x compression x seeds through the real pipeline; a table of the reports."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from lpld_ray.cli import main as distill
from lpld_ray.pipeline.plots import accuracy_storage_png
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
    p.add_argument("--teacher", help="teacher weights path/URI shared by every cell (required unless --summarize)")
    p.add_argument("--out", required=True, help="folder for one run per cell and results.json / results.md")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--ipc", nargs="+", type=int, default=[10, 50])
    p.add_argument("--compression", nargs="+", type=float, default=[1, 10, 40])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--stats-from", help="a finished run with the same teacher, data and class shards: copy its squeeze stats (lpld, cwb)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--images-from", help="an earlier grid's --out: each cell takes its images from the cell there of the "
                   "same method, IPC and seed (any k) and runs relabel, train and report only")
    p.add_argument("--summarize", action="store_true", help="run nothing: write by_seeds.md and accuracy_storage.png "
                   "from the cells already finished under --out")
    p.add_argument("--include", nargs="+", default=[], metavar="DIR", help="earlier grids' --out folders whose "
                   "finished cells join this one's by_seeds.md and plot (seeds of cells of the same name merge)")
    p.add_argument("--tag", default="", help="a name for this grid's --set values: cells are <method>-<tag>_ipc..., "
                   "a row of their own in the tables and a named point on the plot")
    args = p.parse_args()
    if not args.summarize and not args.teacher:
        p.error("--teacher is required to run cells (or give --summarize)")
    return args


def run_cell(args: argparse.Namespace, method: str, ipc: int, k: float, seed: int, images_from: str | None) -> dict:
    """One pipeline run; images are copied from the same (method, ipc, seed) run at another k when given,
    since recover does not depend on the label pool."""
    name = f"{method}-{args.tag}" if args.tag else method
    run_dir = f"{args.out}/{name}_ipc{ipc}_k{k:g}_s{seed}"
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
    report.update(method=name, run_dir=run_dir)
    return report


def earlier_images(out: str, method: str, ipc: int, seed: int) -> str:
    """The run folder under an earlier grid's out that holds the images of (method, IPC, seed)."""
    found = sorted(Path(out).glob(f"{method}_ipc{ipc}_k*_s{seed}/images/shard-*/_MANIFEST.json"))
    if not found:
        raise SystemExit(f"--images-from {out}: no finished {method}_ipc{ipc}_k*_s{seed} cell with images")
    return str(found[0].parent.parent.parent)


def markdown(rows: list[dict]) -> str:
    head = ("| method | IPC | k | top-k | seed | student top-1 | label bytes (logits + classes + aug) | label objects "
            "(bytes) | image bytes |\n|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['method']} | {r['ipc']} | {r['compression']:g} | {r.get('topk') or 'all'} | {r['seed']} | "
        f"{100 * r['student_top1']:.2f}% | {r['label_bytes']:,} ({r['label_bytes_logits']:,} + "
        f"{r.get('label_bytes_index', 0):,} + {r['label_bytes_aug']:,}) | {r.get('label_file_bytes', 0):,} | "
        f"{r['image_bytes']:,} |\n"
        for r in rows
    )


def finished_cells(*outs: str) -> dict[tuple, dict[int, dict]]:
    """Every finished cell under the ``outs`` (this run's and earlier ones'): (method, IPC, k) -> seed -> its report;
    a cell of the same name, IPC, k and seed in a later folder replaces the earlier one."""
    cells: dict[tuple, dict[int, dict]] = {}
    for path in (p for out in outs for p in sorted(Path(out).glob("*/report/report.json"))):
        report = json.loads(path.read_text())
        if report.get("student_top1") is not None:
            method = path.parents[1].name.split("_ipc")[0]
            cells.setdefault((method, report["ipc"], report["compression"]), {})[report["seed"]] = report
    return cells


def by_seeds(cells: dict[tuple, dict[int, dict]]) -> str:
    """One row per method, IPC and k: the student top-1 of each seed, their mean and spread (max - min), and the
    storage in the paper's terms (labels + images, mean over the seeds)."""
    head = ("| method | IPC | k | top-1 by seed | mean | spread | labels + images (bytes) "
            "| label objects (bytes, largest seed) |\n|---|---|---|---|---|---|---|---|\n")
    rows = []
    for (method, ipc, k), seeds in cells.items():
        values = [100 * seeds[s]["student_top1"] for s in sorted(seeds)]
        by_seed = ", ".join(f"{s}: {100 * seeds[s]['student_top1']:.2f}%" for s in sorted(seeds))
        rows.append(f"| {method} | {ipc} | {k:g} | {by_seed} | {sum(values) / len(values):.2f}% | "
                    f"{max(values) - min(values):.2f} | {storage(seeds):,.0f} | "
                    f"{max(r.get('label_file_bytes', 0) for r in seeds.values()):,} |\n")
    return head + "".join(rows)


def storage(seeds: dict[int, dict]) -> float:
    """Labels (paper's terms) + image files, in bytes, mean over the seeds."""
    return sum(r["label_bytes"] + r["image_bytes"] for r in seeds.values()) / len(seeds)


def plot_lines(cells: dict[tuple, dict[int, dict]]) -> dict[str, list[tuple[float, float, str]]]:
    """(storage, mean top-1 %, label setting) points per image source and IPC, for the accuracy-against-storage plot:
    a cell ``<source>-<tag>`` joins its source's line, its point named by k and the tag."""
    lines: dict[str, list[tuple[float, float, str]]] = {}
    for (method, ipc, k), seeds in cells.items():
        source, _, tag = method.partition("-")
        top1 = 100 * sum(r["student_top1"] for r in seeds.values()) / len(seeds)
        lines.setdefault(f"{source} IPC {ipc}", []).append((storage(seeds), top1, f"k {k:g} {tag}".strip()))
    return lines


def main() -> None:
    args = parse_args()
    if not args.summarize:
        run_grid(args)
    cells = finished_cells(args.out, *args.include)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "by_seeds.md").write_text(by_seeds(cells))
    Path(args.out, "accuracy_storage.png").write_bytes(accuracy_storage_png(plot_lines(cells)))


def run_grid(args: argparse.Namespace) -> None:
    """Every cell of the grid, in order; results.json / results.md rewritten after each."""
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods:
        for ipc in args.ipc:
            for seed in args.seeds:
                first = earlier_images(args.images_from, method, ipc, seed) if args.images_from else None
                for k in args.compression:
                    rows.append(run_cell(args, method, ipc, k, seed, first))
                    first = first or rows[-1]["run_dir"]
                    Path(args.out, "results.json").write_text(json.dumps(rows, indent=2))
                    Path(args.out, "results.md").write_text(markdown(rows))
    log.info("\n%s", markdown(rows))


if __name__ == "__main__":
    main()
