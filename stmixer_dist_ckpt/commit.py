"""Building and committing a checkpoint directory: one implementation for every writer.

``Checkpointer.save`` (collective) and the offline converters (``.pth`` or
Caffe2 ``.pkl`` -> sharded) all produce the same layout: a fresh
``data-<token>/`` with the DCP files, then ``manifest.json`` written last as the
commit marker, then removal of data directories the manifest no longer names.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

from ._dcp import FileDigest, write_checkpoint_data
from .layout import DATA_DIR_PREFIX
from .manifest import FileRecord, Manifest, write_manifest
from .storage import StorageLocation

__all__ = ["new_data_dir_name", "build_manifest", "contents_of", "remove_unreferenced_data", "write_offline_checkpoint"]

logger = logging.getLogger(__name__)


def new_data_dir_name() -> str:
    """A data directory name that sorts by time and never repeats: ``data-<utc time>-<random>``."""
    return f"{DATA_DIR_PREFIX}{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"


def contents_of(state: Mapping[str, Any], *, rank_states: list[str] | None = None, world_size: int = 1) -> dict[str, Any]:
    """The manifest's ``contents`` record for a DCP state dict laid out as ``Checkpointer`` does."""
    return {
        "model": "model" in state,
        "optimizer": "optimizer" in state,
        "scheduler": "scheduler" in state,
        "extra": sorted(state.get("extra", {})),
        "rank_state": sorted(rank_states or []),
        "rank_state_world_size": world_size if rank_states else 0,
    }


def build_manifest(
    name: str,
    data_dir_name: str,
    digests: Mapping[str, FileDigest],
    *,
    world_size: int,
    layout: str,
    contents: dict[str, Any],
) -> Manifest:
    return Manifest(
        name=name,
        data_dir=data_dir_name,
        files={fname: FileRecord(size=d.size, checksum=d.checksum) for fname, d in sorted(digests.items())},
        world_size=world_size,
        layout=layout,
        contents=contents,
    )


def remove_unreferenced_data(checkpoint_dir: StorageLocation, *, keep: str, log: logging.Logger = logger) -> None:
    """Delete this checkpoint's data directories other than ``keep``; failures are only logged.

    Call it only after the manifest naming ``keep`` is written: the others are
    then the replaced version or leftovers of a save that never committed.
    """
    for entry in checkpoint_dir.listdir():
        if entry.startswith(DATA_DIR_PREFIX) and entry != keep:
            try:
                checkpoint_dir.join(entry).remove(recursive=True)
            except OSError as exc:
                log.warning("could not remove stale data %s: %s", checkpoint_dir.join(entry).url, exc)


def write_offline_checkpoint(
    state: dict[str, Any], checkpoint_dir: StorageLocation, *, contents: dict[str, Any] | None = None
) -> Manifest:
    """Write and commit ``state`` from one process without a process group (converters).

    Args:
        state: the DCP state dict (``{"model": ..., "optimizer": ..., "extra": {...}}``).
        checkpoint_dir: the checkpoint directory; its name is the checkpoint's name.
        contents: the manifest's ``contents``; derived from ``state`` when omitted.
    """
    checkpoint_dir.makedirs()
    data_dir = checkpoint_dir.join(new_data_dir_name())
    digests = write_checkpoint_data(state, data_dir)
    manifest = build_manifest(
        checkpoint_dir.name,
        data_dir.name,
        digests,
        world_size=1,
        layout="single",
        contents=contents if contents is not None else contents_of(state),
    )
    write_manifest(checkpoint_dir, manifest)
    remove_unreferenced_data(checkpoint_dir, keep=data_dir.name)
    return manifest
