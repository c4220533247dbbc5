"""Config from YAML files and ``--set`` overrides, back to plain dicts, and which keys a resume compares."""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from lpld_ray.config import Config
from lpld_ray.config_errors import REDACTED, SECRET_KEYS, config_error
from lpld_ray.errors import ConfigError

# Keys whose change does not change any result: a run may resume across them.
RESUME_NEUTRAL_KEYS = frozenset({
    "runner.num_workers", "runner.cpus_per_worker", "runner.max_shard_retries", "runner.progress_every_s",
    "runner.resource_wait_s",
    "teacher.cpus_per_worker", "teacher.eval_every", "teacher.checkpoint_every", "teacher.checkpoints_to_keep",
    "teacher.max_failures", "squeeze.batch_size", "squeeze.partitions", "recover.classes_per_pass", "relabel.batch_size",
    "train.eval_every", "train.checkpoint_every", "train.checkpoints_to_keep", "train.cpus_per_worker",
    "train.max_failures", "train.loader_workers", "train.image_cache_mb",
    "rded.batch_size",  # crops per scoring forward
})
# Where and how the run is stored does not change its results.
RESUME_NEUTRAL_SECTIONS = ("storage.",)


M = TypeVar("M", bound=BaseModel)


def replace(model: M, **changes: Any) -> M:
    """A validated copy of a config or section with some fields changed (like dataclasses.replace)."""
    return type(model)(**{**dict(model), **changes})


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


def _where(err: yaml.YAMLError) -> str:
    """' at line L, column C' of a YAML error, when the parser knows it."""
    mark = getattr(err, "problem_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults < YAML file < ``--set`` overrides; fails with a one-line ConfigError."""
    tree: dict[str, Any] = {}
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                tree = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: '{path}' (allowed: a YAML file, e.g. jobs/configs/fashion_mnist.yaml)") from None
        except IsADirectoryError:
            raise ConfigError(f"--config '{path}' is a folder (allowed: a YAML file, e.g. jobs/configs/fashion_mnist.yaml)") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {err.start}): save it as UTF-8 YAML") from None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"config file '{path}' is not valid YAML{_where(err)}: {problem}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, not {type(tree).__name__}")
    for assignment in overrides:
        apply_override(tree, assignment)
    return config_from_dict(tree)


def config_from_dict(tree: dict[str, Any]) -> Config:
    """A validated Config from a nested dict (a parsed YAML file or a run record)."""
    if not isinstance(tree, dict):
        raise ConfigError(f"bad config: {type(tree).__name__} (allowed: a mapping of sections)")
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise config_error(err, Config, tree, None) from None


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML and comparison."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg.model_dump())


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
