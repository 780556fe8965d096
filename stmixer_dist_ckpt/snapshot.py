"""Consistent snapshots of training state for asynchronous saves, without a full copy up front.

A checkpoint must hold the state as it was when ``save()`` was called, yet
training should continue at once. Copying everything before returning (what
``dcp.async_save`` does) stalls for a full memory copy. We copy less, later:

* tensors that change during forward (buffers such as BatchNorm statistics)
  are copied immediately: they are small;
* parameters and optimizer state change only in ``optimizer.step()``, so they
  are copied by a background thread while the next forward/backward runs, and
  a step pre-hook on the optimizer waits for that copy if it is not done yet.

Each tensor's version counters (a DTensor's own and its local shard's: an
in-place op on a DTensor bumps only the former) are recorded at ``save()``
and checked after its copy: if anything modified a tensor in place before it
was copied (code outside the optimizer), the snapshot is declared inconsistent
and the save fails loudly instead of writing a mix of old and new values.

The check is a safety net, not a lock. It cannot see a change that is still
running while its tensor is copied (autograd bumps the counter when the op
ends), nor a change made through ``tensor.data``, which has a counter of its
own. Code that modifies parameters outside the optimizer must call
``Checkpointer.wait_for_snapshot()`` first; that is always safe.

Staging buffers are kept and reused across saves (same key, shape and dtype),
so repeated saves do not grow memory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .errors import CheckpointError

__all__ = ["SnapshotModifiedError", "StagingArea", "Snapshot"]


class SnapshotModifiedError(CheckpointError):
    """A tensor was modified in place after ``save()`` and before it was copied."""


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def _versions(tensor: torch.Tensor) -> tuple[int, int]:
    """The counters an in-place change moves: a DTensor's own (``p.add_()`` on the DTensor)
    and its local shard's (a change made on ``p._local_tensor`` or ``p.to_local()``)."""
    return tensor._version, _local(tensor)._version


def _walk(tree: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        yield path, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _walk(value, (*path, key))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _walk(value, (*path, index))


def _replace(tree: Any, path: tuple[Any, ...], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _copy_structure(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {key: _copy_structure(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_copy_structure(value) for value in tree]
    return tree


class StagingArea:
    """Reusable CPU buffers, one per state key; the memory an async save keeps between saves."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    def copy(self, path: tuple[Any, ...], source: torch.Tensor) -> torch.Tensor:
        local = _local(source).detach()
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != local.shape or buffer.dtype != local.dtype:
            buffer = torch.empty(local.shape, dtype=local.dtype, device="cpu", pin_memory=local.is_cuda)
            self._buffers[path] = buffer
        buffer.copy_(local, non_blocking=local.is_cuda)
        if isinstance(source, DTensor):
            return DTensor.from_local(
                buffer, source.device_mesh, source.placements, run_check=False, shape=source.shape, stride=source.stride()
            )
        return buffer

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


class Snapshot:
    """A state dict whose tensors are being copied in the background.

    Args:
        state: the captured state dict (tensors share storage with the live model).
        staging: where copies go.
        copy_now: predicate on a key path: copy these tensors before returning
            (those that change outside ``optimizer.step()``).
    """

    def __init__(
        self,
        state: dict[str, Any],
        staging: StagingArea,
        copy_now: Callable[[tuple[Any, ...]], bool],
        description: str = "the checkpoint",
    ) -> None:
        self.state = _copy_structure(state)
        self._staging = staging
        self._description = description
        self._pending: list[tuple[tuple[Any, ...], torch.Tensor, tuple[int, int]]] = []
        for path, tensor in list(_walk(self.state)):
            if copy_now(path):
                _replace(self.state, path, staging.copy(path, tensor))
            else:
                self._pending.append((path, tensor, _versions(tensor)))
        self._done = threading.Event()
        self._error: BaseException | None = None
        if not self._pending:
            self._done.set()

    def stage(self) -> None:
        """Copy the deferred tensors (call on the background thread), checking nothing changed first."""
        try:
            modified = []
            for path, tensor, version in self._pending:
                copied = self._staging.copy(path, tensor)
                if _versions(tensor) != version:
                    modified.append(".".join(str(p) for p in path))
                _replace(self.state, path, copied)
            if modified:
                raise SnapshotModifiedError(
                    f"{len(modified)} tensor(s) were modified in place after save() returned and before they "
                    f"were copied, e.g. {modified[:3]}; {self._description} was not written. Change parameters "
                    "and optimizer state only through the optimizer passed to the Checkpointer, or call "
                    "checkpointer.wait_for_snapshot() before modifying them any other way."
                )
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._pending = []
            self._done.set()

    def wait(self) -> None:
        """Block until every tensor is copied (the optimizer step pre-hook calls this)."""
        self._done.wait()

    @property
    def staged(self) -> bool:
        return self._done.is_set()
