"""The read half of a sharded load: from a committed, verified checkpoint into live objects.

:class:`~stmixer_dist_ckpt.checkpointer.Checkpointer` picks and verifies the
checkpoint; :meth:`ShardedReader.read` then, on every rank:

1. reads the DCP metadata once (it is handed on to DCP, not parsed twice),
2. matches the model's keys against it (strict or lenient, head skipped or not),
3. builds a template from the *live* model and optimizer, so each rank reads
   only the slices its own layout holds — which is what makes loading on
   another world size or parallelism work,
4. reads, applies model, optimizer and this rank's per-rank state, and unpacks
   the scheduler state and the extras through the restricted unpickler.

Restoring the scheduler is left to the caller, which alone knows whether to
``adjust_scheduler``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import collective
from ._dcp import dcp_failure_causes, describe_dcp_failures, read_checkpoint_data, read_checkpoint_metadata
from .errors import CheckpointError, DistributedCheckpointError, IncompatibleCheckpointError
from .layout import ResolvedCheckpoint
from .legacy.key_matching import LoadReport
from .model_state import (
    apply_model_state,
    apply_optimizer_state,
    capture_model_state,
    capture_optimizer_state,
    check_model_keys,
)
from .rank_state import RankStatePolicy, Stateful, rank_state_key
from .safe_pickle import safe_torch_load

__all__ = ["ShardedContents", "ShardedReader"]


@dataclass
class ShardedContents:
    """What a sharded load read besides the tensors it already put in place."""

    report: LoadReport
    #: the stored scheduler state, or ``None`` when it was not read
    scheduler_state: Any | None
    #: the saved extras (``iteration``, ``person_pool``, ...)
    extras: dict[str, Any]


@dataclass(frozen=True)
class ShardedReader:
    """The live objects and options a sharded load reads into (one per ``load`` call)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    head_prefixes: tuple[str, ...]
    rank_states: Mapping[str, Stateful]
    rank_state_policy: RankStatePolicy
    process_group: Any | None
    allow_unsafe_pickle: bool
    logger: logging.Logger

    def read(
        self,
        resolved: ResolvedCheckpoint,
        *,
        model_weight_only: bool,
        want_scheduler: bool,
        no_head: bool,
        strict: bool,
    ) -> ShardedContents:
        """Load ``resolved`` into the model (and optimizer, per-rank state); collective.

        Raises:
            IncompatibleCheckpointError: model keys or shapes do not fit with
                ``strict``; optimizer state is missing for a parameter; per-rank
                state of another world size with ``RankStatePolicy.ERROR``.
            DistributedCheckpointError: a rank failed to read; raised on every rank.
        """
        group = self.process_group
        source = resolved.location.url
        data = resolved.data
        if data is None:  # resolve_checkpoint gives data for every directory kind
            raise CheckpointError(f"{source} has no data directory")
        metadata = collective.run_collectively(
            lambda: read_checkpoint_metadata(data, allow_unsafe_pickle=self.allow_unsafe_pickle),
            what=f"reading metadata of {source}",
            group=group,
        )
        stored = metadata.state_dict_metadata
        model_state = capture_model_state(self.model)
        report = collective.run_collectively(
            lambda: check_model_keys(
                model_state, stored, head_prefixes=self.head_prefixes, skip_head=no_head, strict=strict, source=source
            ),
            what=f"matching keys of {source}",
            group=group,
        )
        template: dict[str, Any] = {"model": {key: model_state[key] for key in report.loaded}}
        load_optimizer = self.optimizer is not None and not model_weight_only and any(k.startswith("optimizer.") for k in stored)
        if load_optimizer and self.optimizer is not None:
            optimizer_state = capture_optimizer_state(self.model, self.optimizer)
            if any(key.startswith("optimizer.state.") for key in stored):
                skipped = set(report.head_skipped) | set(report.wrong_shape) | set(report.missing)
                optimizer_state["state"] = {k: v for k, v in optimizer_state["state"].items() if k not in skipped}
                _check_optimizer_keys(optimizer_state, stored, source)
            else:
                # Saved before its first step (or a stateless optimizer): load the param_groups
                # and leave the optimizer unstarted, as it was when saved.
                optimizer_state["state"] = {}
            template["optimizer"] = optimizer_state
        load_scheduler = want_scheduler and not model_weight_only and "scheduler" in stored
        if load_scheduler:
            template["scheduler"] = b""
        extra_names = [key[len("extra.") :] for key in stored if key.startswith("extra.")]
        template["extra"] = dict.fromkeys(extra_names, b"")
        own_rank_key = self._rank_state_to_read(source, stored)
        if own_rank_key is not None:
            template["rank_state"] = {own_rank_key: b""}

        def read() -> None:
            read_checkpoint_data(
                template, data, group=group, allow_unsafe_pickle=self.allow_unsafe_pickle, metadata=metadata
            )

        _read_collectively(read, source, group)
        apply_model_state(self.model, template["model"])
        if load_optimizer and self.optimizer is not None:
            apply_optimizer_state(self.model, self.optimizer, template["optimizer"])
            self.logger.info("Loaded optimizer from %s", source)
        if own_rank_key is not None:
            saved = self._unpack(template["rank_state"][own_rank_key], f"{source} [rank_state.{own_rank_key}]")
            for name, obj in self.rank_states.items():
                if name in saved:
                    obj.load_state_dict(saved[name])
        return ShardedContents(
            report=report,
            scheduler_state=self._unpack(template["scheduler"], f"{source} [scheduler]") if load_scheduler else None,
            extras={name: self._unpack(blob, f"{source} [extra.{name}]") for name, blob in template["extra"].items()},
        )

    def _rank_state_to_read(self, source: str, stored: Mapping[str, Any]) -> str | None:
        if not self.rank_states:
            return None
        saved_world = sorted(key for key in stored if key.startswith("rank_state."))
        if not saved_world:
            self.logger.warning("%s holds no per-rank state; rank_states keep their current values", source)
            return None
        world_size = collective.get_world_size(self.process_group)
        if len(saved_world) != world_size:
            message = (
                f"{source} holds per-rank state of {len(saved_world)} rank(s) but this job has "
                f"{world_size}; per-rank state ({sorted(self.rank_states)}) cannot be mapped onto other ranks"
            )
            if self.rank_state_policy is RankStatePolicy.ERROR:
                raise IncompatibleCheckpointError(message + " (rank_state_policy='error')")
            self.logger.warning("%s; keeping every rank's current per-rank state (rank_state_policy='skip')", message)
            return None
        return rank_state_key(collective.get_rank(self.process_group))

    def _unpack(self, blob: Any, source: str) -> Any:
        """Objects are stored pre-serialized (one opaque DCP item each); open them safely."""
        if not isinstance(blob, (bytes, bytearray)):
            return blob
        return safe_torch_load(bytes(blob), source=source, allow_unsafe_pickle=self.allow_unsafe_pickle)


def _check_optimizer_keys(optimizer_state: dict[str, Any], stored: Mapping[str, Any], source: str) -> None:
    missing = [
        f"{fqn}.{name}"
        for fqn, entries in optimizer_state["state"].items()
        for name, value in entries.items()
        if isinstance(value, torch.Tensor) and f"optimizer.state.{fqn}.{name}" not in stored
    ]
    if missing:
        raise IncompatibleCheckpointError(
            f"{source} has no optimizer state for {len(missing)} entries, e.g. {missing[:5]}; it was saved with "
            "another optimizer type or parameter set. Load with model_weight_only=True to start the optimizer fresh."
        )


def _read_collectively(read: Callable[[], None], source: str, group: Any | None) -> None:
    """Run DCP's collective read; re-raise our own errors with their type, wrap the rest per rank."""
    try:
        read()
    except BaseException as exc:  # DCP's CheckpointException derives from BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        causes = dcp_failure_causes(exc)
        if causes and all(isinstance(cause, CheckpointError) for cause in causes):
            raise causes[0] from exc  # e.g. UnsafeCheckpointError: keep its type for callers
        if not causes and isinstance(exc, Exception):
            raise
        rank = collective.get_rank(group)
        raise DistributedCheckpointError(f"reading {source} failed", describe_dcp_failures(exc, rank)) from exc
