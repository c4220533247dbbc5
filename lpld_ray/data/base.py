"""What every real dataset is: images by class, the configured shape and normalisation, class and per-class limits."""

from __future__ import annotations

import torch

from lpld_ray.config import DataConfig
from lpld_ray.config_errors import bad_value
from lpld_ray.errors import DataError
from lpld_ray.method.images import DIGITS_SPEC, FASHION_SPEC, IMAGENET_MEAN, IMAGENET_STD, ImageSpec, with_stats


class ClassDataset(torch.utils.data.Dataset):
    """Real images with integer labels, addressable by class."""

    def __init__(self, spec: ImageSpec, targets: torch.Tensor, class_names: list[str]) -> None:
        self.spec = spec
        self.targets = targets.to(torch.int64)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return int(self.targets.numel())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.image(i), int(self.targets[i])

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` as float32 [C,S,S] in [0,1], not normalised."""
        raise NotImplementedError

    def source_image(self, i: int) -> torch.Tensor:
        """Image ``i`` at its source resolution (what a random resized crop draws from): here the image itself."""
        return self.image(i)

    def images(self, idx: torch.Tensor) -> torch.Tensor:
        """Images at ``idx`` stacked to [len(idx),C,S,S]."""
        if idx.numel() == 0:
            return torch.empty(0, self.spec.channels, self.spec.size, self.spec.size)
        return torch.stack([self.image(int(i)) for i in idx])

    def subset(self, idx: torch.Tensor) -> "ClassDataset":
        """The samples at ``idx`` (in that order), as a dataset of the same kind and classes."""
        raise NotImplementedError

    def indices_of_class(self, c: int) -> torch.Tensor:
        return torch.nonzero(self.targets == c).flatten()

    def class_indices(self, c: int, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Indices of the first ``count`` images of class ``c``, or of a random subset of them with ``generator``."""
        if not 0 <= c < self.num_classes:
            raise DataError(f"class {c} is out of range: the dataset has classes 0..{self.num_classes - 1}")
        idx = self.indices_of_class(c)
        if idx.numel() < count:
            raise DataError(f"class {c} ('{self.class_names[c]}') has {idx.numel()} images but {count} were asked for")
        if generator is not None:
            idx = idx[torch.randperm(idx.numel(), generator=generator)[:count]]
        return idx[:count]

    def class_images(self, c: int, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The images at ``class_indices(c, count, generator)``, stacked."""
        return self.images(self.class_indices(c, count, generator))


def image_spec(cfg: DataConfig) -> ImageSpec:
    """Shape and normalisation (``data.normalization``) of the configured dataset's images, without reading it."""
    if cfg.name == "fashion_mnist":
        own = FASHION_SPEC
    elif cfg.name == "digits":
        own = DIGITS_SPEC
    else:
        own = ImageSpec(3, cfg.image_size, IMAGENET_MEAN, IMAGENET_STD)
    return with_stats(own, cfg.normalization)


def check_image_size(cfg: DataConfig) -> None:
    """Fashion-MNIST and digits come in one size: a data.image_size set to another is refused, not ignored (an
    ImageFolder tree is resized to any data.image_size)."""
    native = image_spec(cfg).size
    if cfg.name != "image_folder" and "image_size" in cfg.model_fields_set and cfg.image_size != native:
        raise bad_value("data.image_size", cfg.image_size,
                        f"{native}, the size of {cfg.name} images, or leave it out; other sizes only with image_folder")


def class_count(cfg: DataConfig, available: int) -> int:
    """Number of classes to keep: cfg.num_classes, checked against what the dataset has."""
    n = available if cfg.num_classes is None else cfg.num_classes
    if not 1 <= n <= available:
        raise DataError(f"data.num_classes is {n} but dataset '{cfg.name}' has {available} classes: "
                        f"use at most {available}, or null for all")
    return n


def class_rank(labels: torch.Tensor) -> torch.Tensor:
    """For each sample, how many earlier samples (in order) share its label."""
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    first = torch.searchsorted(sorted_labels, sorted_labels)
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(labels.numel()) - first
    return rank


def select_indices(labels: torch.Tensor, cfg: DataConfig, split: str, available: int) -> tuple[torch.Tensor, int]:
    """Indices kept (in file order) after the num_classes and the train_per_class / test_per_class limits; and N."""
    n = class_count(cfg, available)
    keep = labels < n
    per_class = cfg.train_per_class if split == "train" else cfg.test_per_class
    if per_class is not None:
        keep &= class_rank(labels) < per_class
    return torch.nonzero(keep).flatten(), n
