"""The run's ``run.yaml``: resolved config and versions, written first; a later run must match it to resume."""

from __future__ import annotations

import logging
import platform
from importlib import metadata

import yaml

from lpld_ray import __version__
from lpld_ray.config import (
    Config,
    config_from_dict,
    config_to_dict,
    flatten,
    redacted,
    result_key_diff,
)
from lpld_ray.errors import LpldError
from lpld_ray.store.layout import RUN_RECORD
from lpld_ray.store.storage import Store

log = logging.getLogger(__name__)

RUN_SCHEMA_VERSION = 1


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
    try:
        old = yaml.safe_load(store.read_text(RUN_RECORD))
        version, old_config = old["schema_version"], old["config"]
    except (yaml.YAMLError, KeyError, TypeError, UnicodeDecodeError):
        raise LpldError(f"'{store.uri(RUN_RECORD)}' is not a valid run record: use a new --run-dir") from None
    if not isinstance(version, int) or version > RUN_SCHEMA_VERSION:
        raise LpldError(
            f"'{store.uri(RUN_RECORD)}' has schema_version {version!r}; this lpld_ray reads up to {RUN_SCHEMA_VERSION}: upgrade lpld_ray or use a new --run-dir"
        )
    stored, asked = with_defaults(old_config), config_to_dict(cfg)
    diff = result_key_diff(stored, asked)
    if diff:
        was, now = flatten(stored), flatten(asked)
        changes = ", ".join(f"{key} (was {was.get(key)!r}, now {now.get(key)!r})" for key in diff)
        raise LpldError(f"run directory '{store.root}' holds a run with a different config in {changes}: use the "
                        "same config to resume, or a new --run-dir, or --force-new to delete that run's outputs "
                        "and start over")
    log.info("resuming the run at %s", store.root)
    return True


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
    """The config a run was made with, from its run.yaml."""
    return config_from_dict(yaml.safe_load(store.read_text(RUN_RECORD))["config"])
