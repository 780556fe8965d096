"""Asynchronous saves: ``save()`` returns after a snapshot is arranged; write and commit run behind.

Faults users hit with async checkpointing elsewhere, and what prevents each here:

* *a "latest" pointer ahead of durable data*: the tag is written by the same
  background step that commits, after every rank's data and the manifest;
* *a recorded iteration newer than the saved state*: extras are serialized in
  ``save()`` itself, and tensors come from the :class:`~.snapshot.Snapshot`;
* *deadlocks between the background save and training collectives on one
  process group*: the background work uses its own gloo group;
* *memory growth across saves*: staging buffers are reused;
* *lost errors*: a background failure is raised by the next ``save()``,
  ``wait()`` or ``load()`` on every rank (the write and commit are collective
  steps that already agree on failure).

At most one save is in flight: the next one waits for it first.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401  (its exit hook must be registered before ours; see _register_exit_wait)
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import collective
from .retention import RetentionPolicy
from .sharded_save import SaveJob, write_and_commit
from .snapshot import Snapshot, StagingArea

__all__ = ["AsyncSaver"]

_logger = logging.getLogger(__name__)


class AsyncSaver:
    """Runs one checkpoint write at a time on a background thread.

    Args:
        optimizer: its ``step()`` waits for the snapshot copy; without one,
            the copy happens before ``save()`` returns.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None) -> None:
        self._staging = StagingArea()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._snapshot: Snapshot | None = None
        self._description = ""
        self._group: Any | None = None
        self._group_ready = False
        self._hook_handle: Any | None = None
        self._optimizer = optimizer
        if optimizer is not None:
            self._hook_handle = optimizer.register_step_pre_hook(self._before_optimizer_step)
        _register_exit_wait(weakref.ref(self))

    def background_group(self) -> Any | None:
        """A dedicated gloo group (created on first use; collective, so every rank calls this in save())."""
        if not self._group_ready:
            if collective.is_distributed():
                import torch.distributed as dist

                self._group = dist.new_group(backend="gloo")
            self._group_ready = True
        return self._group

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        snapshot = self._snapshot
        if snapshot is not None:
            snapshot.wait()

    def save(self, job: SaveJob, model: nn.Module, *, retention: RetentionPolicy, logger: logging.Logger) -> None:
        """Snapshot ``job``'s state and write and commit it in the background (every rank calls this).

        Only parameters and the optimizer's per-parameter state change in
        ``optimizer.step()`` alone, so only they are copied later; everything
        else is copied now: buffers (BatchNorm statistics change in forward) and
        ``param_groups`` (a scheduler may set a tensor lr in place before the
        next step).
        """
        group = self.background_group()
        parameter_names = {name.removeprefix("module.") for name, _ in model.named_parameters()}

        def copy_now(path: tuple[Any, ...]) -> bool:
            if path[0] == "model":
                return path[1] not in parameter_names
            return not (path[0] == "optimizer" and path[1] == "state")

        def write(state: dict[str, Any], staging_failure: BaseException | None) -> None:
            def check() -> None:
                if staging_failure is not None:
                    raise staging_failure

            collective.run_collectively(check, what=f"snapshotting state for {job.checkpoint_dir.url}", group=group)
            job.state = state
            write_and_commit(job, group, retention=retention, logger=logger)

        self.submit(job.state, copy_now, write, description=job.checkpoint_dir.url)

    def submit(
        self,
        state: dict[str, Any],
        copy_now: Callable[[tuple[Any, ...]], bool],
        write: Callable[[dict[str, Any], BaseException | None], Any],
        description: str = "",
    ) -> None:
        """Snapshot ``state`` and run ``write(snapshot_state, staging_failure)`` in the background.

        ``write`` runs even when staging failed on this rank (with the failure
        passed in), because it is collective: it must agree with the other
        ranks on the failure instead of leaving them blocked.

        Call :meth:`wait` first; this does not wait itself so the caller decides
        where a previous failure surfaces. ``description`` (the checkpoint's
        location) names the save in the report of a failure at interpreter exit.
        """
        self._description = description
        snapshot = Snapshot(
            state,
            self._staging,
            copy_now=copy_now if self._optimizer is not None else (lambda p: True),
            description=description or "the checkpoint",
        )
        self._snapshot = snapshot

        def run() -> None:
            failure: BaseException | None = None
            try:
                snapshot.stage()
            except BaseException as exc:
                failure = exc
            try:
                write(snapshot.state, failure)
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=run, name="stmixer-async-save", daemon=True)
        self._thread.start()

    def wait_for_snapshot(self) -> None:
        """Block until the in-flight save no longer reads live tensors."""
        if self._snapshot is not None:
            self._snapshot.wait()

    def wait(self) -> None:
        """Block until the in-flight save is committed; raise its error if it failed."""
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None
        self._snapshot = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def staging_bytes(self) -> int:
        return self._staging.nbytes


def _register_exit_wait(ref: weakref.ReferenceType[AsyncSaver]) -> None:
    """Wait for the save in flight at interpreter exit, before thread pools stop taking work.

    ``atexit`` runs too late: by then ``concurrent.futures`` has already refused
    new work (its hook runs when non-daemon threads are joined), and the
    background save's integrity scan and retention use thread pools. Threading's
    own exit hooks run last-registered first, so registering after
    ``concurrent.futures.thread`` was imported puts this wait ahead of that
    refusal. ``threading._register_atexit`` is private (Python >= 3.9); where it
    is missing, fall back to ``atexit``.
    """
    register = getattr(threading, "_register_atexit", None)
    if register is None:
        atexit.register(_wait_at_exit, ref)
        return
    try:
        register(_wait_at_exit, ref)
    except RuntimeError:  # created during interpreter shutdown
        atexit.register(_wait_at_exit, ref)


def _wait_at_exit(ref: weakref.ReferenceType[AsyncSaver]) -> None:
    """Let a save still in flight finish before the interpreter tears down; report its failure.

    At exit no later ``save()`` or ``wait()`` is left to raise a background
    failure, so it is logged instead: a silently missing last checkpoint is the
    worst way to find out after a preemption.
    """
    saver = ref()
    if saver is None or saver._thread is None:
        return
    try:
        saver.wait()
    except BaseException as exc:
        _logger.error(
            "the asynchronous save of %s, still in flight at interpreter exit, failed; that checkpoint "
            "was not committed and the tag still names the previous one: %s",
            saver._description or "a checkpoint",
            exc,
        )
