"""cluster/: the launcher YAML and the KubeRay RayJob parse, pin pyproject's Ray, and run jobs/distill.py."""

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def pinned_ray() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', text).group(1)


def test_launcher_pins_ray_and_has_gpu_workers():
    cfg = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    version = pinned_ray()
    assert version in cfg["docker"]["image"]
    assert any(f"ray[default,train]=={version}" in cmd for cmd in cfg["setup_commands"])
    gpu_nodes = [n for n in cfg["available_node_types"].values() if n.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_nodes, "no GPU worker node type"


def test_rayjob_runs_distill_with_an_existing_preset():
    job = yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == pinned_ray()
    entry = spec["entrypoint"]
    assert "jobs/distill.py" in entry
    preset = re.search(r"jobs/configs/(\S+\.yaml)", entry).group(1)
    assert (REPO / "jobs" / "configs" / preset).exists()
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            res = container["resources"]
            assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
