"""Benchmark (issue 13): every stage at C classes on a local 3-node Ray cluster (head with 0 CPUs + 2 one-CPU worker
nodes) over S3 (moto, requests counted at the server), one `ray job submit` per stage; then a no-op re-run and a
re-run after the driver is SIGKILLed mid-recover. Writes bench_scale_c<C>[_s<px>].json and .md per C under --out.

    .venv/bin/python jobs/bench_scale.py --classes 100 1000 --out /tmp/bench_scale
    .venv/bin/python jobs/bench_scale.py --classes 1000 --size 224 --arch resnet18   # the bytes term
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lpld_ray, not an installed one

from lpld_ray.machine import describe_machine  # noqa: E402
from lpld_ray.store.storage import Store  # noqa: E402
from lpld_ray.testing.folder_tree import write_teacher, write_tree  # noqa: E402
from lpld_ray.testing.ray_nodes import LocalRayCluster  # noqa: E402
from lpld_ray.testing.s3_counts import KINDS, CountingS3  # noqa: E402
from lpld_ray.testing.scale_run import STAGE_ORDER, ScaleRun, ScaleSetup, scale_config, stage_row, write_config  # noqa: E402

log = logging.getLogger("bench_scale")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", default=[100, 1000], help="class counts C, one run each")
    p.add_argument("--size", type=int, default=8, help="image side in px (224: the bytes term)")
    p.add_argument("--arch", default="convnet_w64", help="teacher and student arch (resnet18 suits 224 px)")
    p.add_argument("--ipc", type=int, default=2)
    p.add_argument("--train-per-class", type=int, default=3)
    p.add_argument("--out", default="/tmp/bench_scale", help="folder for configs, job logs, JSON and tables")
    p.add_argument("--skip", nargs="*", default=[], choices=["noop", "kill"], help="parts not to run")
    p.add_argument("--layout-only", action="store_true", help="only print the object-layout figures (issue item 4)")
    p.add_argument("--table", metavar="JSON", help="only print the markdown table of an earlier result file")
    return p.parse_args()


def bench_one(cluster: LocalRayCluster, s3: CountingS3, setup: ScaleSetup, out: Path, skip: list[str]) -> dict:
    """Every stage as its own job on a fresh run, then the no-op re-run and the driver kill (on a copy of the run's
    teacher and stats)."""
    tag = f"c{setup.classes}" + (f"_s{setup.size}" if setup.size != 8 else "")
    bucket = s3.make_bucket(f"scale-{tag.replace('_', '-')}-{int(time.time()) % 100000}")
    started = time.time()
    write_tree(Store(f"s3://{bucket}/data", s3.options()), setup.classes, setup.train_per_class,
               setup.val_per_class, setup.size)
    generate_s = round(time.time() - started, 1)
    teacher = write_teacher(out / f"teacher_{tag}_{setup.arch}.pt", setup.arch, setup.classes, setup.size)
    config = write_config(out / f"config_{tag}.yaml", scale_config(s3, setup, f"s3://{bucket}/data", teacher))
    run = ScaleRun(cluster, s3, config, bucket, "run", out / "logs")
    stages = {stage: run.job(stage, [stage]) for stage in STAGE_ORDER}
    result: dict[str, Any] = {"classes": setup.classes, "setup": setup.__dict__, "shards": setup.shards,
                              "machine": describe_machine() + "; load average (1, 5, 15 min) at the end: "
                              + ", ".join(f"{v:.1f}" for v in os.getloadavg()),
                              "cluster": "head --num-cpus=0 + 2 worker nodes x --num-cpus=1, one machine",
                              "config": str(config), "dataset_generation_seconds": generate_s, "stages": stages}
    if "noop" not in skip:
        result["noop"] = run.job("noop-rerun")
    if "kill" not in skip:
        killed = ScaleRun(cluster, s3, config, bucket, "run-kill", out / "logs")
        killed.copy_prefixes(run, ("run.yaml", "teacher/", "stats/"))
        result["kill"] = killed.kill_mid_recover()
    (out / f"bench_scale_{tag}.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    (out / f"bench_scale_{tag}.md").write_text(table(result))
    log.info("C = %d:\n%s", setup.classes, table(result))
    return result


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(result: dict) -> str:
    """The markdown table of one C: a row per stage job, the no-op re-run, the killed recover and its re-run."""
    shards = result["shards"]
    head = ["job", "ok", "job wall s", "stage wall s", "driver CPU s", "driver peak RSS MiB", *KINDS,
            "req/shard", "MB read (GET)", "objects written", "MB written", "run data objects read"]
    lines = [f"C = {result['classes']:,} ({shards} class shards), {result['machine']}; {result['cluster']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name: str, fig: dict, stage: str | None) -> None:
        if stage is None:  # a whole job of several stages: sums of its stages' own figures, the peak of RSS
            parts = list(fig.get("stages", {}).values())  # none for a killed job: no summary line
            wall = round(sum(p.get("wall_seconds", 0) for p in parts), 2) if parts else None
            cpu = round(sum(p.get("driver_cpu_seconds", 0) for p in parts), 2) if parts else None
            rss = max((p.get("driver_peak_rss_mib", 0) for p in parts), default=None)
        else:
            r = stage_row(fig, stage)
            wall, cpu, rss = r["stage_wall_s"], r["driver_cpu_s"], r["driver_peak_rss_mib"]
        req = fig["requests"]
        cells = [name, "yes" if fig["ok"] else "NO", fig["job_wall_seconds"], wall, cpu, rss,
                 *(req.get(k, 0) for k in KINDS), round(fig["total_requests"] / shards, 1),
                 round(fig["get_bytes"] / 1e6, 2), fig["objects_written"], round(fig["bytes_written"] / 1e6, 2),
                 fig["run_data_gets"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")

    for stage, fig in result["stages"].items():
        row(stage, fig, stage)
    if "noop" in result:
        row("no-op re-run (all stages)", result["noop"], None)
    if "kill" in result:
        k = result["kill"]
        row(f"recover, driver SIGKILLed ({k['killed']['shards_committed_before_kill']} shards committed)",
            k["killed"], None)
        row(f"recover re-run after kill (redid {k['rerun'].get('shards_redone')})", k["rerun"], "recover")
    if "noop" in result:
        b = result["noop"]["by_kind"]
        lines += ["", f"no-op re-run: GETs by what {b['GET']}; HEADs {b['HEAD']}; LISTs by folder {b['LIST']}; "
                  f"run data objects read: {result['noop']['run_data_gets']} "
                  f"(e.g. {result['noop']['run_data_get_examples'][:3]})"]
    return "\n".join(lines) + "\n"


def layout_figures(classes: int = 10_450, ipc: int = 20, workers: int = 8, shard_size: int = 20,
                   image_kb: float = 20.0, latency_ms: float = 30.0, streams: int = 16, mb_per_s: float = 100.0,
                   usd_per_1k_get: float = 0.0004, usd_per_1k_put: float = 0.005, epochs: int = 300) -> dict:
    """Issue 13 item 4: the student's reads per epoch per training worker under one object per image against one
    object per class shard (the shard sampler gives each worker whole shards; a packed shard is read in 8 MiB
    ranged GETs). Time per epoch: requests x latency / concurrent streams, or bytes / bandwidth, whichever is more."""
    images = classes * ipc
    shards = -(-classes // shard_size)
    per_worker_images = images / workers
    per_worker_bytes = per_worker_images * image_kb * 1e3
    shard_bytes = shard_size * ipc * image_kb * 1e3
    per_worker_shards = shards / workers
    parts_per_shard = -(-int(shard_bytes) // (8 << 20))
    out = {"assumptions": {"classes": classes, "ipc": ipc, "images": images, "workers": workers,
                           "class_shards": shards, "image_kb": image_kb, "latency_ms": latency_ms,
                           "concurrent_streams_per_worker": streams, "MB_per_s_per_worker": mb_per_s,
                           "usd_per_1k_GET": usd_per_1k_get, "usd_per_1k_PUT": usd_per_1k_put, "epochs": epochs}}
    for name, gets in (("object_per_image", per_worker_images),
                       ("object_per_class_shard", per_worker_shards * parts_per_shard)):
        latency_s = gets * latency_ms / 1e3 / streams
        bandwidth_s = per_worker_bytes / (mb_per_s * 1e6)
        puts = images if name == "object_per_image" else shards
        out[name] = {"GET_per_epoch_per_worker": round(gets), "MB_per_epoch_per_worker": round(per_worker_bytes / 1e6, 1),
                     "read_seconds_per_epoch_per_worker": round(max(latency_s, bandwidth_s), 1),
                     "latency_bound_seconds": round(latency_s, 1), "bandwidth_bound_seconds": round(bandwidth_s, 1),
                     "GET_usd_whole_training": round(gets * workers * epochs * usd_per_1k_get / 1e3, 2),
                     "PUT_at_recover": puts, "PUT_usd_recover": round(puts * usd_per_1k_put / 1e3, 2)}
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill PID` stops the cluster and moto on the way out
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layout = layout_figures()
    (out / "layout.json").write_text(json.dumps(layout, indent=2))
    log.info("object layout (issue 13 item 4): %s", json.dumps(layout, indent=2))
    if args.layout_only:
        return
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))  # noqa: T201 (the table is the output)
        return
    with CountingS3() as s3, LocalRayCluster(workers=2, cpus_per_worker=1) as cluster:
        for classes in args.classes:
            setup = ScaleSetup(classes, size=args.size, train_per_class=args.train_per_class, ipc=args.ipc,
                               arch=args.arch)
            bench_one(cluster, s3, setup, out, args.skip)


if __name__ == "__main__":
    main()
