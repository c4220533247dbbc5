"""Benchmark: the same small pipeline on local files and on S3 (moto's server on 127.0.0.1), side by side."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import uuid
from pathlib import Path

import yaml

from lpld_ray.cli import main as distill
from lpld_ray.config import StorageConfig
from lpld_ray.machine import describe_machine
from lpld_ray.store.storage import Store, storage_options

log = logging.getLogger("bench_storage")

# A small run of every stage: 4 classes, IPC 4, short schedules (the test suite's tiny config).
SMALL = ["data.num_classes=4", "data.train_per_class=200", "teacher.epochs=3", "teacher.batch_size=32",
         "teacher.cpus_per_worker=1", "recover.ipc=4", "recover.iterations=40", "relabel.epochs=40",
         "relabel.compression=4", "train.epochs=40", "train.batch_size=8", "train.eval_every=20",
         "train.checkpoint_every=10", "train.cpus_per_worker=1", "runner.class_shard_size=2"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="jobs/configs/fashion_mnist.yaml")
    p.add_argument("--out", default=None, help="folder for the local run and the S3 config (default: a temp dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra overrides for both runs")
    return p.parse_args()


def start_moto() -> tuple[object, str]:
    import moto.server

    server = moto.server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def s3_config(base: str, endpoint: str, folder: Path) -> str:
    tree = yaml.safe_load(Path(base).read_text())
    tree["storage"] = {"endpoint_url": endpoint, "region": "us-east-1", "access_key_id": "bench",
                       "secret_access_key": "bench-secret"}
    path = folder / "s3.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def timed_run(config: str, run_dir: str, overrides: list[str]) -> dict:
    cli = ["--config", config, "--run-dir", run_dir]
    for item in overrides:
        cli += ["--set", item]
    started = time.time()
    if distill(cli) != 0:
        raise SystemExit(f"run on {run_dir} failed")
    return {"run_dir": run_dir, "wall_seconds": round(time.time() - started, 2)}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args()
    folder = Path(args.out or tempfile.mkdtemp(prefix="bench_storage_"))
    folder.mkdir(parents=True, exist_ok=True)
    server, endpoint = start_moto()
    try:
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench-secret",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        overrides = [*SMALL, *args.overrides]
        local = timed_run(args.config, str(folder / "local"), overrides)
        s3 = timed_run(s3_config(args.config, endpoint, folder), f"s3://{bucket}/run", overrides)
        s3_store = Store(s3["run_dir"], storage_options(StorageConfig(endpoint_url=endpoint, region="us-east-1",
                                                                      access_key_id="bench", secret_access_key="bench-secret"), s3["run_dir"]))
        for run, store in ((local, Store(local["run_dir"])), (s3, s3_store)):
            run["stages"] = json.loads(store.read_text("report/report.json"))["wall_seconds"]
            run["objects"] = len(store.list(""))
    finally:
        server.stop()
    result = {"machine": describe_machine(),
              "local": local, "s3_moto": s3, "ratio_s3_over_local": round(s3["wall_seconds"] / local["wall_seconds"], 3),
              "stage_ratios": {k: round(s3["stages"][k] / v, 3) for k, v in local["stages"].items() if v > 0}}
    (folder / "bench_storage.json").write_text(json.dumps(result, indent=2))
    log.info("result:\n%s", json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
