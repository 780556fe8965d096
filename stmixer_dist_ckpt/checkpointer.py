"""The Checkpointer: the STMixer/AlphAction API, saving sharded checkpoints with DCP.

Training scripts written for maskrcnn-benchmark descendants keep working
unchanged::

    checkpointer = Checkpointer(model, optimizer, scheduler, cfg.OUTPUT_DIR, get_rank() == 0)
    extra = checkpointer.load(cfg.MODEL.WEIGHT)
    ...
    checkpointer.save(f"model_{iteration:07d}", iteration=iteration, person_pool=pool)

but ``save`` is now collective: every rank writes its own shards, and a load
works on any world size and parallelism. The differences from upstream are
listed in ``docs/migration.md``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import _faults, collective
from .async_save import AsyncSaver
from .commit import new_data_dir_name
from .integrity import VerifyMode, verify_for_load
from .layout import (
    CheckpointKind,
    read_tag,
    resolve_tag,
    validate_checkpoint_name,
    write_tag,
)
from .load_result import LoadResult
from .load_source import choose_checkpoint_to_load
from .memory_pool import MemoryPool
from .model_state import (
    model_layout,
    sync_ddp_buffers,
)
from .rank_state import RankStatePolicy, Stateful
from .retention import RetentionPolicy, make_policy
from .scheduler_state import move_scheduler_to
from .sharded_load import ShardedReader
from .sharded_save import SaveJob, capture_save_state, describe_contents, write_and_commit
from .single_file import apply_single_file_checkpoint, load_single_file
from .storage import StorageLocation, resolve_location

__all__ = ["Checkpointer", "DEFAULT_HEAD_PREFIXES"]


#: Model key prefixes treated as the classification head by ``no_head``:
#: AlphAction's ``roi_heads.`` and STMixer's ``stm_head.``.
DEFAULT_HEAD_PREFIXES: tuple[str, ...] = ("roi_heads.", "stm_head.")

_RESERVED_EXTRA_NAMES = frozenset({"model", "optimizer", "scheduler"})


class Checkpointer:
    """Saves and loads model, optimizer, scheduler and extras as sharded checkpoints.

    Args:
        model: the model; plain, DDP-wrapped or FSDP2 (``fully_shard``).
        optimizer: saved and restored with parameter-name keys, so it reshards.
        scheduler: an LR scheduler (anything with ``state_dict``/``load_state_dict``).
        save_dir: run directory, local path or fsspec URL (``s3://bucket/run``).
            ``""`` disables saving, as upstream.
        save_to_disk: whether this rank wants checkpoints written. The legacy
            ``get_rank() == 0`` works: if any rank says yes, all ranks write
            their shards. ``None``/``False`` on every rank means no write.
        logger: where messages go; defaults to this module's logger.
        storage_options: fsspec options for ``save_dir`` and paths passed to
            ``load`` (S3 ``endpoint_url``, credentials, ...).
        head_prefixes: model key prefixes that ``no_head`` leaves out.
        rank_states: per-rank objects (e.g. ``{"rng": RNGState()}``) saved under
            their rank and restored to the same rank.
        rank_state_policy: what to do with per-rank state on another world size.
        process_group: the group to save/load over; default: the default group.
        allow_unsafe_pickle: load pickled objects without the allow list; only
            for checkpoints you trust fully (see ``docs/security.md``).
        async_save: ``save()`` returns once a consistent snapshot is arranged;
            writing, commit and tag happen in the background (see
            :mod:`stmixer_dist_ckpt.async_save`). Call :meth:`wait` before
            destroying the process group.
        keep_last: keep only the K most recently committed checkpoints;
            shorthand for ``retention=KeepLast(K)``.
        retention: which checkpoints survive a save (:mod:`stmixer_dist_ckpt.retention`);
            default keeps all. The tagged checkpoint and ``*_final`` are never deleted.

    Example:
        >>> import torch
        >>> from stmixer_dist_ckpt import Checkpointer
        >>> model = torch.nn.Linear(4, 2)
        >>> ckpt = Checkpointer(model, save_dir=str(tmp), save_to_disk=True)  # doctest: +SKIP
        >>> ckpt.save("model_0000010", iteration=10)  # doctest: +SKIP
        >>> ckpt.load()["iteration"]  # doctest: +SKIP
        10
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        save_dir: str = "",
        save_to_disk: bool | None = None,
        logger: logging.Logger | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        head_prefixes: Sequence[str] = DEFAULT_HEAD_PREFIXES,
        rank_states: Mapping[str, Stateful] | None = None,
        rank_state_policy: RankStatePolicy | str = RankStatePolicy.SKIP,
        process_group: Any | None = None,
        allow_unsafe_pickle: bool = False,
        async_save: bool = False,
        keep_last: int | None = None,
        retention: RetentionPolicy | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if scheduler is not None and not (hasattr(scheduler, "state_dict") and hasattr(scheduler, "load_state_dict")):
            raise TypeError("scheduler must have state_dict() and load_state_dict()")
        for name, obj in (rank_states or {}).items():
            if not isinstance(obj, Stateful):
                raise TypeError(f"rank_states[{name!r}] must have state_dict() and load_state_dict()")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.save_dir = str(save_dir) if save_dir else ""
        self.save_to_disk = save_to_disk
        self.logger = logger or logging.getLogger(__name__)
        self.storage_options = dict(storage_options or {})
        self.head_prefixes = tuple(head_prefixes)
        self.rank_states = dict(rank_states or {})
        self.rank_state_policy = RankStatePolicy(rank_state_policy)
        self.process_group = process_group
        self.allow_unsafe_pickle = allow_unsafe_pickle
        self._async = AsyncSaver(optimizer) if async_save else None
        self.retention = make_policy(keep_last, retention)

    # ------------------------------------------------------------------ tag
    def _save_dir_location(self) -> StorageLocation | None:
        return resolve_location(self.save_dir, self.storage_options) if self.save_dir else None

    def has_checkpoint(self) -> bool:
        """True when ``save_dir/last_checkpoint`` exists and names something."""
        save_dir = self._save_dir_location()
        return bool(save_dir is not None and read_tag(save_dir))

    def get_checkpoint_file(self) -> str:
        """The checkpoint the tag points at, as a path inside ``save_dir``; ``""`` when none."""
        save_dir = self._save_dir_location()
        if save_dir is None:
            return ""
        content = read_tag(save_dir)
        return resolve_tag(save_dir, content).url if content else ""

    def tag_last_checkpoint(self, last_filename: str) -> None:
        """Point ``last_checkpoint`` at a checkpoint (a name, or a path inside ``save_dir``).

        Not collective: call it on one rank. ``save`` does this itself.
        """
        save_dir = self._save_dir_location()
        if save_dir is None:
            raise ValueError("tag_last_checkpoint needs a save_dir")
        target = resolve_tag(save_dir, str(last_filename))
        write_tag(save_dir, target.name)

    # ----------------------------------------------------------------- save
    def save(self, name: str, **extra: Any) -> str | None:
        """Save a checkpoint named ``name`` inside ``save_dir`` (collective: call on every rank).

        Args:
            name: the checkpoint's directory name, e.g. ``model_0000100``.
            **extra: objects stored once (from rank 0) and returned by ``load``,
                e.g. ``iteration``, ``person_pool``. Classes other than tensors,
                numpy arrays, primitives and :class:`MemoryPool` must be
                registered with :func:`register_safe_class` to be loaded again.

        Returns:
            The checkpoint's location, or ``None`` when nothing was written.

        Raises:
            DistributedCheckpointError: a rank failed; raised on every rank.
                The previous checkpoint and the tag are left untouched.
        """
        self.wait()  # at most one save in flight; surfaces a background failure
        job = self._prepare_save(name, extra)
        if job is None:
            return None
        if self._async is None:
            return write_and_commit(job, self.process_group, retention=self.retention, logger=self.logger)
        self._async.save(job, self.model, retention=self.retention, logger=self.logger)
        return job.checkpoint_dir.url

    def wait(self) -> None:
        """Wait for an asynchronous save in flight to commit; raise its error if it failed.

        A no-op for synchronous checkpointers. ``save`` and ``load`` call it first.
        """
        if self._async is not None:
            self._async.wait()

    def wait_for_snapshot(self) -> None:
        """Wait until an async save no longer reads live tensors.

        Needed only before modifying parameters in place *outside* the
        optimizer right after ``save()``; the optimizer's ``step()`` waits by itself.
        """
        if self._async is not None:
            self._async.wait_for_snapshot()

    def _prepare_save(self, name: str, extra: Mapping[str, Any]) -> SaveJob | None:
        """The synchronous part of a save, on every rank: agree on what to write and capture it.

        Returns ``None`` when no rank wants to write (``save_dir`` empty or
        ``save_to_disk`` unset everywhere).
        """
        clashing = _RESERVED_EXTRA_NAMES.intersection(extra)
        if clashing:
            raise ValueError(f"extra names {sorted(clashing)} are reserved for the checkpoint's own state; rename them")
        group = self.process_group
        wants = bool(self.save_dir) and bool(self.save_to_disk)
        votes = collective.all_gather_object((wants, self.save_dir, name), group)
        writers = [rank for rank, vote in enumerate(votes) if vote[0]]
        if not writers:
            self.logger.info("Not saving %r: save_dir is empty or save_to_disk is not set on any rank", name)
            return None
        _, save_dir_text, chosen_name = votes[writers[0]]
        if len({vote[2] for vote in votes}) != 1:
            raise ValueError(f"ranks passed different checkpoint names to save(): {[vote[2] for vote in votes]}")
        validate_checkpoint_name(chosen_name)
        _faults.hit("save.begin")
        started = time.perf_counter()
        save_dir = resolve_location(save_dir_text, self.storage_options)
        checkpoint_dir = save_dir.join(chosen_name)
        data_dir_name = collective.broadcast_object(new_data_dir_name(), 0, group)
        rank = collective.get_rank(group)
        if rank == 0:
            self.logger.info("Saving checkpoint to %s", checkpoint_dir.url)
        layout = model_layout(self.model)
        sync_ddp_buffers(self.model)
        state = collective.run_collectively(
            lambda: capture_save_state(self.model, self.optimizer, self.scheduler, self.rank_states, extra, rank),
            what=f"capturing state for {checkpoint_dir.url}",
            group=group,
        )
        _faults.hit("save.before_write")
        world_size = collective.get_world_size(group)
        return SaveJob(
            name=chosen_name,
            save_dir=save_dir,
            checkpoint_dir=checkpoint_dir,
            data_dir=checkpoint_dir.join(data_dir_name),
            layout=layout,
            state=state,
            contents=describe_contents(
                optimizer=self.optimizer is not None,
                scheduler=self.scheduler is not None,
                extra=extra,
                rank_states=self.rank_states,
                world_size=world_size,
            ),
            rank=rank,
            world_size=world_size,
            started=started,
        )

    # ----------------------------------------------------------------- load
    def load(
        self,
        f: str | None = None,
        model_weight_only: bool = False,
        adjust_scheduler: bool = False,
        no_head: bool = False,
        *,
        strict: bool | None = None,
        verify: bool | str | VerifyMode = True,
    ) -> LoadResult:
        """Load a checkpoint (collective when a process group exists: call on every rank).

        Args:
            f: a checkpoint path or URL; falsy resumes from ``last_checkpoint``.
                An explicit ``f`` always wins over the tag.
            model_weight_only: load only model weights; the result then has
                ``iteration=0`` and an empty ``person_pool`` (transfer learning).
            adjust_scheduler: keep the scheduler's current settings (milestones,
                warmup) and only move it to the saved position.
            no_head: leave the classification head (``head_prefixes``) as it is,
                so a checkpoint with another number of classes loads.
            strict: raise when model keys or shapes do not fit; with ``False``
                the keys that fit are loaded and the rest are in ``result.report``.
                ``None`` (default): strict for sharded checkpoints, lenient for
                single files (upstream ``.pth``/``.pkl`` weights routinely lack
                the head or carry extra keys, and upstream loaded them anyway).
            verify: check the files against the manifest before reading them.
                ``True`` (default): sizes and checksums; reads every byte once
                more, split over the ranks. ``"size"``: sizes only, nearly free,
                misses flipped bits. ``False``: no check; a damaged file can then
                load silently wrong values. Files without a manifest (plain DCP
                directories, ``.pth``) cannot be verified.

        Returns:
            The saved extras that were not consumed (``iteration``,
            ``person_pool``, ...), as a dict with a ``.report`` attribute.

        Raises:
            CheckpointNotFoundError: ``f`` (or the tag's target) does not exist.
            IncompleteCheckpointError: the directory was never committed.
            IncompatibleCheckpointError: keys do not fit and ``strict`` is set.
            CorruptCheckpointError: ``verify`` found a damaged or missing file.
        """
        VerifyMode.from_load_argument(verify)  # a bad value fails before any I/O, on every path
        self.wait()
        group = self.process_group
        resolved = choose_checkpoint_to_load(f, self._save_dir_location(), self.storage_options, group)
        if resolved is None:
            self.logger.info("No checkpoint found. Initializing model from scratch")
            return LoadResult({})
        location = resolved.location
        self.logger.info("Loading checkpoint from %s", location.url)
        verify_for_load(resolved, verify, group=group, logger=self.logger)
        if resolved.kind is CheckpointKind.FILE:
            return self._apply_single_file(
                self._load_file(location.url), location.url, model_weight_only, adjust_scheduler, no_head, bool(strict)
            )
        reader = ShardedReader(
            model=self.model,
            optimizer=self.optimizer,
            head_prefixes=self.head_prefixes,
            rank_states=self.rank_states,
            rank_state_policy=self.rank_state_policy,
            process_group=group,
            allow_unsafe_pickle=self.allow_unsafe_pickle,
            logger=self.logger,
        )
        contents = reader.read(
            resolved,
            model_weight_only=model_weight_only,
            want_scheduler=self.scheduler is not None,
            no_head=no_head,
            strict=strict is not False,
        )
        if contents.scheduler_state is not None:
            self._restore_scheduler(contents.scheduler_state, adjust_scheduler, location.url)
        return self._finish(contents.extras, model_weight_only, contents.report)

    def resume_or_load(self, path: str | None, *, resume: bool = True) -> LoadResult:
        """fvcore's split: resume everything from the tag if asked and one exists, else load ``path``'s weights only."""
        if resume and self.has_checkpoint():
            return self.load(None)
        return self.load(path, model_weight_only=True)

    def _restore_scheduler(self, scheduler_state: Any, adjust_scheduler: bool, source: str) -> None:
        if self.scheduler is None:
            return
        if adjust_scheduler:
            last_epoch = int(scheduler_state["last_epoch"])
            self.logger.info("Adjust scheduler at iteration %d", last_epoch)
            move_scheduler_to(self.scheduler, last_epoch)
        else:
            self.logger.info("Loading scheduler from %s", source)
            self.scheduler.load_state_dict(scheduler_state)

    def _finish(self, extras: dict[str, Any], model_weight_only: bool, report: Any) -> LoadResult:
        if model_weight_only:
            extras["iteration"] = 0
            extras["person_pool"] = MemoryPool()
        return LoadResult(extras, report=report)

    # ----------------------------------------------------- single-file formats
    def _load_file(self, f: str) -> dict[str, Any]:
        """Read a single-file checkpoint into a ``{"model": ..., ...}`` dict.

        Subclasses extend this for more formats (``ActionCheckpointer`` adds
        Caffe2 ``.pkl``). The base class reads ``torch.save`` files: files
        written by the upstream Checkpointer, consolidated checkpoints, and bare
        state dicts.
        """
        return load_single_file(
            f,
            storage_options=self.storage_options,
            allow_unsafe_pickle=self.allow_unsafe_pickle,
            group=self.process_group,
        )

    def _apply_single_file(
        self,
        checkpoint: dict[str, Any],
        source: str,
        model_weight_only: bool,
        adjust_scheduler: bool,
        no_head: bool,
        strict: bool,
    ) -> LoadResult:
        """Load what :meth:`_load_file` read; ``ActionCheckpointer`` overrides it for Caffe2 weights."""
        applied = apply_single_file_checkpoint(
            self.model,
            self.optimizer if not model_weight_only else None,
            checkpoint,
            source=source,
            head_prefixes=self.head_prefixes,
            no_head=no_head,
            strict=strict,
            group=self.process_group,
            logger=self.logger,
        )
        if applied.scheduler_state is not None and not model_weight_only:
            self._restore_scheduler(applied.scheduler_state, adjust_scheduler, source)
        return self._finish(applied.extras, model_weight_only, applied.report)
