"""Frozen per-stage config dataclasses, loaded from YAML with dotted ``--set`` overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import yaml

from lpld_ray.errors import ConfigError

BATCHING_MODES = ("class_wise", "across_classes")
DATASETS = ("fashion_mnist", "digits", "image_folder")
ARCHS = ("convnet", "resnet18", "resnet18_small", "resnet50")
MIX_MODES = ("none", "cutmix", "cutout")
OPTIMIZERS = ("adamw", "sgd")
VIEW_SAMPLING = ("cycle", "uniform")
IMAGE_SAMPLERS = ("global", "shard")
IMAGE_SOURCES = ("synthetic", "real")
PRECISIONS = ("fp32", "bf16")


# Keys whose values are credentials: never echoed in errors, run.yaml, logs or reports.
SECRET_KEYS = frozenset({"storage.access_key_id", "storage.secret_access_key", "storage.session_token"})
REDACTED = "<redacted>"


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a one-line ConfigError naming the key, the bad value and what is allowed."""
    if not ok:
        shown = REDACTED if key in SECRET_KEYS else repr(value)
        raise ConfigError(f"bad value for '{key}': {shown} (allowed: {allowed})")


def require_choice(key: str, value: str, choices: Sequence[str]) -> None:
    require(value in choices, key, value, "one of " + ", ".join(choices))


def require_range(key: str, pair: tuple[float, float], low: float, high: float) -> None:
    lo, hi = pair
    require(low <= lo <= hi <= high and hi > 0, key, list(pair), f"[lo, hi] with {low} <= lo <= hi <= {high}")


@dataclass(frozen=True)
class DataConfig:
    """Which real dataset to read, and how much of it."""

    name: str = "fashion_mnist"
    root: str = "/usr/share/datasets/fashion-mnist"
    num_classes: int | None = None
    train_per_class: int | None = None
    image_size: int = 28

    def __post_init__(self) -> None:
        require_choice("data.name", self.name, DATASETS)
        require(self.num_classes is None or self.num_classes >= 2, "data.num_classes", self.num_classes, "null or an integer >= 2")
        require(self.train_per_class is None or self.train_per_class >= 1, "data.train_per_class", self.train_per_class, "null or an integer >= 1")
        require(self.image_size >= 8, "data.image_size", self.image_size, "an integer >= 8")


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher: given weights, or trained with Ray Train (SGD, one-cycle)."""

    arch: str = "convnet"
    weights: str | None = None
    epochs: int = 4
    batch_size: int = 256
    lr: float = 0.1
    weight_decay: float = 5e-4
    num_workers: int = 1
    cpus_per_worker: int = 2
    eval_every: int = 4  # test top-1 every this many epochs and at the last
    checkpoint_every: int = 1  # a killed teacher resumes from its last checkpoint
    checkpoints_to_keep: int = 2
    max_failures: int = 3

    def __post_init__(self) -> None:
        require_choice("teacher.arch", self.arch, ARCHS)
        require(self.eval_every >= 1, "teacher.eval_every", self.eval_every, "an integer >= 1")
        require(self.checkpoint_every >= 1, "teacher.checkpoint_every", self.checkpoint_every, "an integer >= 1")
        require(self.checkpoints_to_keep >= 1, "teacher.checkpoints_to_keep", self.checkpoints_to_keep, "an integer >= 1")
        require(self.max_failures >= 0, "teacher.max_failures", self.max_failures, "an integer >= 0 (worker failures Ray Train recovers from)")
        require(self.weights is None or bool(self.weights.strip()), "teacher.weights", self.weights, "null or a path/URI")
        require(self.epochs >= 1, "teacher.epochs", self.epochs, "an integer >= 1")
        require(self.batch_size >= 1, "teacher.batch_size", self.batch_size, "an integer >= 1")
        require(self.lr > 0, "teacher.lr", self.lr, "a number > 0")
        require(self.weight_decay >= 0, "teacher.weight_decay", self.weight_decay, "a number >= 0")
        require(self.num_workers >= 1, "teacher.num_workers", self.num_workers, "an integer >= 1")
        require(self.cpus_per_worker >= 1, "teacher.cpus_per_worker", self.cpus_per_worker, "an integer >= 1")


@dataclass(frozen=True)
class SqueezeConfig:
    """Class-wise BN statistics over the real training set."""

    batch_size: int = 500
    partitions: int = 2

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "squeeze.batch_size", self.batch_size, "an integer >= 1")
        require(self.partitions >= 1, "squeeze.partitions", self.partitions, "an integer >= 1")


@dataclass(frozen=True)
class RecoverConfig:
    """Synthesis of IPC images per class against the teacher (LPLD or the SRe2L baseline)."""

    ipc: int = 10
    iterations: int = 1000
    lr: float = 0.25
    betas: tuple[float, float] = (0.5, 0.9)
    r_bn: float = 0.01
    first_bn_multiplier: float = 10.0
    jitter: int = 4
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    batching: str = "class_wise"
    classes_per_pass: int = 1
    source: str = "synthetic"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        require_choice("recover.source", self.source, IMAGE_SOURCES)
        require_choice("recover.precision", self.precision, PRECISIONS)
        require(self.ipc >= 1, "recover.ipc", self.ipc, "an integer >= 1")
        require(self.iterations >= 1, "recover.iterations", self.iterations, "an integer >= 1")
        require(self.lr > 0, "recover.lr", self.lr, "a number > 0")
        require(all(0 <= b < 1 for b in self.betas), "recover.betas", list(self.betas), "two numbers in [0, 1)")
        require(self.r_bn >= 0, "recover.r_bn", self.r_bn, "a number >= 0")
        require(self.first_bn_multiplier >= 0, "recover.first_bn_multiplier", self.first_bn_multiplier, "a number >= 0")
        require(self.jitter >= 0, "recover.jitter", self.jitter, "an integer >= 0")
        require_range("recover.crop_scale", self.crop_scale, 0.0, 1.0)
        require_choice("recover.batching", self.batching, BATCHING_MODES)
        require(self.classes_per_pass >= 1, "recover.classes_per_pass", self.classes_per_pass, "an integer >= 1")


@dataclass(frozen=True)
class RelabelConfig:
    """The pruned label pool: E epochs of views, 1/k of them kept, teacher output stored as fp16."""

    epochs: int = 300
    compression: float = 1.0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    mix: str = "cutmix"
    cutmix_beta: float = 1.0
    cutout_fraction: float = 0.5
    batch_size: int = 256

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "relabel.epochs", self.epochs, "an integer >= 1")
        require(self.compression >= 1, "relabel.compression", self.compression, "a number >= 1 (1 keeps every view, 40 keeps 1 in 40)")
        require_range("relabel.crop_scale", self.crop_scale, 0.0, 1.0)
        require_choice("relabel.mix", self.mix, MIX_MODES)
        require(self.cutmix_beta > 0, "relabel.cutmix_beta", self.cutmix_beta, "a number > 0")
        require(0 < self.cutout_fraction <= 1, "relabel.cutout_fraction", self.cutout_fraction, "a number in (0, 1]")
        require(self.batch_size >= 1, "relabel.batch_size", self.batch_size, "an integer >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """The student: KD on the label pool with Ray Train."""

    arch: str = "convnet"
    epochs: int = 300
    batch_size: int = 50
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    warmup_epochs: int = 0
    temperature: float = 4.0
    label_smoothing: float = 0.0
    view_sampling: str = "cycle"
    sampler: str = "global"  # shard: whole label shards per rank and epoch, so a rank reads N/W records, not N
    eval_every: int = 50
    checkpoint_every: int = 25
    checkpoints_to_keep: int = 2  # Ray Train CheckpointConfig(num_to_keep)
    num_workers: int = 1
    cpus_per_worker: int = 2
    max_failures: int = 3
    loader_workers: int = 0  # DataLoader processes per Ray Train worker
    image_cache_mb: int = 1024  # decoded images a training worker keeps between epochs

    def __post_init__(self) -> None:
        require_choice("train.arch", self.arch, ARCHS)
        require(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        require(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        require_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        require(self.lr > 0, "train.lr", self.lr, "a number > 0")
        require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        require(0 <= self.momentum < 1, "train.momentum", self.momentum, "a number in [0, 1)")
        require(0 <= self.warmup_epochs < self.epochs, "train.warmup_epochs", self.warmup_epochs, "an integer in [0, train.epochs)")
        require(self.temperature > 0, "train.temperature", self.temperature, "a number > 0")
        require(0 <= self.label_smoothing < 1, "train.label_smoothing", self.label_smoothing, "a number in [0, 1)")
        require_choice("train.view_sampling", self.view_sampling, VIEW_SAMPLING)
        require_choice("train.sampler", self.sampler, IMAGE_SAMPLERS)
        require(self.eval_every >= 1, "train.eval_every", self.eval_every, "an integer >= 1")
        require(self.checkpoint_every >= 1, "train.checkpoint_every", self.checkpoint_every, "an integer >= 1")
        require(self.checkpoints_to_keep >= 1, "train.checkpoints_to_keep", self.checkpoints_to_keep, "an integer >= 1")
        require(self.num_workers >= 1, "train.num_workers", self.num_workers, "an integer >= 1")
        require(self.cpus_per_worker >= 1, "train.cpus_per_worker", self.cpus_per_worker, "an integer >= 1")
        require(self.max_failures >= 0, "train.max_failures", self.max_failures, "an integer >= 0 (worker failures Ray Train recovers from)")
        require(self.loader_workers >= 0, "train.loader_workers", self.loader_workers, "an integer >= 0")
        require(self.image_cache_mb >= 0, "train.image_cache_mb", self.image_cache_mb, "an integer >= 0 (MiB)")


@dataclass(frozen=True)
class RunnerConfig:
    """How class shards are spread over Ray actors."""

    class_shard_size: int = 1
    num_workers: int = 0
    cpus_per_worker: int = 1
    max_shard_retries: int = 2
    progress_every_s: float = 10.0

    def __post_init__(self) -> None:
        require(self.class_shard_size >= 1, "runner.class_shard_size", self.class_shard_size, "an integer >= 1")
        require(self.num_workers >= 0, "runner.num_workers", self.num_workers, "0 (as many as the cluster allows) or more")
        require(self.cpus_per_worker >= 1, "runner.cpus_per_worker", self.cpus_per_worker, "an integer >= 1")
        require(self.max_shard_retries >= 0, "runner.max_shard_retries", self.max_shard_retries, "an integer >= 0")
        require(self.progress_every_s > 0, "runner.progress_every_s", self.progress_every_s, "a number > 0")


@dataclass(frozen=True)
class StorageConfig:
    """Object-store options for s3:// run directories (else the usual AWS_* environment variables)."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    retries: int = 5
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    lease_timeout_s: float = 120.0
    lease_refresh_s: float = 20.0

    def __post_init__(self) -> None:
        require(self.endpoint_url is None or "://" in self.endpoint_url, "storage.endpoint_url", self.endpoint_url,
                "null or a URL such as http://127.0.0.1:9000")
        require((self.access_key_id is None) == (self.secret_access_key is None), "storage.secret_access_key",
                self.secret_access_key, "set together with storage.access_key_id, or both null")
        require(1 <= self.retries <= 20, "storage.retries", self.retries, "an integer in [1, 20]")
        require(self.connect_timeout_s > 0, "storage.connect_timeout_s", self.connect_timeout_s, "a number > 0")
        require(self.read_timeout_s > 0, "storage.read_timeout_s", self.read_timeout_s, "a number > 0")
        require(self.lease_timeout_s > 0, "storage.lease_timeout_s", self.lease_timeout_s, "a number > 0")
        require(0 < self.lease_refresh_s <= self.lease_timeout_s / 2, "storage.lease_refresh_s", self.lease_refresh_s,
                "a number > 0 and at most half of storage.lease_timeout_s")


@dataclass(frozen=True)
class Config:
    """A whole run: one section per stage."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    relabel: RelabelConfig = field(default_factory=RelabelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        require(self.seed >= 0, "seed", self.seed, "an integer >= 0")


# Keys whose change does not change any result: a run may resume across them.
RESUME_NEUTRAL_KEYS = frozenset(
    {
        "runner.num_workers",
        "runner.cpus_per_worker",
        "runner.max_shard_retries",
        "runner.progress_every_s",
        "teacher.cpus_per_worker",
        "teacher.eval_every",
        "teacher.checkpoint_every",
        "teacher.checkpoints_to_keep",
        "teacher.max_failures",
        "train.checkpoints_to_keep",
        "squeeze.batch_size",
        "squeeze.partitions",
        "recover.classes_per_pass",
        "relabel.batch_size",
        "train.eval_every",
        "train.checkpoint_every",
        "train.cpus_per_worker",
        "train.max_failures",
        "train.loader_workers",
        "train.image_cache_mb",
    }
)
# Where and how the run is stored does not change its results.
RESUME_NEUTRAL_SECTIONS = ("storage.",)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, str, bool, tuple, Optional)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is tuple:
        args = typing.get_args(tp)
        ok = isinstance(value, (list, tuple)) and len(value) == len(args)
        require(ok, key, value, f"a list of {len(args)} values")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        require(isinstance(value, bool), key, value, "true or false")
        return value
    if tp is int:
        require(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        require(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "a number")
        return float(value)
    if tp is str:
        require(isinstance(value, str), key, value, "a string")
        return value
    raise TypeError(f"unsupported config type {_type_name(tp)} for {key}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys by their dotted name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"section '{prefix[:-1]}'" if prefix else "the top level"
            raise ConfigError(f"unknown config key '{prefix}{key}' (allowed in {where}: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key, tp, value = prefix + name, hints[name], data[name]
        if dataclasses.is_dataclass(tp):
            require(isinstance(value, dict), key, value, "a mapping of keys to values")
            kwargs[name] = _build(tp, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override (value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise ConfigError(f"bad override {assignment!r} (allowed: key=value, e.g. recover.iterations=4000)")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"bad override {assignment!r}: '{part}' is not a section")
    node[parts[-1]] = value


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults < YAML file < ``--set`` overrides; fails with a one-line ConfigError."""
    tree: dict[str, Any] = {}
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                tree = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: '{path}' (allowed: a YAML file, e.g. jobs/configs/fashion_mnist.yaml)") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, not {type(tree).__name__}")
    for assignment in overrides:
        apply_override(tree, assignment)
    return config_from_dict(tree)


def config_from_dict(tree: dict[str, Any]) -> Config:
    """A validated Config from a nested dict (a parsed YAML file or a run record)."""
    return _build(Config, tree, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML and comparison."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def result_key_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ and that change results (resume-neutral keys ignored)."""
    a, b = flatten(old), flatten(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in RESUME_NEUTRAL_KEYS and not k.startswith(RESUME_NEUTRAL_SECTIONS)
            and a.get(k) != b.get(k)]


def redacted(tree: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict with every credential that is set replaced by '<redacted>'."""
    out = {k: (redacted(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    storage = out.get("storage", {})
    for key in SECRET_KEYS:
        name = key.split(".", 1)[1]
        if storage.get(name) is not None:
            storage[name] = REDACTED
    return out
