"""ImageFolder trees (root/train/<class>/*, root/val/<class>/*) on a local path or object storage, decoded lazily."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from lpld_ray.config import DataConfig
from lpld_ray.data.base import ClassDataset, class_count, image_spec, select_indices
from lpld_ray.errors import DataError, StorageError
from lpld_ray.method.images import ImageSpec
from lpld_ray.store.storage import Store
from lpld_ray.store.uris import check_uri

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
Listing = tuple[list[str] | None, list[str]]  # a split's class folders (None: no such split) and every file under it


class FolderClassDataset(ClassDataset):
    """Image files of one split, read through a Store and decoded on access: RGB, resized as ``resize`` says
    (data.eval_resize). A DataLoader batch (``__getitems__``) is read and decoded in ``decode_threads`` threads."""

    def __init__(self, store: Store, files: list[str], targets: torch.Tensor, spec: ImageSpec, class_names: list[str],
                 decode_threads: int = 0, resize: str = "short_side") -> None:
        super().__init__(spec, targets, class_names)
        self.store, self.files = store, files  # the Store pickles without its filesystem and reopens it per process
        self.decode_threads = decode_threads or torch.get_num_threads()
        self.resize = resize

    @property
    def root(self) -> str:
        return self.store.root

    def image(self, i: int) -> torch.Tensor:
        return decode_image(self.store.read_bytes(self.files[i]), self.spec.size, self.store.uri(self.files[i]),
                            self.resize)

    def source_image(self, i: int) -> torch.Tensor:
        """Image ``i`` at the file's own resolution, float32 [3,H,W] in [0,1]."""
        return decode_image(self.store.read_bytes(self.files[i]), 0, self.store.uri(self.files[i]), "none")

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """One batch, its files read and decoded in threads (object reads and Pillow's decoders release the GIL)."""
        with ThreadPoolExecutor(max(1, min(self.decode_threads, len(indices)))) as pool:
            images = list(pool.map(self.image, indices))
        return [(x, int(self.targets[i])) for x, i in zip(images, indices, strict=True)]

    def images(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.numel() == 0:
            return super().images(idx)
        return torch.stack([x for x, _ in self.__getitems__(idx.tolist())])

    def subset(self, idx: torch.Tensor) -> "FolderClassDataset":
        return FolderClassDataset(self.store, [self.files[i] for i in idx.tolist()], self.targets[idx], self.spec,
                                  self.class_names, self.decode_threads, self.resize)


CROP_RATIO = 0.875  # 224 / 256: resize_crop resizes the shorter side to size / 0.875, then crops size


def _short_side(rgb: Image.Image, side: int) -> Image.Image:
    """The shorter side resized to ``side`` (bilinear), the aspect ratio kept."""
    w, h = rgb.size
    if min(w, h) == side:
        return rgb
    scale = side / min(w, h)
    return rgb.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.Resampling.BILINEAR)


def decode_image(data: bytes, size: int, name: str, resize: str = "short_side") -> torch.Tensor:
    """Decode one file's bytes to float32 [3,size,size] in [0,1]. ``resize``: short_side (shorter side to size,
    centre crop), resize_crop (shorter side to size / 0.875, centre crop: 256 -> 224), squash (to size x size),
    none (the file's own size)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
    except UnidentifiedImageError:
        raise DataError(f"cannot decode image '{name}': not an image file Pillow can read") from None
    except (OSError, ValueError) as err:
        raise DataError(f"cannot decode image '{name}': {err}") from err
    if resize == "squash":
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR) if rgb.size != (size, size) else rgb
    elif resize != "none":
        rgb = _short_side(rgb, size if resize == "short_side" else int(size / CROP_RATIO))
        w, h = rgb.size
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        rgb = rgb.crop((left, top, left + size, top + size))
    arr = np.array(rgb, dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32) / 255.0


def open_folder(root: str, options: dict | None) -> Store:
    check_uri(root, "data.root")
    return Store(root, options)


def subfolders(store: Store, rel: str) -> list[str] | None:
    """Names of the folders directly under ``rel``; None when ``rel`` is not there."""
    try:
        return store.folders(rel)
    except FileNotFoundError:
        return None


def folder_classes(store: Store) -> list[str]:
    """Class names: the sorted sub-folder names of ``root/train``."""
    names = subfolders(store, "train")
    if names is None:
        raise DataError(f"image_folder root '{store.root}' has no train/ folder "
                        "(expected root/train/<class>/*.png|jpg and root/val/<class>/...)")
    if not names:
        raise DataError(f"image_folder '{store.uri('train')}' has no class sub-folders")
    return names


def folder_files(store: Store, split: str, classes: list[str], all_classes: list[str],
                 listing: Listing) -> tuple[list[str], list[int]]:
    """Image files (relative to the root) of ``classes`` under ``split`` in (class, file name) order, with their labels,
    from the split's ``listing``."""
    present, listed = listing
    if present is None:
        raise DataError(f"image_folder split folder '{store.uri(split)}' not found")
    extra = sorted(set(present) - set(all_classes))
    if extra:
        raise DataError(f"class folder '{store.uri(f'{split}/{extra[0]}')}' has no counterpart in train/: "
                        "both splits must use the same class folders")
    by_class: dict[str, list[str]] = {name: [] for name in classes}
    for name in listed:
        folder, _, file = name.partition("/")
        if folder in by_class and "/" not in file and file.lower().endswith(IMAGE_EXTS):
            by_class[folder].append(f"{split}/{name}")
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        if not by_class[name] and split == "train":
            raise DataError(f"class folder '{store.uri(f'train/{name}')}' holds no {'/'.join(IMAGE_EXTS)} images")
        files += by_class[name]
        labels += [label] * len(by_class[name])
    return files, labels


def _split_dataset(cfg: DataConfig, store: Store, split: str, all_classes: list[str],
                   listing: Listing) -> FolderClassDataset:
    classes = all_classes[:class_count(cfg, len(all_classes))]
    folder = "train" if split == "train" else "val"
    files, labels = folder_files(store, folder, classes, all_classes, listing)
    targets = torch.tensor(labels, dtype=torch.int64)
    idx, _ = select_indices(targets, cfg, split, len(all_classes))
    resize = cfg.eval_resize if split != "train" else "short_side"
    return FolderClassDataset(store, [files[i] for i in idx.tolist()], targets[idx], image_spec(cfg), classes,
                              resize=resize)


def load_folder(cfg: DataConfig, split: str, options: dict | None = None) -> FolderClassDataset:
    """One split of the tree at ``cfg.root`` (``options``: fsspec options for an object-storage root)."""
    store = open_folder(cfg.root, options)
    try:
        all_classes = folder_classes(store)
        folder = "train" if split == "train" else "val"
        listing = (all_classes if split == "train" else subfolders(store, folder)), store.list(folder)
    except StorageError as err:
        raise DataError(f"image_folder '{cfg.root}' cannot be read: {err}") from None
    return _split_dataset(cfg, store, split, all_classes, listing)


def load_folder_splits(cfg: DataConfig, options: dict | None = None) -> tuple[FolderClassDataset, FolderClassDataset]:
    """Both splits of the tree (train, test): train/'s class folders, its files, val/'s folders and val/'s files
    listed at the same time, each once (on object storage each listing is a chain of LIST pages)."""
    store = open_folder(cfg.root, options)
    try:
        with ThreadPoolExecutor(3) as pool:
            train_files, val_files = pool.submit(store.list, "train"), pool.submit(store.list, "val")
            val_folders = pool.submit(subfolders, store, "val")
            all_classes = folder_classes(store)
            train, val = (all_classes, train_files.result()), (val_folders.result(), val_files.result())
    except StorageError as err:
        raise DataError(f"image_folder '{cfg.root}' cannot be read: {err}") from None
    if val[0] is None:
        raise DataError(f"image_folder root '{store.root}' has no val/ folder (expected root/val/<class>/*.png|jpg)")
    return (_split_dataset(cfg, store, "train", all_classes, train),
            _split_dataset(cfg, store, "test", all_classes, val))


def folder_class_names(cfg: DataConfig, options: dict | None = None) -> list[str]:
    """The class folder names of the tree at ``cfg.root`` that the config uses (one listing of train/)."""
    store = open_folder(cfg.root, options)
    try:
        names = folder_classes(store)
    except StorageError as err:
        raise DataError(f"image_folder '{cfg.root}' cannot be read: {err}") from None
    return names[:class_count(cfg, len(names))]


def check_folder(cfg: DataConfig, options: dict | None = None) -> int:
    """Cheap pre-flight of a tree: train/ with class folders, val/, and num_classes within them (the two folder
    levels listed at the same time); returns the number of classes used."""
    store = open_folder(cfg.root, options)
    try:
        with ThreadPoolExecutor(1) as pool:
            val_folders = pool.submit(subfolders, store, "val")
            count = class_count(cfg, len(folder_classes(store)))
            if val_folders.result() is None:
                raise DataError(f"image_folder root '{store.root}' has no val/ folder (expected root/val/<class>/*.png|jpg)")
    except StorageError as err:
        raise DataError(f"image_folder '{cfg.root}' cannot be read: {err}") from None
    return count
