"""Single-file checkpoints (``torch.save`` dicts): read once on rank 0, delivered to every rank.

On a 64-rank job, 64 processes each unpickling the same large file from shared
storage is slow and fragile. Here rank 0 alone opens the file; model weights
reach the other ranks through ``set_model_state_dict(broadcast_from_rank0=True)``,
which sends each FSDP2 rank only its shard, and the small remainder (optimizer,
scheduler, extras) is broadcast as an object.

Legacy model keys are matched with
:func:`~stmixer_dist_ckpt.legacy.key_matching.match_state_dict` (``module.``
prefix, dot-boundary suffixes, shape mismatches skipped and reported).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from . import collective
from .errors import CheckpointNotFoundError, IncompatibleCheckpointError
from .legacy.key_matching import LoadReport, match_state_dict
from .legacy.legacy_file import load_legacy_checkpoint
from .model_state import materialize_optimizer_state
from .storage import resolve_location

__all__ = [
    "read_on_rank0",
    "load_single_file",
    "AppliedSingleFile",
    "apply_single_file_checkpoint",
    "apply_single_file_model",
    "apply_legacy_optimizer_state",
]

logger = logging.getLogger(__name__)

FileReader = Callable[[str], dict[str, Any]]


def read_on_rank0(
    f: str, reader: FileReader, *, group: Any | None = None
) -> dict[str, Any]:
    """Run ``reader(f)`` on rank 0 only; every rank gets the non-model entries.

    Rank 0's result keeps its ``"model"`` dict; on other ranks ``"model"`` is
    ``{}`` (weights travel later, per shard). A failure on rank 0 is raised on
    every rank.
    """
    rank = collective.get_rank(group)

    def read() -> dict[str, Any] | None:
        return reader(f) if rank == 0 else None

    loaded = collective.run_collectively(read, what=f"reading {f} on rank 0", group=group)
    rest = {k: v for k, v in loaded.items() if k != "model"} if loaded is not None else None
    rest = collective.broadcast_object(rest, 0, group)
    model = loaded.get("model", {}) if loaded is not None else {}
    return {"model": model, **(rest or {})}


def load_single_file(
    f: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    allow_unsafe_pickle: bool = False,
    group: Any | None = None,
) -> dict[str, Any]:
    """Read a ``torch.save`` checkpoint (upstream, consolidated or bare state dict) on rank 0."""

    def reader(path: str) -> dict[str, Any]:
        location = resolve_location(path, storage_options)
        if not location.isfile():
            raise CheckpointNotFoundError(f"no checkpoint file at {location.url}")
        with location.open("rb") as stream:
            return load_legacy_checkpoint(stream, source=location.url, allow_unsafe_pickle=allow_unsafe_pickle)

    return read_on_rank0(f, reader, group=group)


def apply_single_file_model(
    model: nn.Module,
    loaded: Mapping[str, Any],
    *,
    head_prefixes: Sequence[str],
    skip_head: bool,
    strict: bool,
    source: str,
    group: Any | None = None,
    report_hook: Callable[[LoadReport], LoadReport] | None = None,
) -> LoadReport:
    """Match rank 0's ``loaded`` weights to ``model`` and deliver them to every rank.

    Args:
        loaded: the file's model dict on rank 0 (ignored on other ranks).
        strict: raise when model keys are missing or mis-shaped instead of
            keeping their current values.
        report_hook: rewrites the matcher's report on rank 0 before the strict
            check and the log. A file format uses it to set aside keys it can
            never hold (Caffe2 files have no BatchNorm ``num_batches_tracked``),
            so they neither fail a strict load nor read as a broken one.

    Raises:
        IncompatibleCheckpointError: on every rank, for ambiguous matches, an
            empty dict, or (``strict``) keys that do not fit.
    """
    current = get_model_state_dict(model)
    shapes = {key: tuple(value.shape) for key, value in current.items() if isinstance(value, torch.Tensor)}
    rank = collective.get_rank(group)

    def match() -> tuple[dict[str, torch.Tensor], LoadReport] | None:
        if rank != 0:
            return None
        updates, report = match_state_dict(shapes, loaded, head_prefixes=head_prefixes, skip_head=skip_head)
        if report_hook is not None:
            report = report_hook(report)
        if strict and (report.missing or report.wrong_shape):
            raise IncompatibleCheckpointError(
                f"{source} does not fit the model:\n{report.format()}\n"
                "Pass strict=False to load the keys that fit, or no_head=True if only the head differs."
            )
        return updates, report

    matched = collective.run_collectively(match, what=f"matching keys of {source}", group=group)
    report = collective.broadcast_object(matched[1] if matched is not None else None, 0, group)
    updates: dict[str, Any] = dict(matched[0]) if matched is not None else {}
    if report is not None and (not report.is_clean or report.head_skipped) and rank == 0:
        logger.warning("Loading %s:\n%s", source, report.format())
    if collective.is_distributed(group):
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    else:
        options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, updates, options=options)
    if not isinstance(report, LoadReport):  # broadcast from rank 0, which always has one
        raise IncompatibleCheckpointError(f"{source}: no key report arrived from rank 0")
    return report


def apply_legacy_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, legacy: Mapping[str, Any], *, source: str
) -> None:
    """Load an ``optimizer.state_dict()`` (integer parameter ids) on any parallelism.

    Integer ids are positions in the optimizer's parameter list, so they are
    mapped onto the current optimizer's parameters in order and then to their
    names, which DCP's state-dict API needs to shard the state for FSDP2.

    Raises:
        IncompatibleCheckpointError: the parameter groups do not line up.
    """
    names = {id(param): name.removeprefix("module.") for name, param in model.named_parameters()}
    current = [param for group in optimizer.param_groups for param in group["params"]]
    saved_groups = legacy.get("param_groups")
    if not isinstance(saved_groups, list) or "state" not in legacy:
        raise IncompatibleCheckpointError(f"{source}: 'optimizer' is not an optimizer state_dict (no state/param_groups)")
    saved_ids = [pid for group in saved_groups for pid in group["params"]]
    if len(saved_ids) != len(current) or len(saved_groups) != len(optimizer.param_groups):
        raise IncompatibleCheckpointError(
            f"{source}: the saved optimizer has {len(saved_groups)} group(s) / {len(saved_ids)} parameter(s), this "
            f"one {len(optimizer.param_groups)} / {len(current)}; load with model_weight_only=True to start it fresh"
        )
    if isinstance(saved_ids[0], str):  # already keyed by name (written by a DSD-aware tool)
        id_to_name = {pid: pid for pid in saved_ids}
    else:
        id_to_name = {pid: names[id(current[pos])] for pos, pid in enumerate(saved_ids)}
    # Saved groups may carry keys this optimizer lacks, e.g. "initial_lr", which a scheduler adds:
    # optimizer.load_state_dict would take the saved groups whole, and the name-keyed path below
    # only fills keys the live groups already have, so add the missing ones first.
    for live_group, saved_group in zip(optimizer.param_groups, saved_groups, strict=True):
        for key, value in saved_group.items():
            if key != "params" and key not in live_group:
                live_group[key] = value
    state = {id_to_name[pid]: value for pid, value in legacy["state"].items() if pid in id_to_name}
    groups = [{**group, "params": [id_to_name[pid] for pid in group["params"]]} for group in saved_groups]
    materialize_optimizer_state(model, optimizer)
    set_optimizer_state_dict(
        model, optimizer, {"state": state, "param_groups": groups}, options=StateDictOptions(full_state_dict=True)
    )


@dataclass
class AppliedSingleFile:
    """What loading a single-file checkpoint left for the caller after model and optimizer."""

    report: LoadReport
    #: the stored scheduler state (restored by the caller, which knows about ``adjust_scheduler``)
    scheduler_state: Any | None
    #: everything else in the file (``iteration``, ``person_pool``, ...)
    extras: dict[str, Any]


def apply_single_file_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    checkpoint: dict[str, Any],
    *,
    source: str,
    head_prefixes: Sequence[str],
    no_head: bool,
    strict: bool,
    group: Any | None,
    logger: logging.Logger,
) -> AppliedSingleFile:
    """Load a ``{"model": ..., "optimizer": ..., ...}`` dict read from one file (collective).

    Args:
        optimizer: receives the file's optimizer state; ``None`` leaves it out
            (no optimizer, or a weights-only load).
        checkpoint: consumed: ``model``, ``optimizer`` and ``scheduler`` are popped.
    """
    report = apply_single_file_model(
        model,
        checkpoint.pop("model"),
        head_prefixes=head_prefixes,
        skip_head=no_head,
        strict=strict,
        source=source,
        group=group,
    )
    optimizer_state = checkpoint.pop("optimizer", None)
    if optimizer_state is not None and optimizer is not None:
        logger.info("Loading optimizer from %s", source)
        apply_legacy_optimizer_state(model, optimizer, optimizer_state, source=source)
    scheduler_state = checkpoint.pop("scheduler", None)
    return AppliedSingleFile(report=report, scheduler_state=scheduler_state, extras=checkpoint)
