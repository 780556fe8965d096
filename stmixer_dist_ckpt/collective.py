"""Rank helpers that also work without a process group, and collective failure.

A checkpoint save or load is a sequence of steps that every rank runs. If one
rank raises while the others wait in the next collective, the job hangs until
the process-group timeout (30 minutes by default). :func:`run_collectively`
prevents that: every rank runs its step, the outcome is all-gathered, and if
any rank failed, every rank raises the same :class:`DistributedCheckpointError`
carrying each failed rank's traceback (DCP's ``_DistWrapper.all_reduce`` idea).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from .errors import DistributedCheckpointError

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "barrier",
    "all_gather_object",
    "broadcast_object",
    "run_collectively",
]

T = TypeVar("T")
ProcessGroup = Any  # torch.distributed.ProcessGroup; Any keeps mypy happy without dist internals


def is_distributed(group: ProcessGroup | None = None) -> bool:
    """True when a process group is initialized (and so collectives are required)."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group: ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if is_distributed(group) else 0


def get_world_size(group: ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def barrier(group: ProcessGroup | None = None) -> None:
    if is_distributed(group):
        dist.barrier(group=group)


def all_gather_object(obj: T, group: ProcessGroup | None = None) -> list[T]:
    """Every rank's ``obj``, in rank order; ``[obj]`` without a process group."""
    if not is_distributed(group):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def broadcast_object(obj: T, src: int = 0, group: ProcessGroup | None = None) -> T:
    """``obj`` from rank ``src`` on every rank (``src`` is a rank in ``group``)."""
    if not is_distributed(group):
        return obj
    box: list[Any] = [obj]
    global_src = dist.get_global_rank(group, src) if group is not None else src
    dist.broadcast_object_list(box, src=global_src, group=group)
    return box[0]  # type: ignore[no-any-return]


def run_collectively(step: Callable[[], T], *, what: str, group: ProcessGroup | None = None) -> T:
    """Run ``step`` on every rank; if any rank fails, raise the same error on all.

    Every rank must call this with the same ``what`` at the same point.

    Args:
        step: the local work; its return value is returned on success.
        what: a short description for the error message ("writing shards").
        group: the process group; ``None`` means the default group.

    Raises:
        DistributedCheckpointError: on every rank, when ``step`` raised on any rank.
        Exception: without a process group, whatever ``step`` raised, unchanged.
    """
    if not is_distributed(group):
        return step()
    result: T | None = None
    failure: str | None = None
    local_exc: BaseException | None = None
    try:
        result = step()
    except Exception as exc:
        local_exc = exc
        failure = "".join(traceback.format_exception(exc))
    outcomes = all_gather_object(failure, group)
    failures = {rank: text for rank, text in enumerate(outcomes) if text is not None}
    if failures:
        ranks = ", ".join(str(rank) for rank in sorted(failures))
        error = DistributedCheckpointError(f"{what} failed on rank(s) {ranks}", failures)
        raise error from local_exc
    return result  # type: ignore[return-value]
