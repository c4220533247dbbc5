"""Before anything is written: each stage's peak memory fits a node and the run the disk; only sure misfits refused."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from lpld_ray.config import Config
from lpld_ray.config_io import replace
from lpld_ray.errors import LpldError
from lpld_ray.pipeline.estimate import DatasetShape, human, image_bytes, loader_memory, peak_memory, run_label_bytes
from lpld_ray.store.layout import IMAGES_STAGE, LABELS_STAGE

log = logging.getLogger(__name__)


def local_memory() -> int:
    """Bytes of RAM of this machine (0 when the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def node_memory(nodes: list[dict[str, float]]) -> int:
    """Bytes of memory of the largest node: Ray's ``memory`` resource (what tasks may use) plus its object store;
    this machine's RAM when the nodes do not say."""
    known = [n.get("memory", 0.0) + n.get("object_store_memory", 0.0) for n in nodes if n.get("memory")]
    return int(max(known)) if known else local_memory()


def free_disk(run_dir: str) -> int | None:
    """Free bytes where a local run directory is (or will be); None for object storage, whose room is not known."""
    if "://" in run_dir and not run_dir.startswith("file://"):
        return None
    path = Path(run_dir.removeprefix("file://")).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _ipc_that_fits(cfg: Config, shape: DatasetShape, memory: int) -> int:
    """The largest recover.ipc whose recover estimate fits ``memory`` (the estimate is linear in the IPC)."""
    one, two = (peak_memory(replace(cfg, recover=replace(cfg.recover, ipc=n)), shape).recover for n in (1, 2))
    per_image = max(1, two - one)
    return max(0, (memory - (one - per_image)) // per_image)


LARGEST_NODE = "the largest node"


def check_memory(cfg: Config, shape: DatasetShape, stages: list[str], memory: int, machine: str = LARGEST_NODE) -> None:
    """Each asked stage's per-worker estimate fits ``memory`` (bytes of ``machine``; 0: unknown, not checked)."""
    if memory <= 0:
        return
    peak = peak_memory(cfg, shape)
    have = f"the {human(memory)} of memory of {machine}"
    if "recover" in stages and peak.recover > memory:
        rc = cfg.recover
        raise LpldError(f"recover needs ~{human(peak.recover)} of memory per actor (recover.ipc {rc.ipc}, "
                        f"recover.classes_per_pass {rc.classes_per_pass}, recover.batching {rc.batching}), more than "
                        f"{have} (allowed: recover.ipc up to ~{_ipc_that_fits(cfg, shape, memory):,} here)")
    if "relabel" in stages and peak.relabel > memory:
        raise LpldError(f"relabel needs ~{human(peak.relabel)} of memory per actor (relabel.batch_size "
                        f"{cfg.relabel.batch_size}), more than {have} (allowed: a smaller relabel.batch_size)")
    if "train" in stages:
        need = peak.train + loader_memory(cfg, shape).total
        if need > memory:
            raise LpldError(f"train needs ~{human(need)} of memory per worker (model and batches "
                            f"{human(peak.train)}, label-pool loader {human(need - peak.train)} for "
                            f"{shape.num_classes * cfg.recover.ipc:,} images), more than {have} (allowed: a smaller "
                            "recover.ipc, train.batch_size or train.image_cache_mb)")


def stored_bytes(run_dir: str, folder: str) -> int:
    """Bytes already under ``folder`` of a local run directory (0 when there is none): a resumed run writes only the
    rest, and a stage's redone shard replaces its own objects."""
    root = Path(run_dir.removeprefix("file://")).expanduser().absolute() / folder
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def check_disk(cfg: Config, shape: DatasetShape, stages: list[str], free: int | None, where: str) -> None:
    """What the asked stages still have to store (images at recover, labels at relabel, less what the run directory
    already holds of each) fits the ``free`` bytes at ``where``."""
    if free is None:
        return
    images = shape.num_classes * cfg.recover.ipc
    parts = {"images": image_bytes(images, shape.channels, shape.size) - stored_bytes(where, IMAGES_STAGE)
             if "recover" in stages else 0,
             f"labels at {cfg.relabel.compression:g}x": run_label_bytes(cfg, images, shape.num_classes)
             - stored_bytes(where, LABELS_STAGE) if "relabel" in stages else 0}
    parts = {name: max(0, size) for name, size in parts.items()}
    need = sum(parts.values())
    if need > free:
        detail = ", ".join(f"{name} ~{human(size)}" for name, size in parts.items() if size)
        raise LpldError(f"this run would store ~{human(need)} ({detail}) at '{where}', which has {human(free)} free "
                        "(allowed: what fits: a smaller recover.ipc or relabel.epochs, a larger relabel.compression, "
                        "or another --run-dir)")


def check_fits(cfg: Config, shape: DatasetShape, stages: list[str], memory: int, run_dir: str,
               machine: str = LARGEST_NODE, gpus: bool = False) -> None:
    """Memory per worker (``memory`` bytes of ``machine``), then disk: one line naming what does not fit and what
    would. With ``gpus`` the workers' peaks are GPU memory, which Ray does not report: not checked, said so."""
    if gpus:
        log.info("memory per worker not checked: on GPUs it is GPU memory, which Ray does not report (--plan "
                 "estimates it)")
    else:
        check_memory(cfg, shape, stages, memory, machine)
    check_disk(cfg, shape, stages, free_disk(run_dir), run_dir)
