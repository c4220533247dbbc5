"""Shared fixtures: a real local Ray cluster (own temp dir and ports, stopped by PID), tiny configs, the one
finished tiny run (whose teacher every other Ray test is given) and helpers to read a job's JSON summary."""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from lpld_ray.testing.ray_nodes import child_env, free_ports, processes_under, stop_nodes  # the scale bench's too

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# One class per class shard (4 shards on 2 actors), so that a fault can land while some shards are committed and
# others are not; recover long enough (seconds per shard) that a shard is seen in flight.
TINY_OVERRIDES = [
    "data.num_classes=4",
    "data.train_per_class=200",
    "data.test_per_class=250",  # every evaluation (teacher, given weights, student) on 1,000 test images, not 4,000
    "teacher.epochs=3",
    "teacher.batch_size=32",
    "teacher.cpus_per_worker=1",
    "squeeze.partitions=2",
    "recover.ipc=4",
    "recover.iterations=80",
    "recover.classes_per_pass=2",
    "relabel.epochs=40",
    "relabel.compression=4",
    "train.epochs=40",
    "train.batch_size=8",
    "train.eval_every=20",
    "train.checkpoint_every=20",
    "train.cpus_per_worker=1",
    "runner.class_shard_size=1",
    "runner.progress_every_s=1",
]
CLASS_SHARDS = 4


@dataclass
class RayCluster:
    gcs_address: str
    dashboard_url: str
    temp_dir: str
    pid: int
    auth_env: dict[str, str]

    def submit(self, args: list[str], timeout: float = 900, wait: bool = True, job_id: str | None = None) -> subprocess.CompletedProcess:
        """``ray job submit`` of ``python jobs/distill.py ARGS``; by default waits for the job to end."""
        flags = ([] if wait else ["--no-wait"]) + (["--submission-id", job_id] if job_id else [])
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard_url, "--working-dir", str(REPO), *flags,
               "--", "python", "jobs/distill.py", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(self.auth_env))

    def status(self, job_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED, from the words ``ray job status`` logs."""
        result = self.job("status", job_id)
        text = result.stdout + result.stderr
        for said, status in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("was stopped", "STOPPED")):
            if f"Job '{job_id}' {said}" in text:
                return status
        return "PENDING" if f"Status for job '{job_id}': PENDING" in text else "RUNNING"

    def job(self, verb: str, job_id: str) -> subprocess.CompletedProcess:
        """``ray job status|stop|logs JOB_ID``."""
        cmd = [str(BIN / "ray"), "job", verb, "--address", self.dashboard_url, job_id]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=child_env(self.auth_env))


def wait_for_dashboard(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered: 401 when Ray's token auth is on (a token in ~/.ray enables it)
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Ray dashboard at {url} did not come up in {timeout}s")


@pytest.fixture(scope="session")
def ray_cluster():
    temp_dir = tempfile.mkdtemp(prefix="lr", dir="/tmp")
    gcs, dash, client, nm, om, agent, metrics, rt_agent = free_ports(8)
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", f"--temp-dir={temp_dir}",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
        f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_agent}",
        "--min-worker-port=0", "--max-worker-port=0", "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats",
    ]
    # Ray's token auth, with a token of this cluster's own (not whatever ~/.ray holds)
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    log = open(Path(temp_dir) / "ray_start.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=child_env(auth_env))
    url = f"http://127.0.0.1:{dash}"
    try:
        wait_for_dashboard(url, proc)
        yield RayCluster(f"127.0.0.1:{gcs}", url, temp_dir, proc.pid, auth_env)
    finally:
        stop_nodes([proc], temp_dir)
        log.close()


def run_cli(args: list[str], timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python jobs/distill.py ARGS`` as a user would run it (no Ray cluster address given)."""
    return subprocess.run([sys.executable, str(REPO / "jobs" / "distill.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=child_env(env), cwd=REPO)


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of every file below root."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@dataclass
class MotoS3:
    """moto's S3 server on 127.0.0.1 in this process (state survives stop/start on the same port)."""

    server: object
    port: int
    access_key: str = "AKIAMOTOTEST"
    secret_key: str = "moto-secret-DO-NOT-LEAK-9f3c2e"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def make_bucket(self) -> str:
        import uuid

        import boto3

        bucket = f"lpld-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                     aws_secret_access_key=self.secret_key, region_name="us-east-1").create_bucket(Bucket=bucket)
        return bucket

    def storage_section(self, **extra) -> dict:
        return {"endpoint_url": self.endpoint, "region": "us-east-1", "access_key_id": self.access_key,
                "secret_access_key": self.secret_key, **extra}

    def options(self) -> dict:
        from lpld_ray.config import StorageConfig
        from lpld_ray.store.storage import storage_options

        return storage_options(StorageConfig(**self.storage_section(retries=2, connect_timeout_s=1.0)), "s3://x")

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        import moto.server as server_mod

        self.server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()


@pytest.fixture(scope="session")
def moto_s3():
    import moto.server as server_mod

    (port,) = free_ports(1)
    s3 = MotoS3(server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False), port)
    s3.server.start()
    try:
        yield s3
    finally:
        s3.stop()


def job_args(run_dir, *extra: str, config: str = "jobs/configs/fashion_mnist.yaml") -> list[str]:
    """jobs/distill.py arguments of the tiny config on ``run_dir``, plus ``extra`` overrides."""
    args = ["--config", config, "--run-dir", str(run_dir)]
    for item in [*TINY_OVERRIDES, *extra]:
        args += ["--set", item]
    return args


def job_summary(output: str) -> dict:
    """The JSON the driver logs as its last line (``summary: {...}``): what each stage did."""
    for line in reversed(output.splitlines()):
        _, said, rest = line.partition("summary: ")
        if said and rest.startswith("{"):
            return json.loads(rest)
    raise AssertionError(f"no JSON summary in the job's output:\n{output[-3000:]}")


def submit_ok(ray_cluster: RayCluster, args: list[str]) -> tuple[str, dict]:
    """Submit, wait, require success; (the job's output, its JSON summary)."""
    result = ray_cluster.submit(args)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    return out, job_summary(out)


@dataclass(frozen=True)
class FinishedRun:
    run_dir: Path
    args: list[str]  # what made it: a copy of the run resumes with exactly these
    output: str
    summary: dict

    @property
    def teacher(self) -> Path:
        return self.run_dir / "teacher" / "model" / "teacher.pt"

    def copy_to(self, dest: Path) -> list[str]:
        """A byte copy of the whole run at ``dest``; returns the arguments that resume it there."""
        shutil.copytree(self.run_dir, dest)
        return [str(dest) if a == str(self.run_dir) else a for a in self.args]


@pytest.fixture(scope="session")
def finished_run(ray_cluster, tmp_path_factory) -> FinishedRun:
    """One whole tiny pipeline submitted with `ray job submit`: the only run that trains its teacher with Ray Train.
    Later tests are given its teacher, and compare their outputs with its bytes; none writes to it."""
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    args = job_args(run_dir)
    output, summary = submit_ok(ray_cluster, args)
    return FinishedRun(run_dir, args, output, summary)


@pytest.fixture
def cli(caplog, capsys, monkeypatch):
    """``lpld_ray.cli.main(argv)`` in this process, for input it must refuse before running any stage; returns (exit
    code, the ERROR log messages, everything printed). Should it not refuse, it fails instead of running stages."""
    import lpld_ray.cli as cli_module

    def not_refused(*_args, **_kwargs):
        raise AssertionError("the command was not refused: it went on to run stages")

    monkeypatch.setattr(cli_module, "init_ray", lambda: None)  # no Ray in the test process: a 2-CPU node instead
    monkeypatch.setattr(cli_module, "node_resources", lambda: [{"CPU": 2.0}])
    monkeypatch.setattr(cli_module, "run_pipeline", not_refused)
    main = cli_module.main
    monkeypatch.chdir(REPO)

    def run(argv: list[str]) -> tuple[int, list[str], str]:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            code = main(argv)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert all(r.exc_info is None for r in errors), "an error was logged with a traceback"
        printed = capsys.readouterr()
        return code, [r.getMessage() for r in errors], printed.out + printed.err
    return run


def assert_one_line_error(outcome: tuple[int, list[str], str], fragment: str) -> str:
    """Exit code 2, exactly one ERROR record, on one line, containing ``fragment``, no traceback; returns it."""
    code, errors, printed = outcome
    assert code == 2, (code, errors)
    assert len(errors) == 1, errors
    assert fragment in errors[0] and "\n" not in errors[0], errors[0]
    assert "Traceback" not in printed
    return errors[0]


def cluster_processes(ray_cluster: RayCluster, title: str) -> list:
    """Live processes of our test cluster whose command line contains ``title``."""
    return processes_under(ray_cluster.temp_dir, title)


def registered_checkpoint_epoch(train_dir: Path) -> int:
    """The epoch of the newest checkpoint Ray Train has registered (its own snapshot file); 0 when none.

    A checkpoint folder can exist before the Train controller has registered it; only a registered one is
    handed to a restarted worker group or a resumed run."""
    import json

    epochs = [0]
    for snapshot in train_dir.glob("ray_train-*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (OSError, ValueError):  # being rewritten
            continue
        if latest:
            epochs.append(int(latest["metrics"]["epoch"]))
    return max(epochs)


def the_train_worker(ray_cluster: RayCluster, dead: tuple[int, ...] = ()):
    """The one live Ray Train worker process of the running job (not one of the ``dead`` PIDs)."""
    def live():
        return [p for p in cluster_processes(ray_cluster, "RayTrainWorker") if p.pid not in dead]

    (worker,) = wait_until(live, 300, "the Ray Train worker")
    return worker


def freeze_at_checkpoint(ray_cluster: RayCluster, train_dir: Path, every: int, after: int = 0, dead: tuple[int, ...] = ()):
    """SIGSTOP the Ray Train worker as soon as a checkpoint past epoch ``after`` is registered: the job cannot train
    on (nor finish) whatever the machine's speed. Returns (the frozen worker, the registered epoch)."""
    worker = the_train_worker(ray_cluster, dead)
    epoch = wait_until(lambda: max(registered_checkpoint_epoch(train_dir) - after, 0), 600,
                       f"a checkpoint registered past epoch {after}", every=0.05) + after
    worker.suspend()
    assert not (train_dir / "model" / "_MANIFEST.json").exists(), "training finished before it could be frozen"
    assert epoch % every == 0, epoch
    return worker, epoch


def pool_items(pool, epochs: int):
    """(image, target, its view record) of every item of a label pool, epoch after epoch."""
    for epoch in range(epochs):
        pool.set_epoch(epoch)
        for i in range(len(pool)):
            x, y = pool[i]
            yield epoch, x, y, pool._records.view(int(pool._slot[i]))


def wait_until(condition, timeout: float, what: str, every: float = 0.2):
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
