"""Export a finished run for use without lpld_ray: an ImageFolder tree, one Parquet label table and its README."""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from lpld_ray.config import Config, StorageConfig
from lpld_ray.config_io import config_from_dict
from lpld_ray.data.base import image_spec
from lpld_ray.data.datasets import FASHION_CLASSES
from lpld_ray.data.folder import folder_classes, open_folder
from lpld_ray.data.seeded import expanded
from lpld_ray.errors import LpldError, StorageError
from lpld_ray.pipeline.export_readme import FILE_COLUMN, readme_text
from lpld_ray.pipeline.shards import plan_class_shards
from lpld_ray.store.label_table import NUM_CLASSES_KEY, check_label_schema, read_label_table
from lpld_ray.store.layout import (
    IMAGES_STAGE,
    LABELS_OBJECT,
    LABELS_STAGE,
    RUN_RECORD,
    image_id_from_name,
)
from lpld_ray.store.manifest import Manifest, list_shards, read_manifest, read_object
from lpld_ray.store.storage import Store, storage_options
from lpld_ray.store.uris import check_uri

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
LABELS_FILE = "labels.parquet"
README_FILE = "README.md"
READ_THREADS = 8
_IMAGE_NAME = re.compile(r"^(\d{5})_(\d{4})\.(png|jpg)$")


class ExportError(LpldError):
    """The run cannot be exported, or not to that folder."""


@dataclass(frozen=True)
class RunContents:
    """What an export reads: the run's config and root, its class count and every class shard's two manifests."""

    store: Store
    cfg: Config
    num_classes: int
    images: dict[str, Manifest]  # shard name -> manifest, in shard order
    labels: dict[str, Manifest]


@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote."""

    dest: str
    images: int
    records: int
    classes: int


# ----------------------------------------------------------------------------- checks, before anything is written


def check_destination(dest: str) -> Path:
    """The local folder to export to: new, or an existing empty folder; ExportError otherwise."""
    if not dest or not dest.strip():
        raise ExportError("--to is empty: give a new or empty local folder")
    if "://" in dest and not dest.lower().startswith("file://"):
        raise ExportError(f"--to '{dest}' is not a local folder: export writes local files (copy them on afterwards)")
    target = Path(dest[len("file://"):] if dest.lower().startswith("file://") else dest).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ExportError(f"--to '{dest}' exists and is not a folder: give a new or empty folder")
    if target.is_dir() and any(target.iterdir()):
        raise ExportError(f"--to '{dest}' exists and is not empty: give a new or empty folder (nothing was written)")
    return target


def open_run(run_dir: str) -> tuple[Store, Config]:
    """The run's Store (object storage through the AWS_* environment) and the config its run.yaml records."""
    check_uri(run_dir, "--run-dir")
    root = run_dir if "://" in run_dir else os.path.abspath(run_dir)
    store = Store(root, storage_options(StorageConfig(), root))
    store.check_reachable()
    if not store.exists(RUN_RECORD):
        raise ExportError(f"'{store.root}' holds no run (no {RUN_RECORD}): give the --run-dir of a finished run")
    try:
        record = yaml.safe_load(store.read_text(RUN_RECORD))
        return store, config_from_dict(record["config"])
    except (yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError):
        raise ExportError(f"'{store.uri(RUN_RECORD)}' is not a valid run record: give the --run-dir of a finished "
                          "run") from None


def label_class_count(store: Store, shard: str) -> int:
    """The class count a labels shard's Parquet footer records (its schema is checked)."""
    with store.open(f"{LABELS_STAGE}/{shard}/{LABELS_OBJECT}") as handle:
        try:
            schema = pq.read_schema(handle)
        except (pa.ArrowException, OSError) as err:
            raise StorageError(f"labels/{shard} is not a readable Parquet table: {str(err).splitlines()[0]}") from None
    check_label_schema(schema, f"labels shard '{shard}'")
    return int(schema.metadata[NUM_CLASSES_KEY])


def finished_run(store: Store, cfg: Config) -> RunContents:
    """Every class shard's images and labels manifests; ExportError naming the first missing one (objects are
    checked against them as they are copied)."""
    committed = list_shards(store, LABELS_STAGE)
    if not committed:
        raise ExportError(f"run '{store.root}' is not finished: it has no labels shard; finish it with "
                          f"jobs/distill.py --run-dir {store.root}")
    num_classes = label_class_count(store, committed[0])
    names = [s.name for s in plan_class_shards(num_classes, cfg.runner.class_shard_size)]
    found: dict[str, dict[str, Manifest]] = {}
    for stage in (IMAGES_STAGE, LABELS_STAGE):
        manifests = {n: read_manifest(store, stage, n) for n in names}
        missing = [n for n, m in manifests.items() if m is None]
        if missing:
            raise ExportError(f"run '{store.root}' is not finished: {stage}/{missing[0]} has no manifest "
                              f"({len(missing)} of {len(names)} shards missing); finish it with jobs/distill.py "
                              f"--run-dir {store.root}")
        found[stage] = manifests
    return RunContents(store, cfg, num_classes, found[IMAGES_STAGE], found[LABELS_STAGE])


# ----------------------------------------------------------------------------- class folder names


def known_class_names(cfg: Config) -> list[str] | None:
    """The dataset's class names when known: Fashion-MNIST's, the digits, an ImageFolder tree's folder names."""
    if cfg.data.name == "fashion_mnist":
        return list(FASHION_CLASSES)
    if cfg.data.name == "digits":
        return [str(d) for d in range(10)]
    settings = StorageConfig(endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region)  # no credentials
    try:
        return folder_classes(open_folder(cfg.data.root, storage_options(settings, cfg.data.root)))
    except (LpldError, OSError) as err:
        log.warning("class names of data.root '%s' are not readable (%s): folders are named class_NNNNN",
                    cfg.data.root, err)
        return None


def safe_folder_name(name: str) -> str:
    """``name`` usable as one folder name: characters other than letters, digits, space and ._+- become '_'."""
    return re.sub(r"[^\w .+-]", "_", name).strip(" .")


def class_folders(names: list[str] | None, num_classes: int) -> list[str]:
    """One distinct folder name per class id: its sanitized name, else ``class_NNNNN``."""
    folders: list[str] = []
    for c in range(num_classes):
        folder = safe_folder_name(names[c]) if names is not None and c < len(names) else ""
        if not folder or folder in folders:
            folder = f"class_{c:05d}"
        folders.append(folder)
    return folders


# ----------------------------------------------------------------------------- writing


def copy_images(run: RunContents, folders: list[str], images_dir: Path) -> dict[int, str]:
    """Every image object, byte for byte and checked against its manifest, to ``<folder>/<name>``; returns
    image id -> that path (relative to ``images_dir``)."""
    ipc = run.cfg.recover.ipc
    files: dict[int, str] = {}
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for shard, manifest in run.images.items():
            entries = sorted(manifest.objects, key=lambda e: e.name)
            for entry in entries:
                match = _IMAGE_NAME.match(entry.name)
                if match is None or int(match.group(1)) >= run.num_classes:
                    raise StorageError(f"images/{shard} holds '{entry.name}', which is not an image object of "
                                       f"this run (CCCCC_IIII.png of a class below {run.num_classes})")
            read = pool.map(partial(read_object, run.store, IMAGES_STAGE, shard, manifest=manifest),
                            [e.name for e in entries])
            for entry, data in zip(entries, read):
                rel = f"{folders[int(entry.name[:5])]}/{entry.name}"
                (images_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                (images_dir / rel).write_bytes(data)
                files[image_id_from_name(entry.name, ipc)] = rel
    return files


def with_files(table: pa.Table, files: dict[int, str], shard: str) -> pa.Table:
    """The shard's records by (image_id, view_id) with each record's image file; StorageError when a record's
    image or CutMix partner is not an image of the run."""
    table = table.sort_by([("image_id", "ascending"), ("view_id", "ascending")])
    ids = table.column("image_id").to_numpy()
    partners = table.column("partner_id").to_numpy()[table.column("mix").to_numpy() == 1]
    strays = [int(i) for i in np.concatenate([ids, partners]) if int(i) not in files]
    if strays:
        raise StorageError(f"labels/{shard} has a record of image {strays[0]}, which is not in the images stage: "
                           "re-run the relabel stage")
    return table.append_column(pa.field(FILE_COLUMN, pa.string(), nullable=False),
                               pa.array([files[int(i)] for i in ids], pa.string()))


def write_labels(run: RunContents, files: dict[int, str], path: Path) -> tuple[int, pa.Schema]:
    """Every labels shard (checked against its manifest), in image order, as one Parquet file; (records, schema)."""
    writer: pq.ParquetWriter | None = None
    records, labelled = 0, set()
    try:
        for shard, manifest in run.labels.items():
            stored = read_label_table(read_object(run.store, LABELS_STAGE, shard, LABELS_OBJECT, manifest))
            table = with_files(expanded(stored), files, shard)  # a seeded pool's views drawn again
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="zstd")
            elif not table.schema.equals(writer.schema):
                raise StorageError(f"labels/{shard} has another schema than labels/{next(iter(run.labels))}: "
                                   "re-run the relabel stage")
            writer.write_table(table)
            records += table.num_rows
            labelled.update(table.column("image_id").to_numpy().tolist())
    finally:
        if writer is not None:
            writer.close()
    unlabelled = sorted(set(files) - labelled)
    if unlabelled:
        raise StorageError(f"image {unlabelled[0]} ({files[unlabelled[0]]}) has no label record: re-run the relabel "
                           "stage")
    return records, writer.schema


def publish(staging: Path, target: Path) -> None:
    """Move the finished export into place (over an empty folder, in one rename)."""
    try:
        os.replace(staging, target)
    except OSError as err:
        raise ExportError(f"cannot move the export into '{target}' ({err.strerror}): it must be new or empty") from None


def export_run(run_dir: str, dest: str) -> ExportSummary:
    """Export the finished run at ``run_dir`` into the new or empty local folder ``dest``: images/<class>/*.png,
    labels.parquet and README.md. Everything is written to a folder beside ``dest`` first and moved into place at
    the end, so a refused or failed export leaves ``dest`` as it was."""
    target = check_destination(dest)
    store, cfg = open_run(run_dir)
    run = finished_run(store, cfg)
    names = known_class_names(cfg)
    folders = class_folders(names, run.num_classes)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.export-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        files = copy_images(run, folders, staging / IMAGES_DIR)
        records, schema = write_labels(run, files, staging / LABELS_FILE)
        class_names = [names[c] if names is not None and c < len(names) else folders[c] for c in range(run.num_classes)]
        text = readme_text(cfg, image_spec(cfg.data), store.root, schema, list(zip(class_names, folders)),
                           len(files), records)
        (staging / README_FILE).write_text(text, encoding="utf-8")
        publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported %d images of %d classes and %d label records from %s to %s", len(files), run.num_classes,
             records, store.root, target)
    return ExportSummary(str(target), len(files), records, run.num_classes)
