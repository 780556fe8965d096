"""Which checkpoint a load reads: the path given, a run directory's tag, or ``save_dir``'s tag.

Decided on rank 0 alone and broadcast, so every rank loads the same
checkpoint even while another job moves the tag. A single file is only
classified on rank 0 (it is read there and broadcast, so it may live on rank
0's node only); a sharded checkpoint is opened on every rank, because each
reads its own slices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import collective
from .layout import (
    CheckpointKind,
    ResolvedCheckpoint,
    choose_resume_checkpoint,
    is_run_directory,
    resolve_checkpoint,
)
from .storage import StorageLocation, resolve_location

__all__ = ["choose_checkpoint_to_load"]


def choose_checkpoint_to_load(
    f: str | None,
    save_dir: StorageLocation | None,
    storage_options: Mapping[str, Any],
    group: Any | None,
) -> ResolvedCheckpoint | None:
    """The checkpoint ``Checkpointer.load(f)`` reads, or ``None`` to start from scratch (collective).

    Args:
        f: a checkpoint path or URL, or a run directory (its tag is followed);
            falsy means resume from ``save_dir``'s tag.
        save_dir: the checkpointer's run directory, if it has one.
        storage_options: fsspec options for ``f``.
        group: the process group every rank of the load is in.

    Raises:
        CheckpointNotFoundError, IncompleteCheckpointError: the chosen path is
            missing or was never committed; raised on every rank.
    """
    rank = collective.get_rank(group)
    chosen = collective.broadcast_object(
        collective.run_collectively(
            lambda: _choose_on_rank0(f, save_dir, storage_options) if rank == 0 else None,
            what="choosing the checkpoint",
            group=group,
        ),
        0,
        group,
    )
    if not chosen:
        return None
    location = resolve_location(chosen, storage_options)
    kind = collective.broadcast_object(
        collective.run_collectively(
            lambda: resolve_checkpoint(location).kind if rank == 0 else None, what=f"opening {location.url}", group=group
        ),
        0,
        group,
    )
    if kind is CheckpointKind.FILE:
        return ResolvedCheckpoint(CheckpointKind.FILE, location, None, None)
    resolved: ResolvedCheckpoint = collective.run_collectively(
        lambda: resolve_checkpoint(location), what=f"opening {location.url}", group=group
    )
    return resolved


def _choose_on_rank0(f: str | None, save_dir: StorageLocation | None, storage_options: Mapping[str, Any]) -> str:
    if f:
        given = resolve_location(str(f), storage_options)
        if is_run_directory(given):  # a tag but no checkpoint of its own: resume from it
            target = choose_resume_checkpoint(given)
            return target.url if target is not None else ""
        return str(f)
    if save_dir is None:
        return ""
    target = choose_resume_checkpoint(save_dir)  # skips a broken tag target, with a warning
    return target.url if target is not None else ""
