"""The write-and-commit half of a sharded save, shared by synchronous and asynchronous saves.

:class:`~stmixer_dist_ckpt.checkpointer.Checkpointer` captures the state on the
caller's thread (:class:`SaveJob`); :func:`write_and_commit` then writes every
rank's shards and commits on rank 0. A synchronous save calls it directly; an
asynchronous one calls it from a background thread over a dedicated process
group, which is why nothing here touches the checkpointer or the live model.

The order is what makes a save crash-safe: data files (fsynced, hashed while
written) → every rank reports its digests → rank 0 checks it can see every
file → ``manifest.json`` (the commit) → ``last_checkpoint`` → retention.
A failure before the manifest leaves the previous checkpoint and tag untouched.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import _faults, collective
from ._dcp import FileDigest, describe_dcp_failures, write_checkpoint_data
from .commit import build_manifest
from .errors import CheckpointError, DistributedCheckpointError, StorageError
from .layout import DATA_DIR_PREFIX, write_tag
from .manifest import write_manifest
from .model_state import capture_model_state, capture_optimizer_state_for_save
from .rank_state import Stateful, rank_state_key
from .retention import RetentionPolicy, clean_up_after_commit, discard_failed_write
from .storage import StorageLocation

__all__ = ["SaveJob", "capture_save_state", "describe_contents", "serialize_object", "write_and_commit"]


@dataclass
class SaveJob:
    """One save between capture and commit: what the write and commit steps need."""

    name: str
    save_dir: StorageLocation
    checkpoint_dir: StorageLocation
    data_dir: StorageLocation
    layout: str
    state: dict[str, Any]
    contents: dict[str, Any]
    rank: int
    world_size: int
    started: float


def serialize_object(value: Any) -> bytes:
    """``torch.save`` bytes of a non-tensor object (scheduler state, extras, per-rank state).

    Objects are stored pre-serialized so DCP treats each as one opaque item
    instead of flattening user dicts into keys; loads open them through the
    restricted unpickler.
    """
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def capture_save_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    rank_states: Mapping[str, Stateful],
    extra: Mapping[str, Any],
    rank: int,
) -> dict[str, Any]:
    """This rank's part of a checkpoint: its shards of model and optimizer, plus objects.

    Scheduler state and extras are the same on every rank and stored once,
    from rank 0; per-rank state is stored under this rank's key.
    """
    state: dict[str, Any] = {"model": capture_model_state(model)}
    if optimizer is not None:
        state["optimizer"] = capture_optimizer_state_for_save(model, optimizer)
    if rank == 0:
        if scheduler is not None:
            state["scheduler"] = serialize_object(scheduler.state_dict())
        state["extra"] = {key: serialize_object(value) for key, value in extra.items()}
    if rank_states:
        snapshot = {name: obj.state_dict() for name, obj in rank_states.items()}
        state["rank_state"] = {rank_state_key(rank): serialize_object(snapshot)}
    return state


def describe_contents(
    *, optimizer: bool, scheduler: bool, extra: Mapping[str, Any], rank_states: Mapping[str, Stateful], world_size: int
) -> dict[str, Any]:
    """The manifest's ``contents``: what a checkpoint holds, readable without opening its data."""
    return {
        "model": True,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "extra": sorted(extra),
        "rank_state": sorted(rank_states) if rank_states else [],
        "rank_state_world_size": world_size if rank_states else 0,
    }


def write_and_commit(
    job: SaveJob, group: Any | None, *, retention: RetentionPolicy, logger: logging.Logger
) -> str:
    """Write every rank's shards, then commit on rank 0 (collective over ``group``); returns the checkpoint URL.

    Raises:
        DistributedCheckpointError: a rank failed to write or rank 0 failed to
            commit; raised on every rank, with every failed rank's traceback.
    """
    _require_process_group(job)
    try:
        digests = write_checkpoint_data(job.state, job.data_dir, group=group, replicated_from_rank0=job.layout == "fsdp2")
    except BaseException as exc:  # DCP's CheckpointException derives from BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        if job.rank == 0:  # DCP gathered every rank's write outcome: none is still writing
            discard_failed_write(job.checkpoint_dir, job.data_dir, logger)
        raise DistributedCheckpointError(
            f"writing {job.data_dir.url} failed; the previous checkpoint and the tag are unchanged",
            describe_dcp_failures(exc, job.rank),
        ) from exc
    _faults.hit("save.after_write")
    all_digests = collective.all_gather_object(digests, group)
    collective.run_collectively(
        lambda: _commit(job, all_digests) if job.rank == 0 else None,
        what=f"committing {job.checkpoint_dir.url}",
        group=group,
    )
    if job.rank == 0:
        # After the commit's collective: every rank is done with this save, so nothing
        # removed here can still be in use (see stmixer_dist_ckpt.retention).
        try:
            clean_up_after_commit(
                job.save_dir,
                committed=job.name,
                token=job.data_dir.name[len(DATA_DIR_PREFIX) :],
                policy=retention,
                logger=logger,
            )
        except Exception:
            # The checkpoint is committed and tagged; a cleanup failure here must not turn it
            # into a failed save (raised on rank 0 alone, at that). The next save retries.
            logger.exception("cleaning up %s after committing %s failed", job.save_dir.url, job.name)
        total = sum(d.size for rank_digests in all_digests for d in rank_digests.values())
        logger.info(
            "Saved %s: %.1f MB in %.2f s from %d rank(s)",
            job.checkpoint_dir.url,
            total / 1e6,
            time.perf_counter() - job.started,
            job.world_size,
        )
    return job.checkpoint_dir.url


def _commit(job: SaveJob, all_digests: list[dict[str, FileDigest]]) -> None:
    """On rank 0, after every rank's data is durable: manifest (the commit), then the tag."""
    merged: dict[str, FileDigest] = {}
    for rank_digests in all_digests:
        merged.update(rank_digests)
    unseen = sorted(set(merged) - set(job.data_dir.listdir()))
    if unseen:
        raise StorageError(
            f"rank 0 cannot see {unseen} in {job.data_dir.url}, written by other ranks: save_dir must be "
            "one storage location shared by every node (a shared filesystem or an object store)"
        )
    manifest = build_manifest(
        job.name, job.data_dir.name, merged, world_size=job.world_size, layout=job.layout, contents=job.contents
    )
    _faults.hit("save.before_commit")
    _require_process_group(job)
    write_manifest(job.checkpoint_dir, manifest)
    _faults.hit("save.after_commit")
    write_tag(job.save_dir, job.name)
    _faults.hit("save.after_tag")


def _require_process_group(job: SaveJob) -> None:
    """Refuse to go on alone when a multi-rank save lost its process group.

    Without a process group, DCP and our collectives fall back to single-process
    mode, where every rank believes it is rank 0: each would write its own
    ``.metadata`` and manifest for a checkpoint that holds only its shard. That
    happens when ``dist.destroy_process_group()`` runs while an asynchronous save
    is in flight; checked before the write and again right before the commit.
    """
    if job.world_size > 1 and not collective.is_distributed():
        raise CheckpointError(
            f"the process group was destroyed while saving {job.checkpoint_dir.url} from {job.world_size} ranks; "
            "that checkpoint was not committed. Call checkpointer.wait() before dist.destroy_process_group()."
        )
