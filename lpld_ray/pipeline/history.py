"""The per-epoch training history a model shard keeps beside its weights (history.json), and reading it back."""

from __future__ import annotations

import json
import logging

from lpld_ray.errors import StorageError
from lpld_ray.store.manifest import ShardWriter, read_manifest, read_object
from lpld_ray.store.storage import Store

log = logging.getLogger(__name__)

HISTORY_OBJECT = "history.json"


def put_history(writer: ShardWriter, history: list[dict] | None) -> None:
    """Add ``history.json`` (a JSON list of {epoch, loss, test_top1 when evaluated, seconds}) to a model shard."""
    writer.put(HISTORY_OBJECT, json.dumps(list(history or []), indent=1).encode())


def read_history(store: Store, stage: str, shard: str) -> list[dict]:
    """The history of a committed model shard, checked against its manifest; [] when the shard or its history
    is absent (older shards) or does not verify (logged)."""
    manifest = read_manifest(store, stage, shard)
    if manifest is None or all(e.name != HISTORY_OBJECT for e in manifest.objects):
        return []
    try:
        doc = json.loads(read_object(store, stage, shard, HISTORY_OBJECT, manifest))
    except (StorageError, ValueError) as err:
        log.warning("ignoring the training history of %s/%s: %s", stage, shard, err)
        return []
    if not isinstance(doc, list) or not all(isinstance(r, dict) and "epoch" in r for r in doc):
        log.warning("ignoring the training history of %s/%s: not a list of epochs", stage, shard)
        return []
    return doc
