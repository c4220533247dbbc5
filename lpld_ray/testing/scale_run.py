"""A scale run: its config, each `ray job submit` measured at the S3 server, the no-op re-run and the driver kill."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lpld_ray.testing.ray_nodes import REPO, LocalRayCluster, job_summary, wait_until
from lpld_ray.testing.s3_counts import CountingS3, RequestCounts

log = logging.getLogger(__name__)

MANIFEST = "_MANIFEST.json"
RUN_RECORDS = ("run.yaml",)  # small run-level records a no-op re-run may read, beside manifests and the lease
LEASE_PREFIX = "_lease/"
STAGE_ORDER = ("teacher", "squeeze", "recover", "relabel", "train", "report")


@dataclass(frozen=True)
class ScaleSetup:
    """What is generated and how small the work is: C classes of ``size`` px, IPC, a tiny model."""

    classes: int
    size: int = 8
    train_per_class: int = 3
    val_per_class: int = 1
    ipc: int = 2
    arch: str = "convnet_w64"
    class_shard_size: int = 20
    iterations: int = 2

    @property
    def shards(self) -> int:
        return -(-self.classes // self.class_shard_size)


def scale_config(s3: CountingS3, setup: ScaleSetup, data_root: str, teacher: Path) -> dict[str, Any]:
    """The run's YAML tree: the Fashion-MNIST preset's schedule shape, made minimal, on an ImageFolder on S3."""
    tree = yaml.safe_load((REPO / "jobs/configs/fashion_mnist.yaml").read_text())
    tree["data"] = {"name": "image_folder", "root": data_root, "num_classes": setup.classes, "image_size": setup.size}
    tree["teacher"].update(arch=setup.arch, weights=str(teacher), batch_size=256, cpus_per_worker=1)
    tree["squeeze"] = {"batch_size": 500, "partitions": 2}
    tree["recover"].update(ipc=setup.ipc, iterations=setup.iterations, classes_per_pass=10, jitter=1)
    tree["relabel"].update(epochs=1, compression=1.0, batch_size=256)
    tree["train"].update(arch=setup.arch, epochs=1, batch_size=32, eval_every=1, checkpoint_every=1, num_workers=1,
                         cpus_per_worker=1)
    tree["runner"] = {"class_shard_size": setup.class_shard_size, "num_workers": 0, "cpus_per_worker": 1,
                      "progress_every_s": 5.0}
    tree["storage"] = s3.storage_section()
    return tree


def write_config(path: Path, tree: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def get_breakdown(counts: RequestCounts, run_prefix: str, data_prefix: str) -> dict[str, Any]:
    """GETs and HEADs split into manifests, run records, the lease, other run objects (data), the dataset; LISTs
    and PUTs by the run's top folder."""
    split: dict[str, Counter] = {"GET": Counter(), "HEAD": Counter(), "LIST": Counter(), "PUT": Counter()}
    data_gets: list[str] = []
    for (kind, key), n in counts.keys.items():
        if kind not in split:
            continue
        if key.startswith(data_prefix):
            split[kind]["dataset"] += n
            continue
        if not key.startswith(run_prefix):
            split[kind]["elsewhere"] += n
            continue
        rel = key[len(run_prefix):]
        if kind in ("LIST", "PUT"):
            split[kind][rel.split("/", 1)[0] or "(root)"] += n
        elif rel.endswith(MANIFEST):
            split[kind]["manifest"] += n
        elif rel in RUN_RECORDS:
            split[kind]["run_record"] += n
        elif rel.startswith(LEASE_PREFIX):
            split[kind]["lease"] += n
        else:
            split[kind]["run_data:" + rel.split("/", 1)[0]] += n
            if kind == "GET":
                data_gets.append(rel)
    return {"by_kind": {k: dict(v) for k, v in split.items()}, "run_data_gets": len(data_gets),
            "run_data_get_examples": sorted(set(data_gets))[:10]}


class ScaleRun:
    """Jobs on one run directory (s3://bucket/name), each measured on its own (counts reset before it)."""

    def __init__(self, cluster: LocalRayCluster, s3: CountingS3, config: Path, bucket: str, name: str,
                 log_dir: Path) -> None:
        self.cluster, self.s3, self.config, self.bucket, self.name = cluster, s3, config, bucket, name
        self.run_dir = f"s3://{bucket}/{name}"
        self.run_prefix = f"{bucket}/{name}/"
        self.data_prefix = f"{bucket}/data/"
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)

    def args(self, stages: list[str] | None) -> list[str]:
        return ["--config", str(self.config), "--run-dir", self.run_dir,
                *(["--stages", ",".join(stages)] if stages else [])]

    def figures(self, label: str, started: float, output: str, returncode: int) -> dict[str, Any]:
        counts = self.s3.counts()
        (self.log_dir / f"{self.name}-{label}.log").write_text(output)
        summary = job_summary(output)
        return {"job": label, "ok": returncode == 0, "job_wall_seconds": round(time.time() - started, 2),
                "stages": summary, **counts.summary(self.run_prefix),
                **get_breakdown(counts, self.run_prefix, self.data_prefix)}

    def job(self, label: str, stages: list[str] | None = None) -> dict[str, Any]:
        """One `ray job submit` of ``stages`` (None: all), waited for; its figures."""
        self.wait_for_no_actors()
        self.s3.reset()
        started = time.time()
        result = self.cluster.submit(self.args(stages))
        figures = self.figures(label, started, result.stdout + result.stderr, result.returncode)
        log.info("%s %s: %s in %.1fs, %d requests %s", self.name, label, "ok" if figures["ok"] else "FAILED",
                 figures["job_wall_seconds"], figures["total_requests"], figures["requests"])
        if not figures["ok"]:
            log.error("%s %s failed:\n%s", self.name, label, (result.stdout + result.stderr)[-3000:])
        return figures

    def wait_for_no_actors(self) -> None:
        """An earlier job's shard actors are gone (they would hold the CPUs and be taken for this job's)."""
        wait_until(lambda: not self.cluster.processes("ShardWorker"), 120, "earlier shard actors to exit", every=0.5)

    def kill_mid_recover(self, timeout: float = 1800, stages: tuple[str, ...] | None = ("recover",)) -> dict[str, Any]:
        """Submit ``stages`` (None: all); once the first images manifest is PUT, freeze the shard actors (no further
        commit), SIGKILL the driver, kill the actors; then re-run the same stages and record what recover redid."""
        asked = list(stages) if stages else None
        self.wait_for_no_actors()
        self.s3.reset()
        manifests = (f"{self.run_prefix}images/", MANIFEST)
        job_id = f"kill-{uuid.uuid4().hex[:8]}"
        started = time.time()
        proc = self.cluster.submit_background(self.args(asked), job_id)
        deadline = time.time() + timeout
        while self.s3.matching("PUT", *manifests) == 0:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"recover ended or timed out before any images shard was committed:\n"
                                   f"{(proc.stdout.read() if proc.stdout else '')[-3000:]}")
            time.sleep(0.02)
        actors = self.cluster.processes("ShardWorker")  # every shard actor alive at the first commit
        for actor in actors:
            _quietly(actor.suspend)
        drivers = [p for p in self.cluster.processes(self.run_dir) if p.name() != "sh"]
        if len(drivers) != 1:
            raise RuntimeError(f"expected one driver process naming {self.run_dir}, found {drivers}")
        drivers[0].send_signal(signal.SIGKILL)
        killed_at = time.time()
        try:
            output, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            output = ""
        for actor in actors:
            _quietly(actor.kill)
        status = self.cluster.wait_for_job_end(job_id, 300)
        # counted now, not at the freeze: a manifest PUT in flight then is counted when its response has been sent
        committed = self.s3.matching("PUT", *manifests)
        killed = self.figures("recover-killed", started, output, 1)
        killed.update(job_status=status, seconds_to_kill=round(killed_at - started, 2),
                      shards_committed_before_kill=committed)
        log.info("%s: driver SIGKILLed %.1fs into recover with %d of %d images shards committed; job %s", self.name,
                 killed_at - started, committed, self.shards_total(), status)
        rerun = self.job("rerun-after-kill", asked)
        rerun["shards_committed_before_kill"] = committed
        rerun["shards_redone"] = rerun["stages"].get("recover", {}).get("shards_done")
        return {"killed": killed, "rerun": rerun}

    def shards_total(self) -> int:
        tree = yaml.safe_load(self.config.read_text())
        return -(-tree["data"]["num_classes"] // tree["runner"]["class_shard_size"])

    def copy_prefixes(self, other: ScaleRun, prefixes: tuple[str, ...]) -> int:
        """Copy ``other``'s objects under ``prefixes`` (e.g. run.yaml, teacher/, stats/) into this run (a run whose
        earlier stages are done, without redoing them); returns how many. Counts are reset afterwards."""
        from lpld_ray.store.storage import Store

        src, dst = Store(other.run_dir, self.s3.options()), Store(self.run_dir, self.s3.options())
        names = [n for n in src.list("") if any(n == p or n.startswith(p) for p in prefixes)]
        for name in names:
            dst.write_bytes(name, src.read_bytes(name))
        self.s3.reset()
        return len(names)


def _quietly(call) -> None:
    import psutil

    try:
        call()
    except psutil.NoSuchProcess:
        pass


def stage_row(figures: dict[str, Any], stage: str) -> dict[str, Any]:
    """One table row: the stage's own figures from the job summary, the job's request counts."""
    part = figures.get("stages", {}).get(stage, {})
    req = figures["requests"]
    return {"stage": stage, "job_ok": figures["ok"], "job_wall_s": figures["job_wall_seconds"],
            "stage_wall_s": part.get("wall_seconds"), "driver_cpu_s": part.get("driver_cpu_seconds"),
            "driver_peak_rss_mib": part.get("driver_peak_rss_mib"), **{k: req.get(k, 0) for k in req},
            "bytes_out": figures["bytes_out"], "objects_written": figures["objects_written"],
            "bytes_written": figures["bytes_written"], "run_data_gets": figures["run_data_gets"]}
