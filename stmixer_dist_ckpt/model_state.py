"""Model and optimizer state as DCP sees it, and how a checkpoint's keys fit a model.

``torch.distributed.checkpoint.state_dict`` gives parallelism-neutral state:
model keys without ``module.`` (DDP) or FSDP wrapper names, FSDP2 parameters
as DTensor shards, optimizer state keyed by parameter name instead of by the
integer position a plain ``optimizer.state_dict()`` uses. That neutrality is
what lets a checkpoint saved on 4 FSDP2 ranks load on 2 DDP ranks: the
template built here has the *current* layout and DCP reads the matching slices.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .errors import IncompatibleCheckpointError
from .legacy.key_matching import LoadReport

__all__ = [
    "model_layout",
    "capture_model_state",
    "sync_ddp_buffers",
    "capture_optimizer_state",
    "materialize_optimizer_state",
    "capture_optimizer_state_for_save",
    "apply_model_state",
    "apply_optimizer_state",
    "check_model_keys",
]

MODEL_PREFIX = "model."
OPTIMIZER_PREFIX = "optimizer."


def model_layout(model: nn.Module) -> str:
    """``"fsdp2"`` (DTensor parameters), ``"ddp"`` or ``"single"``; recorded in the manifest."""
    if any(isinstance(param, DTensor) for param in model.parameters()):
        return "fsdp2"
    if isinstance(model, DistributedDataParallel):
        return "ddp"
    return "single"


def sync_ddp_buffers(model: nn.Module) -> None:
    """Give every DDP rank rank 0's buffers, as DDP's next forward would.

    DDP broadcasts buffers (e.g. BatchNorm running statistics) from rank 0 at the
    start of each forward, so right after a step each rank holds its own values
    and rank 0's are the ones training continues with. A checkpoint stores one
    copy of each replicated tensor, written by whichever rank DCP picks; syncing
    first makes that copy rank 0's.
    """
    if not isinstance(model, DistributedDataParallel) or not getattr(model, "broadcast_buffers", True):
        return
    import torch.distributed as dist

    group = getattr(model, "process_group", None)
    source = dist.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():
        for buffer in model.module.buffers():
            dist.broadcast(buffer, src=source, group=group)


def capture_model_state(model: nn.Module) -> dict[str, Any]:
    return get_model_state_dict(model)


def capture_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name: the load template, with state for every parameter."""
    materialize_optimizer_state(model, optimizer)
    return get_optimizer_state_dict(model, optimizer)


def materialize_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Give every trainable parameter its (lazy) optimizer state before state is loaded into it.

    DCP materializes lazy optimizer state (a zero-gradient, lr-0 ``step()``) only
    when the optimizer has no state at all *and* no parameter has a gradient.
    Otherwise a load template lacks the missing parameters' state and the load
    silently skips it (gradients left over from a sanity batch before resuming),
    or DCP fails with "Missing optimizer state ... in checkpoint" (a param group
    added after the optimizer stepped) or "Expected device to be set" (a full
    state dict into FSDP2). So when any trainable parameter has no state, the
    existing state is dropped (a load replaces all of it; as with any failed
    load, a failure leaves it undefined) and the gradients are set aside while
    DCP materializes, then put back.
    """
    trainable = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if all(p in optimizer.state for p in trainable):
        return
    grads = [p.grad for p in trainable]
    optimizer.state.clear()
    for param in trainable:
        param.grad = None
    try:
        get_optimizer_state_dict(model, optimizer)  # materializes, as a side effect
    finally:
        for param, grad in zip(trainable, grads, strict=True):
            param.grad = grad


def capture_optimizer_state_for_save(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state to save, leaving an optimizer that has not stepped yet exactly as it was.

    DCP materializes the lazy state of such an optimizer by running ``step()``
    with zero gradients and lr 0 (pytorch/pytorch#164929). Parameters stay put,
    but Adam's step counter moves to 1, so a checkpoint taken before the first
    step (an initial save, a save right after loading weights only) would change
    every later update. For that optimizer this returns its ``param_groups`` with
    an empty ``state``, as ``optimizer.state_dict()`` of a fresh optimizer is, and
    drops what DCP materialized; loading such a checkpoint leaves the optimizer
    unstarted too (see :mod:`stmixer_dist_ckpt.sharded_load`).
    """
    unstarted = not optimizer.state
    state = get_optimizer_state_dict(model, optimizer)
    if unstarted:
        optimizer.state.clear()
        state = {"state": {}, "param_groups": state["param_groups"]}
    return state


def apply_model_state(model: nn.Module, state: dict[str, Any]) -> None:
    # strict=False: keys left out on purpose (head skipping, non-strict loads) were
    # already decided and reported by check_model_keys.
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))


def apply_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(model, optimizer, state)


def _global_shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):  # DTensor.shape is the global shape
        return tuple(value.shape)
    return None


def check_model_keys(
    model_state: Mapping[str, Any],
    stored: Mapping[str, Any],
    *,
    head_prefixes: Sequence[str],
    skip_head: bool,
    strict: bool,
    source: str,
) -> LoadReport:
    """Compare the model's keys with the checkpoint's ``model.*`` entries.

    Args:
        model_state: the model's current state dict (the load template).
        stored: DCP ``state_dict_metadata`` (flattened key -> storage metadata).
        head_prefixes: model key prefixes that make up the classification head.
        skip_head: leave head keys out (``no_head``), so a new head of another
            size never aborts the load.
        strict: raise on missing, unexpected or mis-shaped keys instead of skipping them.
        source: the checkpoint path, for messages.

    Raises:
        IncompatibleCheckpointError: ``strict`` and the keys do not fit; the
            message lists every offending key.
    """
    loaded: dict[str, str] = {}
    missing: list[str] = []
    unexpected: list[str] = []
    wrong_shape: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    head_skipped: list[str] = []
    checkpoint_keys = {key[len(MODEL_PREFIX) :]: meta for key, meta in stored.items() if key.startswith(MODEL_PREFIX)}
    prefixes = tuple(head_prefixes)
    for key, value in model_state.items():
        if skip_head and prefixes and key.startswith(prefixes):
            head_skipped.append(key)
            continue
        meta = checkpoint_keys.get(key)
        if meta is None:
            missing.append(key)
            continue
        current = _global_shape(value)
        if isinstance(meta, TensorStorageMetadata) and current is not None and tuple(meta.size) != current:
            wrong_shape[key] = (tuple(meta.size), current)
            continue
        loaded[key] = key
    for key in checkpoint_keys:
        if key not in model_state and not (skip_head and prefixes and key.startswith(prefixes)):
            unexpected.append(key)
    report = LoadReport(
        loaded=loaded, missing=missing, unexpected=unexpected, wrong_shape=wrong_shape, head_skipped=head_skipped
    )
    if strict and not report.is_clean:
        raise IncompatibleCheckpointError(
            f"{source} does not fit the model:\n  {report.format()}\n"
            "Pass strict=False to load the keys that fit (the result's .report lists the rest), "
            "or no_head=True if only the classification head differs."
        )
    if not report.is_clean or report.head_skipped:
        logging.getLogger(__name__).warning("Loading %s:\n  %s", source, report.format())
    return report
