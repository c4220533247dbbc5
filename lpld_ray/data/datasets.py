"""Real datasets addressable by class: Fashion-MNIST idx files, sklearn digits, ImageFolder trees (lpld_ray.data.folder)."""

from __future__ import annotations

import gzip
import importlib.util
import logging
import math
from pathlib import Path

import numpy as np
import torch

from lpld_ray.config import DATASETS, DataConfig
from lpld_ray.data.base import ClassDataset, check_image_size, class_count, class_rank, image_spec, select_indices
from lpld_ray.data.folder import check_folder, folder_class_names, load_folder, load_folder_splits
from lpld_ray.errors import DataError
from lpld_ray.method.images import ImageSpec

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
DIGITS_TRAIN_FRACTION = 0.8
DIGITS_NEEDS_SKLEARN = "dataset 'digits' needs scikit-learn, which is not installed: pip install scikit-learn"


class TensorClassDataset(ClassDataset):
    """Images held in memory as integer pixels [N,C,S,S], divided by ``scale`` on access."""

    def __init__(self, pixels: torch.Tensor, targets: torch.Tensor, scale: float,
                 spec: ImageSpec, class_names: list[str]) -> None:
        super().__init__(spec, targets, class_names)
        self.pixels = pixels
        self.scale = scale

    def image(self, i: int) -> torch.Tensor:
        return self.pixels[i].to(torch.float32) / self.scale

    def images(self, idx: torch.Tensor) -> torch.Tensor:
        return self.pixels[idx].to(torch.float32) / self.scale

    def subset(self, idx: torch.Tensor) -> "TensorClassDataset":
        return TensorClassDataset(self.pixels[idx], self.targets[idx], self.scale, self.spec, self.class_names)


def load_dataset(cfg: DataConfig, split: str, options: dict | None = None) -> ClassDataset:
    """Load ``split`` ("train" or "test") of the dataset ``cfg`` names, with its class/count limits
    (``options``: fsspec options of an image_folder root on object storage)."""
    if split not in SPLITS:
        raise DataError(f"unknown dataset split '{split}': choose one of {', '.join(SPLITS)}")
    if cfg.name == "fashion_mnist":
        ds = _load_fashion(cfg, split)
    elif cfg.name == "digits":
        ds = _load_digits(cfg, split)
    elif cfg.name == "image_folder":
        ds = load_folder(cfg, split, options)
    else:
        raise DataError(f"unknown dataset '{cfg.name}': choose one of {', '.join(DATASETS)}")
    return _logged(cfg, split, ds)


def _logged(cfg: DataConfig, split: str, ds: ClassDataset) -> ClassDataset:
    log.info("loaded %s %s: %d images, %d classes", cfg.name, split, len(ds), ds.num_classes)
    return ds


def class_names(cfg: DataConfig, options: dict | None = None) -> list[str]:
    """The names of the configured classes, without reading images (an ImageFolder: one listing of train/)."""
    if cfg.name == "fashion_mnist":
        return list(FASHION_CLASSES[:class_count(cfg, len(FASHION_CLASSES))])
    if cfg.name == "digits":
        return [str(d) for d in range(class_count(cfg, 10))]
    return folder_class_names(cfg, options)


def check_dataset(cfg: DataConfig, options: dict | None = None) -> int:
    """Cheap pre-flight: the files or folders exist, ``num_classes`` fits, the image size is one the data has;
    returns the number of classes used; raises DataError or ConfigError."""
    check_image_size(cfg)
    if cfg.name == "fashion_mnist":
        root = _local_root(cfg.root)
        for split in SPLITS:
            for name in FASHION_FILES[split]:
                _require_fashion_file(root / name)
        return class_count(cfg, len(FASHION_CLASSES))
    if cfg.name == "digits":
        if importlib.util.find_spec("sklearn") is None:
            raise DataError(DIGITS_NEEDS_SKLEARN)
        return class_count(cfg, 10)
    if cfg.name == "image_folder":
        return check_folder(cfg, options)
    raise DataError(f"unknown dataset '{cfg.name}': choose one of {', '.join(DATASETS)}")


def read_both_splits(cfg: DataConfig, options: dict | None = None) -> tuple[ClassDataset, ClassDataset]:
    """Pre-flight of the data itself: both splits read (idx files, digits) or listed (an ImageFolder tree: every class
    folder, each training one holding images; each listing made once), and the first image of each decoded, after the
    cheap checks of :func:`check_dataset`. Returns (train, test)."""
    if cfg.name == "image_folder":
        check_image_size(cfg)
        train, test = (_logged(cfg, split, ds) for split, ds in zip(SPLITS, load_folder_splits(cfg, options)))
    else:
        check_dataset(cfg, options)
        train, test = (load_dataset(cfg, split, options) for split in SPLITS)
    for split, ds in zip(SPLITS, (train, test)):
        if len(ds) == 0:
            where = f"{cfg.root.rstrip('/')}/{'train' if split == 'train' else 'val'}" if cfg.name == "image_folder" \
                else cfg.root
            raise DataError(f"the {split} split of {cfg.name} at '{where}' holds no images of the configured classes")
        ds.image(0)
    return train, test


def _local_root(root: str) -> Path:
    if root.startswith("file://"):
        root = root[len("file://"):]
    if "://" in root:
        raise DataError(f"data.root '{root}' is not a local directory: real datasets are read from local paths")
    return Path(root).expanduser()


def _require_fashion_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"dataset files missing: '{path}' not found "
                        "(set data.root to the folder holding the Fashion-MNIST idx files)")


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse one gzip'd idx file of unsigned bytes; DataError naming the file if malformed."""
    _require_fashion_file(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"malformed idx file '{path}': not a readable gzip file ({err})") from err
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"malformed idx file '{path}': {len(raw)} bytes, shorter than the {header}-byte header")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise DataError(f"malformed idx file '{path}': magic number {got}, expected {magic}")
    dims = tuple(int.from_bytes(raw[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim))
    if len(raw) - header != math.prod(dims):
        raise DataError(f"malformed idx file '{path}': {len(raw) - header} data bytes for shape {list(dims)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _load_fashion(cfg: DataConfig, split: str) -> ClassDataset:
    root = _local_root(cfg.root)
    image_file, label_file = (root / name for name in FASHION_FILES[split])
    images = _read_idx(image_file, IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(label_file, IDX_LABELS_MAGIC, 1)
    if images.shape[1:] != (28, 28):
        raise DataError(f"malformed idx file '{image_file}': images are {list(images.shape[1:])}, expected [28, 28]")
    if len(labels) != len(images) or (len(labels) and labels.max() >= len(FASHION_CLASSES)):
        raise DataError(f"malformed idx file '{label_file}': {len(labels)} labels (max {labels.max(initial=0)}) "
                        f"for {len(images)} images, expected one label in 0..9 per image")
    targets = torch.from_numpy(labels.astype(np.int64))
    idx, n = select_indices(targets, cfg, split, len(FASHION_CLASSES))
    pixels = torch.from_numpy(images).unsqueeze(1)[idx]
    return TensorClassDataset(pixels, targets[idx], 255.0, image_spec(cfg), list(FASHION_CLASSES[:n]))


def _load_digits(cfg: DataConfig, split: str) -> ClassDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DataError(DIGITS_NEEDS_SKLEARN) from err
    bunch = load_digits()
    pixels = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)  # values 0..16
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_count = (torch.bincount(labels, minlength=10).double() * DIGITS_TRAIN_FRACTION).floor().long()
    in_train = class_rank(labels) < train_count[labels]
    part = torch.nonzero(in_train if split == "train" else ~in_train).flatten()
    pixels, labels = pixels[part], labels[part]
    idx, n = select_indices(labels, cfg, split, 10)
    return TensorClassDataset(pixels[idx], labels[idx], 16.0, image_spec(cfg), [str(d) for d in range(n)])
