"""A local multi-node Ray cluster (a CPU-less head plus worker nodes, own ports and temp dir), stopped by PID."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
# never uploaded with the job's working dir (.venv is a symlink in worktrees, which '.venv/' in .gitignore misses)
UPLOAD_EXCLUDES = [".venv", ".git", "runs", "build", ".pytest_cache"]


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free a moment ago on 127.0.0.1."""
    socks, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment for a Ray command: our venv first on PATH, no RAY_ADDRESS, no usage stats."""
    env = dict(os.environ, **(extra or {}))
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def node_ports(head: bool) -> tuple[list[str], dict[str, int]]:
    """The port flags of one node (each its own), and the head's GCS and dashboard ports."""
    names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "metrics-export-port", "runtime-env-agent-port"]
    if head:
        names += ["port", "dashboard-port", "ray-client-server-port"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    flags = [f"--{name}={port}" for name, port in ports.items()]
    return flags + ["--min-worker-port=0", "--max-worker-port=0"], ports


@dataclass
class LocalRayCluster:
    """``ray start --head --num-cpus=0`` plus ``workers`` nodes of ``cpus_per_worker`` CPUs (and ``gpus_per_worker``
    declared GPUs) on this machine; jobs go through the head's dashboard (``ray job submit``)."""

    workers: int = 2
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0
    object_store_mb: int = 300
    temp_dir: str = ""
    gcs_address: str = ""
    dashboard_url: str = ""
    auth_env: dict[str, str] = field(default_factory=dict)
    _procs: list[subprocess.Popen] = field(default_factory=list)
    _logs: list = field(default_factory=list)

    def start(self, timeout: float = 180, attempts: int = 3) -> LocalRayCluster:
        """Start the nodes; on a loaded 2-core machine a node may miss one of Ray's start-up deadlines (its agent's
        port file, 'timed out during startup'): the whole cluster is then stopped and started again."""
        for attempt in range(attempts):
            try:
                return self._start(timeout)
            except (RuntimeError, TimeoutError) as err:
                if attempt == attempts - 1:
                    raise
                log.warning("Ray cluster did not start (attempt %d of %d: %s): starting it again", attempt + 1,
                            attempts, err)
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> LocalRayCluster:
        self.temp_dir = tempfile.mkdtemp(prefix="lrs", dir="/tmp")
        token = Path(self.temp_dir) / "auth_token"  # Ray's token auth with a token of this cluster's own
        token.write_text(secrets.token_hex(32))
        self.auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        flags, ports = node_ports(head=True)
        self.gcs_address = f"127.0.0.1:{ports['port']}"
        self.dashboard_url = f"http://127.0.0.1:{ports['dashboard-port']}"
        common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                  f"--object-store-memory={self.object_store_mb << 20}"]
        self._spawn("head", ["--head", f"--temp-dir={self.temp_dir}", *common, *flags, "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             "--num-cpus=0", "--num-gpus=0"])
        try:
            self._wait_for_dashboard(timeout)
            self._wait_for_nodes(1, timeout)
            for i in range(self.workers):
                flags, _ = node_ports(head=False)
                # each node its own temp dir (under ours): nodes sharing one share runtime_resources/, and a worker
                # node unpacking the job's working dir there deletes the driver's current directory under it
                node_temp = Path(self.temp_dir) / f"w{i}"
                node_temp.mkdir()
                self._spawn(f"worker{i}", [f"--address={self.gcs_address}", f"--temp-dir={node_temp}", *common, *flags,
                                           f"--num-cpus={self.cpus_per_worker}", f"--num-gpus={self.gpus_per_worker}"])
                self._wait_for_nodes(2 + i, timeout)
        except BaseException:
            self.stop()
            raise
        log.info("Ray cluster up: head (0 CPUs) + %d worker nodes x %d CPU (%d GPU declared), dashboard %s, temp %s",
                 self.workers, self.cpus_per_worker, self.gpus_per_worker, self.dashboard_url, self.temp_dir)
        return self

    def _spawn(self, name: str, args: list[str]) -> None:
        out = open(Path(self.temp_dir) / f"ray_start_{name}.log", "w")
        self._logs.append(out)
        env = child_env({**self.auth_env, "RAY_agent_register_timeout_ms": "180000"})  # slow agents on a busy machine
        proc = subprocess.Popen([str(BIN / "ray"), "start", *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
        self._procs.append(proc)

    def _wait_for_dashboard(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self._procs[0].poll() is not None:
                raise RuntimeError(f"ray start --head exited with {self._procs[0].returncode} (see {self.temp_dir})")
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # it answered (401 with token auth)
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"Ray dashboard at {self.dashboard_url} did not come up in {timeout}s")

    def _wait_for_nodes(self, count: int, timeout: float) -> None:
        """Until ``count`` nodes are alive (``ray list nodes`` through the dashboard)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a ray start exited with {proc.returncode} (see {self.temp_dir})")
            result = self.ray(["list", "nodes", "--format=json", "--filter", "state=ALIVE"], timeout=60)
            try:
                if result.returncode == 0 and len(json.loads(result.stdout)) >= count:
                    return
            except ValueError:
                pass
            time.sleep(2)
        raise TimeoutError(f"{count} Ray nodes were not alive after {timeout}s")

    def ray(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        """``ray ARGS --address DASHBOARD`` (for job and state commands)."""
        return subprocess.run([str(BIN / "ray"), *args, "--address", self.dashboard_url], capture_output=True,
                              text=True, timeout=timeout, env=child_env(self.auth_env))

    def submit_command(self, script_args: list[str], wait: bool = True, job_id: str | None = None) -> list[str]:
        """``ray job submit`` of ``python jobs/distill.py ARGS`` with this repository as the working dir."""
        flags = ([] if wait else ["--no-wait"]) + (["--submission-id", job_id] if job_id else [])
        runtime_env = json.dumps({"excludes": UPLOAD_EXCLUDES})
        return [str(BIN / "ray"), "job", "submit", "--address", self.dashboard_url, "--working-dir", str(REPO),
                "--runtime-env-json", runtime_env, *flags, "--", "python", "jobs/distill.py", *script_args]

    def submit(self, script_args: list[str], wait: bool = True, job_id: str | None = None,
               timeout: float = 3600) -> subprocess.CompletedProcess:
        """Submit (by default waiting for the job to end, its output in the result)."""
        return subprocess.run(self.submit_command(script_args, wait, job_id), capture_output=True, text=True,
                              timeout=timeout, env=child_env(self.auth_env))

    def submit_background(self, script_args: list[str], job_id: str | None = None) -> subprocess.Popen:
        """A waiting ``ray job submit`` in the background: its stdout (merged with stderr) is the job's output."""
        return subprocess.Popen(self.submit_command(script_args, True, job_id), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=child_env(self.auth_env))

    def job_status(self, job_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        result = subprocess.run([str(BIN / "ray"), "job", "status", "--address", self.dashboard_url, job_id],
                                capture_output=True, text=True, timeout=120, env=child_env(self.auth_env))
        text = result.stdout + result.stderr
        for said, status in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("was stopped", "STOPPED")):
            if f"Job '{job_id}' {said}" in text:
                return status
        return "PENDING" if f"Status for job '{job_id}': PENDING" in text else "RUNNING"

    def wait_for_job_end(self, job_id: str, timeout: float = 900) -> str:
        return wait_until(lambda: (s := self.job_status(job_id)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
                          timeout, f"job {job_id} to end", every=1.0)

    def processes(self, title: str) -> list:
        """Live processes of this cluster whose command line contains ``title``."""
        return processes_under(self.temp_dir, title)

    def stop(self) -> None:
        """Each node's process group, then any process still naming our temp dir; never `ray stop`."""
        stop_nodes(list(reversed(self._procs)), self.temp_dir)
        for out in self._logs:
            out.close()
        self._procs.clear()
        self._logs.clear()
        log.info("Ray cluster at %s stopped", self.temp_dir)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def stop_nodes(procs: list[subprocess.Popen], temp_dir: str | None, grace: float = 5) -> None:
    """SIGTERM each node's process group, SIGKILL those still up after one shared ``grace`` period (`ray start
    --block` ignores SIGTERM), then kill any process still naming ``temp_dir``; never `ray stop`."""
    import psutil

    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if not temp_dir:
        return
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def wait_until(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def job_summary(output: str) -> dict:
    """The JSON the CLI logs as its summary line (``summary: {...}``); {} when there is none."""
    for line in reversed(output.splitlines()):
        _, said, rest = line.partition("summary: ")
        if said and rest.startswith("{"):
            return json.loads(rest)
    return {}


def processes_under(temp_dir: str, title: str) -> list:
    """Live processes of a cluster (an ancestor's command line names its ``temp_dir``) whose command line contains
    ``title``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if title not in " ".join(proc.info["cmdline"] or []):
                continue
            if any(temp_dir in " ".join(a.cmdline()) for a in proc.parents()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found
