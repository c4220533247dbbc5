"""Tiny generated ImageFolder trees (PNG, any class count) written through a Store, and a teacher for them."""

from __future__ import annotations

import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from lpld_ray.store.storage import Store

log = logging.getLogger(__name__)


def class_folder(class_id: int) -> str:
    """Folder name of a class: zero-padded so that sorted names are class-id order."""
    return f"c{class_id:05d}"


def tiny_png(class_id: int, index: int, size: int) -> bytes:
    """A deterministic RGB PNG: a per-class colour plus per-image noise (smooth at large sizes, so PNGs stay small)."""
    rng = np.random.default_rng([class_id, index])
    colour = np.array([(class_id * 37) % 256, (class_id * 91) % 256, (class_id * 151) % 256], dtype=np.float32)
    cells = max(1, size // 8)
    noise = rng.normal(0, 40, (cells, cells, 3)).astype(np.float32)
    noise = np.kron(noise, np.ones((size // cells + 1, size // cells + 1, 1), dtype=np.float32))[:size, :size]
    pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG", compress_level=1)
    return out.getvalue()


def tree_objects(classes: int, train_per_class: int, val_per_class: int) -> list[tuple[str, int, int]]:
    """(object name, class id, index) of every image of the tree: train/<class>/<i>.png and val/<class>/<i>.png."""
    names = []
    for c in range(classes):
        names += [(f"train/{class_folder(c)}/{i:04d}.png", c, i) for i in range(train_per_class)]
        names += [(f"val/{class_folder(c)}/{i:04d}.png", c, 10_000 + i) for i in range(val_per_class)]
    return names


def write_tree(store: Store, classes: int, train_per_class: int, val_per_class: int, size: int,
               threads: int = 16) -> int:
    """Write the tree under ``store``'s root, ``threads`` PUTs at a time; returns how many objects were written.
    Objects already there with the same size are kept (a second call is a cheap re-run)."""
    started = time.time()
    todo = tree_objects(classes, train_per_class, val_per_class)
    try:
        present = set(store.list(""))
    except FileNotFoundError:
        present = set()
    todo = [t for t in todo if t[0] not in present]

    def put(item: tuple[str, int, int]) -> None:
        name, c, i = item
        store.write_bytes(name, tiny_png(c, i, size))

    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(put, todo):
            pass
    log.info("image folder: %d classes x (%d train + %d val) of %d px at %s: %d objects written in %.1fs",
             classes, train_per_class, val_per_class, size, store.root, len(todo), time.time() - started)
    return len(todo)


def write_teacher(path: Path, arch: str, classes: int, size: int, seed: int = 0) -> Path:
    """A freshly initialised ``arch`` state dict for ``classes`` classes of 3 x size^2 (the bench's given teacher)."""
    import torch

    from lpld_ray.method.models import build_model, save_weights_bytes

    if not path.exists():
        torch.manual_seed(seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(save_weights_bytes(build_model(arch, classes, 3, size)))
    return path
