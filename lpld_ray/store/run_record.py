"""The run's ``run.yaml``: resolved config and versions, written first; a later run must match it to resume."""

from __future__ import annotations

import logging
import platform
from importlib import metadata

import yaml

from lpld_ray import __version__
from lpld_ray.config import Config
from lpld_ray.config_io import config_from_dict, config_to_dict, flatten, redacted, result_key_diff
from lpld_ray.errors import LpldError
from lpld_ray.store.layout import RUN_RECORD
from lpld_ray.store.storage import Store

log = logging.getLogger(__name__)

RUN_SCHEMA_VERSION = 2  # 2: teacher.batch_size and train.batch_size are global batches, split over the workers


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries whose behaviour the results depend on (read without importing them)."""
    versions = {"lpld_ray": __version__, "python": platform.python_version()}
    for name in ("torch", "torchvision", "ray", "pyarrow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def check_run_record(store: Store, cfg: Config) -> bool:
    """True when the run directory holds a run this config may resume; raises when it may not. Writes nothing."""
    if not store.exists(RUN_RECORD):
        return False
    stored, asked = stored_config(store), config_to_dict(cfg)
    diff = result_key_diff(stored, asked)
    if diff:
        was, now = flatten(stored), flatten(asked)
        changes = ", ".join(f"{key} (was {was.get(key)!r}, now {now.get(key)!r})" for key in diff)
        raise LpldError(f"run directory '{store.root}' holds a run with a different config in {changes}: use the "
                        "same config to resume, or a new --run-dir, or --force-new to delete that run's outputs "
                        "and start over")
    log.info("resuming the run at %s", store.root)
    return True


def stored_config(store: Store) -> dict:
    """The config run.yaml records, upgraded to this schema with later keys at their defaults; one line when run.yaml
    is not a run record this lpld_ray reads."""
    try:
        old = yaml.safe_load(store.read_text(RUN_RECORD))
        version, old_config = old["schema_version"], old["config"]
    except (yaml.YAMLError, KeyError, TypeError, UnicodeDecodeError):
        raise LpldError(f"'{store.uri(RUN_RECORD)}' is not a valid run record: use a new --run-dir") from None
    if not isinstance(version, int) or version > RUN_SCHEMA_VERSION:
        raise LpldError(
            f"'{store.uri(RUN_RECORD)}' has schema_version {version!r}; this lpld_ray reads up to {RUN_SCHEMA_VERSION}: upgrade lpld_ray or use a new --run-dir"
        )
    return with_defaults(upgraded(old_config, version))


def data_checked_before(store: Store, cfg: Config) -> bool:
    """True when run.yaml records a run of this very data section: the job that wrote it read both splits in full
    (every file listed, an image of each decoded) before writing it, so a job resuming it checks the tree's top
    level only (at 21K-P a full listing is 11,000 LIST pages at every start)."""
    try:
        return store.exists(RUN_RECORD) and stored_config(store).get("data") == config_to_dict(cfg)["data"]
    except (LpldError, FileNotFoundError):
        return False


def upgraded(old_config: dict, version: int) -> dict:
    """A stored config in this version's terms: before version 2 a batch size was per Ray Train worker, so the
    global batch it trained with was batch_size x num_workers."""
    if version >= 2 or not isinstance(old_config, dict):
        return old_config
    out = dict(old_config)
    for name in ("teacher", "train"):
        section = out.get(name)
        if isinstance(section, dict) and isinstance(section.get("batch_size"), int):
            workers = section.get("num_workers", 1)
            out[name] = {**section, "batch_size": section["batch_size"] * (workers if isinstance(workers, int) else 1)}
    return out


def with_defaults(old_config: dict) -> dict:
    """A stored config with keys added since it was written set to their defaults (which keep the old behaviour);
    as stored when it no longer validates, so that the comparison names what differs."""
    try:
        return config_to_dict(config_from_dict(old_config))
    except (LpldError, ValueError, TypeError):
        return old_config


def write_run_record(store: Store, cfg: Config) -> None:
    """run.yaml of a new run: the resolved config and the library versions, written before any stage."""
    record = {"schema_version": RUN_SCHEMA_VERSION, "config": redacted(config_to_dict(cfg)), "versions": library_versions()}
    store.write_text(RUN_RECORD, yaml.safe_dump(record, sort_keys=False))
    log.info("new run at %s", store.root)


def read_run_config(store: Store) -> Config:
    """The config a run was made with, from its run.yaml (in this version's terms)."""
    record = yaml.safe_load(store.read_text(RUN_RECORD))
    return config_from_dict(upgraded(record["config"], int(record.get("schema_version", 1))))
