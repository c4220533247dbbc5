"""Frozen per-stage config models (pydantic v2), loaded from YAML with dotted ``--set`` overrides."""

from __future__ import annotations

import typing
from typing import Annotated, Any, Callable, Literal

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from lpld_ray.config_errors import (
    config_error,
    require,
)

# One Literal per choice validates it; the tuples below are the ones other modules import.
Arch = Literal["convnet", "convnet_w64", "resnet18", "resnet18_small", "resnet50"]
Batching = Literal["class_wise", "across_classes"]
Dataset = Literal["fashion_mnist", "digits", "image_folder"]
MixMode = Literal["none", "cutmix", "cutout"]
Optimizer = Literal["adamw", "sgd"]
ViewSampling = Literal["cycle", "uniform"]
ImageSampler = Literal["global", "shard"]
ImageSource = Literal["synthetic", "real", "rded"]
Precision = Literal["fp32", "bf16"]
Normalization = Literal["dataset", "imagenet", "tiny_imagenet", "none"]
EvalResize = Literal["short_side", "resize_crop", "squash"]
SqueezeTransform = Literal["center", "random_resized_crop"]
Statistics = Literal["class_wise", "global"]
JitterRange = Literal["nonnegative", "symmetric"]
ImageFormat = Literal["png", "jpeg"]
CutoutFill = Literal["zero", "random"]
LrStep = Literal["batch", "epoch"]
WeightDecayOn = Literal["all", "weights"]
SmoothingOn = Literal["probabilities", "logits"]
TemperatureKind = Literal["constant", "step", "cosine"]
PruneBy = Literal["random", "confidence", "diff", "diff_signed", "cut_ratio", "correct"]
PruneKeep = Literal["easy", "hard"]
ViewParamsKind = Literal["stored", "seeded"]
ARCHS: tuple[str, ...] = typing.get_args(Arch)
DATASETS: tuple[str, ...] = typing.get_args(Dataset)
VIEW_SAMPLING: tuple[str, ...] = typing.get_args(ViewSampling)

SEED_LIMIT = 2**63  # seeds are 64-bit signed integers downstream (torch, numpy)


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a bool is not a number")
    return value


def _check_scale(pair: tuple[float, float]) -> tuple[float, float]:
    lo, hi = pair
    if not (0.0 <= lo <= hi <= 1.0 and hi > 0):
        raise ValueError("crop scale out of range")
    return pair


def _null_or(ok: Callable[[str], bool]) -> AfterValidator:
    """Accept null, or a string for which ``ok`` holds."""

    def check(value: str | None) -> str | None:
        if value is not None and not ok(value):
            raise ValueError("value not allowed")
        return value

    return AfterValidator(check)


# Ints are strict (no bool, no "3", no 3.0); numbers take ints and numeric strings but not bools, nan or inf.
Int = StrictInt
Num = Annotated[float, BeforeValidator(_not_bool), AllowInfNan(False)]
Unit = Annotated[Num, Field(ge=0, lt=1)]
Scale = Annotated[tuple[Num, Num], AfterValidator(_check_scale)]
SCALE_ALLOWED = "[lo, hi] with 0.0 <= lo <= hi <= 1.0"
WORKER_FAILURES = "an integer >= 0 (worker failures Ray Train recovers from)"


class _Model(BaseModel):
    """Frozen, no unknown keys; a bad value raises a one-line ConfigError."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise config_error(err, type(self), data, _SECTION_OF.get(type(self))) from None


class DataConfig(_Model):
    """Which real dataset to read, and how much of it."""

    name: Dataset = "fashion_mnist"
    root: StrictStr = "/usr/share/datasets/fashion-mnist"
    num_classes: Int | None = Field(None, ge=2)
    train_per_class: Int | None = Field(None, ge=1)
    test_per_class: Int | None = Field(None, ge=1)  # the first N test images of each class: a quicker, rougher top-1
    image_size: Int = Field(28, ge=8)
    # mean/std the teacher was trained with, used by squeeze, recover, relabel, the student and evaluation alike:
    # dataset = the dataset's own (Fashion-MNIST's, digits', ImageNet's for image_folder); none = raw [0, 1] pixels
    normalization: Normalization = "dataset"
    # test images of an image_folder: short_side = shorter side to image_size + centre crop; resize_crop = shorter
    # side to image_size / 0.875 (256 for 224) + centre crop; squash = resize to image_size x image_size
    eval_resize: EvalResize = "short_side"

    @model_validator(mode="after")
    def _channels_fit(self) -> DataConfig:
        gray = self.name in ("fashion_mnist", "digits")
        require(not (gray and self.normalization in ("imagenet", "tiny_imagenet")), "data.normalization",
                self.normalization, "dataset or none for a one-channel dataset")
        require(not (gray and self.eval_resize != "short_side"), "data.eval_resize", self.eval_resize,
                "short_side for an in-memory dataset (its images are already image-sized)")
        return self


def _divides(section: str, batch_size: int, workers: int) -> None:
    """The global batch splits evenly over the Ray Train workers."""
    require(batch_size % workers == 0, f"{section}.batch_size", batch_size,
            f"a multiple of {section}.num_workers ({workers}): the global batch is split evenly over the workers")


class TeacherConfig(_Model):
    """The teacher: given weights, or trained with Ray Train (SGD, one-cycle)."""

    arch: Arch = "convnet"
    weights: Annotated[StrictStr | None, _null_or(str.strip)] = Field(None, description="null or a path/URI")
    epochs: Int = Field(4, ge=1)
    batch_size: Int = Field(256, ge=1)  # global: split evenly over num_workers
    lr: Num = Field(0.1, gt=0)
    weight_decay: Num = Field(5e-4, ge=0)
    num_workers: Int = Field(1, ge=1)
    cpus_per_worker: Int = Field(2, ge=1)
    eval_every: Int = Field(4, ge=1)  # test top-1 every this many epochs and at the last
    checkpoint_every: Int = Field(1, ge=1)  # a killed teacher resumes from its last checkpoint
    checkpoints_to_keep: Int = Field(2, ge=1)
    max_failures: Int = Field(3, ge=0, description=WORKER_FAILURES)

    @model_validator(mode="after")
    def _batch_divides(self) -> TeacherConfig:
        _divides("teacher", self.batch_size, self.num_workers)
        return self


class SqueezeConfig(_Model):
    """Class-wise BN statistics over the real training set."""

    batch_size: Int = Field(500, ge=1)
    partitions: Int = Field(2, ge=1)
    # center: the evaluation decode; random_resized_crop: one seeded RandomResizedCrop(scale 0.08..1) + flip view
    # of every training image (the official squeeze transform), still summed exactly in float64
    transform: SqueezeTransform = "center"


class RecoverConfig(_Model):
    """Synthesis of IPC images per class against the teacher (LPLD or the SRe2L baseline)."""

    ipc: Int = Field(10, ge=1)
    iterations: Int = Field(1000, ge=1)
    lr: Num = Field(0.25, gt=0)
    betas: tuple[Unit, Unit] = Field((0.5, 0.9), description="two numbers in [0, 1)")
    r_bn: Num = Field(0.01, ge=0)
    first_bn_multiplier: Num = Field(10.0, ge=0)
    jitter: Int = Field(4, ge=0)
    jitter_range: JitterRange = "nonnegative"  # rolls drawn from [0, jitter] or [-jitter, jitter]
    crop_scale: Scale = Field((0.08, 1.0), description=SCALE_ALLOWED)
    flip: StrictBool = True
    batching: Batching = "class_wise"
    statistics: Statistics = "class_wise"  # BN targets; when absent it follows batching (across_classes: global)
    classes_per_pass: Int = Field(1, ge=1)
    source: ImageSource = "synthetic"
    precision: Precision = "fp32"
    image_format: ImageFormat = "png"  # how images are stored; relabel and the student both decode the stored object
    jpeg_quality: Int = Field(75, ge=1, le=100)  # Pillow's default, as the official code saves

    @model_validator(mode="before")
    @classmethod
    def _statistics_follow_batching(cls, data: Any) -> Any:
        if isinstance(data, dict) and "statistics" not in data:
            return {**data, "statistics": "global" if data.get("batching") == "across_classes" else "class_wise"}
        return data

    @model_validator(mode="after")
    def _statistics_fit(self) -> RecoverConfig:
        require(not (self.batching == "across_classes" and self.statistics == "class_wise"), "recover.statistics",
                self.statistics, "global with recover.batching across_classes (a batch holds one image per class)")
        return self


class RdedConfig(_Model):
    """recover.source rded (RDED, Sun et al. CVPR 2024): per class, ``crops`` random square crops of each of
    ``candidates`` real images scored by the teacher's CE; the best crop of each of the ipc x factor^2 best images,
    stitched factor x factor. Defaults: the official small-dataset scripts (CIFAR, Tiny-ImageNet)."""

    candidates: Int = Field(300, ge=1)  # official --mipc
    crops: Int = Field(5, ge=1)  # official --num-crop
    factor: Int = Field(1, ge=1)  # official --factor: tiles per side of one stored image
    crop_scale: Scale = Field((0.08, 1.0), description=SCALE_ALLOWED)  # RandomResizedCrop's default, ratio 1
    batch_size: Int = Field(128, ge=1)  # crops per teacher forward while scoring (resume-neutral)


class RelabelConfig(_Model):
    """The pruned label pool: E epochs of views, 1/k of them kept, teacher output stored as fp16."""

    epochs: Int = Field(300, ge=1)
    compression: Num = Field(1.0, ge=1, description="a number >= 1 (1 keeps every view, 40 keeps 1 in 40)")
    crop_scale: Scale = Field((0.08, 1.0), description=SCALE_ALLOWED)
    flip: StrictBool = True
    mix: MixMode = "cutmix"
    cutmix_beta: Num = Field(1.0, gt=0)
    cutout_fraction: Num = Field(0.5, gt=0, le=1)
    cutout_fill: CutoutFill = "zero"  # random: one uniform colour per view, drawn with the view and stored in it
    topk: Int | None = Field(None, ge=1, description="null (every logit) or an integer >= 1")  # LPQLD's MR-k
    prune_by: PruneBy = "random"  # else score all E views of an image by the teacher and keep its best (Table 5)
    prune_keep: PruneKeep = "easy"  # easy: the highest scores; hard: the lowest
    params: ViewParamsKind = "stored"  # seeded: no ids or augmentation parameters stored, redrawn from the seed
    batch_size: Int = Field(256, ge=1)

    @model_validator(mode="after")
    def _seeded_views_are_random(self) -> RelabelConfig:
        require(self.params == "stored" or self.prune_by == "random", "relabel.params", self.params,
                "stored, or seeded with relabel.prune_by random (metric pruning keeps views the seed cannot name)")
        return self


class TrainConfig(_Model):
    """The student: KD on the label pool with Ray Train."""

    arch: Arch = "convnet"
    epochs: Int = Field(300, ge=1)
    batch_size: Int = Field(50, ge=1)  # global: split evenly over num_workers
    optimizer: Optimizer = "adamw"
    lr: Num = Field(1e-3, gt=0)
    weight_decay: Num = Field(0.01, ge=0)
    weight_decay_on: WeightDecayOn = "all"  # weights: only parameters with 2 or more dimensions (not BN, not biases)
    momentum: Num = Field(0.9, ge=0, lt=1)
    lr_step: LrStep = "batch"  # the warm-up and cosine factor changes every batch, or once per epoch
    warmup_epochs: Int = Field(0, ge=0, description="an integer in [0, train.epochs)")
    warmup_start: Num | None = Field(None, gt=0, le=1, description="null or a number in (0, 1]")
    temperature: Num = Field(4.0, gt=0)  # the teacher's; with a schedule, its value at epoch 0
    temperature_schedule: TemperatureKind = "constant"  # step / cosine: LPQLD's dynamic knowledge reuse
    temperature_step: Int = Field(30, ge=1)  # step: epochs between decays
    temperature_gamma: Num = Field(0.7, gt=0, le=1)  # step: the factor of each decay
    temperature_min: Num = Field(2.0, gt=0)  # step: the floor; cosine: the value at the last epoch
    student_temperature: Num | None = Field(None, gt=0, description="null (the teacher's temperature) or a number > 0")
    calibrate_student_temperature: StrictBool = False  # LPQLD's calibrated alignment, from student_temperature or 1
    t_squared: StrictBool = False  # multiply the KD loss by T^2
    label_smoothing: Num = Field(0.0, ge=0, lt=1)
    smoothing_on: SmoothingOn = "probabilities"
    view_sampling: ViewSampling = "cycle"
    sampler: ImageSampler = "global"  # shard: whole label shards per rank and epoch, so a rank reads N/W records, not N
    eval_every: Int = Field(50, ge=1)
    checkpoint_every: Int = Field(25, ge=1)
    checkpoints_to_keep: Int = Field(2, ge=1)  # Ray Train CheckpointConfig(num_to_keep)
    num_workers: Int = Field(1, ge=1)
    cpus_per_worker: Int = Field(2, ge=1)
    max_failures: Int = Field(3, ge=0, description=WORKER_FAILURES)
    loader_workers: Int = Field(0, ge=0)  # DataLoader processes per Ray Train worker
    image_cache_mb: Int = Field(1024, ge=0, description="an integer >= 0 (MiB)")  # decoded images kept between epochs

    @model_validator(mode="after")
    def _warmup_before_end(self) -> TrainConfig:
        require(self.warmup_epochs < self.epochs, "train.warmup_epochs", self.warmup_epochs, "an integer in [0, train.epochs)")
        _divides("train", self.batch_size, self.num_workers)
        return self


class RunnerConfig(_Model):
    """How class shards are spread over Ray actors."""

    class_shard_size: Int = Field(1, ge=1)
    num_workers: Int = Field(0, ge=0, description="0 (as many as the cluster allows) or more")
    cpus_per_worker: Int = Field(1, ge=1)
    max_shard_retries: Int = Field(2, ge=0)
    progress_every_s: Num = Field(10.0, gt=0)
    resource_wait_s: Num = Field(0.0, ge=0, description="a number >= 0 (seconds an autoscaling cluster may take to "
                                 "add the CPUs and GPUs asked for; 0: a fixed cluster, refused at once)")


class StorageConfig(_Model):
    """Object-store options for s3:// run directories (else the usual AWS_* environment variables)."""

    endpoint_url: Annotated[StrictStr | None, _null_or(lambda v: "://" in v)] = Field(
        None, description="null or a URL such as http://127.0.0.1:9000")
    region: StrictStr | None = None
    access_key_id: StrictStr | None = Field(None, repr=False, description="a string")
    secret_access_key: StrictStr | None = Field(None, repr=False, description="a string")
    session_token: StrictStr | None = Field(None, repr=False, description="a string")
    retries: Int = Field(5, ge=1, le=20)
    connect_timeout_s: Num = Field(10.0, gt=0)
    read_timeout_s: Num = Field(60.0, gt=0)
    lease_timeout_s: Num = Field(120.0, gt=0)
    lease_refresh_s: Num = Field(20.0, gt=0, description="a number > 0 and at most half of storage.lease_timeout_s")

    @model_validator(mode="after")
    def _pairs(self) -> StorageConfig:
        require((self.access_key_id is None) == (self.secret_access_key is None), "storage.secret_access_key",
                self.secret_access_key, "set together with storage.access_key_id, or both null")
        require(self.lease_refresh_s <= self.lease_timeout_s / 2, "storage.lease_refresh_s", self.lease_refresh_s,
                "a number > 0 and at most half of storage.lease_timeout_s")
        return self


class Config(_Model):
    """A whole run: one section per stage."""

    seed: Int = Field(0, ge=0, lt=SEED_LIMIT, description="an integer in [0, 2**63)")
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    squeeze: SqueezeConfig = Field(default_factory=SqueezeConfig)
    recover: RecoverConfig = Field(default_factory=RecoverConfig)
    rded: RdedConfig = Field(default_factory=RdedConfig)
    relabel: RelabelConfig = Field(default_factory=RelabelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _real_images_exist(self) -> Config:
        per_class = self.data.train_per_class
        if self.recover.source == "real" and per_class is not None:
            require(self.recover.ipc <= per_class, "recover.ipc", self.recover.ipc,
                    f"at most data.train_per_class ({per_class}) with recover.source real")
        return self

    @model_validator(mode="after")
    def _rded_candidates_suffice(self) -> Config:
        if self.recover.source == "rded":
            rd, per_class, kept = self.rded, self.data.train_per_class, self.recover.ipc * self.rded.factor ** 2
            require(rd.candidates >= kept, "rded.candidates", rd.candidates,
                    f"at least recover.ipc x rded.factor^2 ({kept}): one crop is kept per candidate image")
            if per_class is not None:
                require(rd.candidates <= per_class, "rded.candidates", rd.candidates,
                        f"at most data.train_per_class ({per_class})")
        return self


# The dotted prefix of each section class when it is built on its own.
_SECTION_OF: dict[type, str] = {f.annotation: name for name, f in Config.model_fields.items() if name != "seed"}
