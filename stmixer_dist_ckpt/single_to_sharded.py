"""The reverse of consolidation: a single ``torch.save`` checkpoint to our sharded, committed layout.

The result is exactly what ``Checkpointer.save`` writes on one rank
(``<dst>/manifest.json`` + ``<dst>/data-<token>/``), so any job loads it on
any world size and parallelism, and ``consolidate`` turns it back into a file.

One thing a ``.pth`` cannot say on its own is which parameter an optimizer
entry belongs to: ``optimizer.state_dict()`` numbers parameters by their
position in the optimizer, while the sharded format names them (that is what
lets it reshard). Positions are named from a ``model`` (and, exactly, from an
``optimizer`` built like the saved one) and checked against the moments'
shapes; without a model, the optimizer can only be left out (``model_only``),
never guessed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import collective
from .commit import write_offline_checkpoint
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    IncompatibleCheckpointError,
)
from .layout import validate_checkpoint_name
from .legacy.legacy_file import load_legacy_checkpoint
from .manifest import MANIFEST_FILE
from .safe_pickle import safe_torch_load
from .sharded_save import serialize_object
from .storage import StorageLocation, resolve_location

__all__ = ["convert_to_sharded"]

logger = logging.getLogger(__name__)

_DDP_PREFIX = "module."


def _read_single_file(location: StorageLocation, allow_unsafe_pickle: bool) -> dict[str, Any]:
    """The file as ``{"model": ..., ...}``; local files are memory-mapped so weights are not copied into RAM."""
    if location.is_local:
        try:
            data = safe_torch_load(location.path, source=location.url, allow_unsafe_pickle=allow_unsafe_pickle, mmap=True)
        except RuntimeError:
            data = None  # not a zip-format file (pre-1.6 torch.save); the general reader below handles it
        if isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
            return dict(data)
        if isinstance(data, Mapping) and data and all(isinstance(value, torch.Tensor) for value in data.values()):
            return {"model": dict(data)}
    with location.open("rb") as stream:
        return load_legacy_checkpoint(stream, source=location.url, allow_unsafe_pickle=allow_unsafe_pickle)


def _strip_ddp_prefix(model_state: Mapping[str, Any]) -> dict[str, Any]:
    # The sharded format stores parallelism-neutral names; a file saved from a DDP-wrapped
    # model would otherwise match nothing when loaded into the unwrapped model.
    if model_state and all(str(key).startswith(_DDP_PREFIX) for key in model_state):
        return {str(key)[len(_DDP_PREFIX) :]: value for key, value in model_state.items()}
    return {str(key): value for key, value in model_state.items()}


def _named_optimizer_state(
    optimizer: Mapping[str, Any], model: nn.Module | None, live: torch.optim.Optimizer | None, source: str
) -> dict[str, Any]:
    """``optimizer.state_dict()`` (integer ids) to the name-keyed form the sharded format stores."""
    groups = optimizer.get("param_groups")
    if not isinstance(groups, list) or not isinstance(optimizer.get("state"), Mapping):
        raise IncompatibleCheckpointError(f"{source}: 'optimizer' is not an optimizer state_dict (no state/param_groups)")
    ids = [pid for group in groups for pid in group["params"]]
    if all(isinstance(pid, str) for pid in ids):
        names = {pid: pid for pid in ids}
    elif model is None:
        raise IncompatibleCheckpointError(
            f"{source}: the optimizer state is keyed by parameter position, and naming positions needs the model. "
            "Pass model= to convert_to_sharded, convert the weights alone with model_only=True (--model-only), "
            "or resume from the file directly with Checkpointer.load, which maps positions with the live optimizer."
        )
    else:
        names = _names_from_model(ids, optimizer["state"], model, live, source)
    state = {names[pid]: entries for pid, entries in optimizer["state"].items() if pid in names}
    named_groups = [{**group, "params": [names[pid] for pid in group["params"]]} for group in groups]
    return {"state": state, "param_groups": named_groups}


def _names_from_model(
    ids: list[Any], state: Mapping[Any, Any], model: nn.Module, live: torch.optim.Optimizer | None, source: str
) -> dict[Any, str]:
    named = [(name.removeprefix(_DDP_PREFIX), param) for name, param in model.named_parameters()]
    if live is not None:  # exact: positions are the live optimizer's parameter order
        by_id = {id(param): name for name, param in named}
        ordered = [param for group in live.param_groups for param in group["params"]]
        unknown = [position for position, param in enumerate(ordered) if id(param) not in by_id]
        if unknown:
            raise IncompatibleCheckpointError(
                f"{source}: optimizer= holds {len(unknown)} parameter(s) that are not in model=; pass the pair "
                "that trained together"
            )
        candidates = [(by_id[id(param)], param) for param in ordered]
    else:
        trainable = [(name, param) for name, param in named if param.requires_grad]
        # Without the optimizer, assume it was built from the trainable parameters in definition
        # order (STMixer's make_optimizer, `Adam(p for p in model.parameters() if p.requires_grad)`);
        # the shape check below catches a different order in all but degenerate cases.
        candidates = trainable if len(trainable) == len(ids) else named
    if len(candidates) != len(ids):
        raise IncompatibleCheckpointError(
            f"{source}: the saved optimizer has {len(ids)} parameter(s) but {len(candidates)} were given to name "
            "them; pass the model (and optimizer) it was trained with, or use model_only=True"
        )
    names = {pid: name for pid, (name, _) in zip(ids, candidates, strict=True)}
    for pid, (name, param) in zip(ids, candidates, strict=True):
        for key, value in dict(state.get(pid, {})).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(param.shape):
                raise IncompatibleCheckpointError(
                    f"{source}: optimizer entry {pid} ({key}, shape {tuple(value.shape)}) does not fit parameter "
                    f"{name!r} {tuple(param.shape)}; the optimizer's parameter order differs from the model's. "
                    "Pass optimizer= as well, or use model_only=True."
                )
    return names


def _prepare_destination(checkpoint_dir: StorageLocation, overwrite: bool) -> None:
    validate_checkpoint_name(checkpoint_dir.name)
    if checkpoint_dir.isfile():
        raise CheckpointExistsError(f"{checkpoint_dir.url} is a file; name a directory for the sharded checkpoint")
    existing = checkpoint_dir.listdir()
    if existing and not overwrite:
        what = "a committed checkpoint" if MANIFEST_FILE in existing else "a non-empty directory"
        raise CheckpointExistsError(f"{checkpoint_dir.url} is {what}; pass overwrite=True (--overwrite) to replace it")


def convert_to_sharded(
    src: str,
    dst: str,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    model_only: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    allow_unsafe_pickle: bool = False,
) -> str:
    """Write the single-file checkpoint ``src`` as a committed sharded checkpoint directory ``dst``.

    Runs in one process without a process group; the result is what
    ``Checkpointer.save`` writes on one rank and loads on any world size.

    Args:
        src: a ``torch.save`` checkpoint: an upstream Checkpointer ``.pth``
            (``{"model", "optimizer", "scheduler", <extras>}``), a consolidated
            file, or a bare state dict. Local path or fsspec URL.
        dst: the checkpoint directory to create, e.g. ``run/model_0001000``;
            its name follows the rules of ``Checkpointer.save`` names.
        model: names the positions of an integer-keyed optimizer state (see
            the module docs); unused when ``model_only``.
        optimizer: an optimizer over ``model`` built like the one that was
            saved; makes the naming exact. Without it, positions are taken to
            follow ``model``'s trainable parameters in order, and the moments'
            shapes are checked against them.
        model_only: convert only the weights.
        storage_options: fsspec options for ``src`` and ``dst``.
        overwrite: replace an existing checkpoint at ``dst``.
        allow_unsafe_pickle: unpickle ``src`` without the allow list.

    Returns:
        The URL of the committed checkpoint.

    Raises:
        CheckpointNotFoundError: ``src`` is not a file.
        CheckpointExistsError: ``dst`` exists and ``overwrite`` is false.
        IncompatibleCheckpointError: the optimizer cannot be named (pass
            ``model`` or ``model_only=True``).
        CheckpointError: called inside a multi-rank process group.

    Example:
        >>> from stmixer_dist_ckpt.single_to_sharded import convert_to_sharded
        >>> convert_to_sharded("model_final.pth", "run/model_0090000", model=model, optimizer=optimizer)  # doctest: +SKIP
        'run/model_0090000'
    """
    if optimizer is not None and model is None:
        raise ValueError("optimizer= needs model= as well: parameters are named through the model")
    if collective.get_world_size() > 1:
        raise CheckpointError(
            "convert_to_sharded writes from a single process, but a multi-rank process group is initialized; "
            "run it outside the distributed job (e.g. `stmixer-ckpt convert SRC DST`)"
        )
    source = resolve_location(src, storage_options)
    if not source.isfile():
        raise CheckpointNotFoundError(f"no checkpoint file at {source.url}")
    checkpoint_dir = resolve_location(dst, storage_options)
    _prepare_destination(checkpoint_dir, overwrite)
    loaded = _read_single_file(source, allow_unsafe_pickle)
    state: dict[str, Any] = {"model": _strip_ddp_prefix(loaded.pop("model"))}
    saved_optimizer = loaded.pop("optimizer", None)
    scheduler = loaded.pop("scheduler", None)
    if model_only:
        loaded.clear()
    else:
        if saved_optimizer is not None:
            state["optimizer"] = _named_optimizer_state(saved_optimizer, model, optimizer, source.url)
        if scheduler is not None:
            state["scheduler"] = serialize_object(scheduler)
        bad_names = [name for name in loaded if not isinstance(name, str) or not name]
        if bad_names:
            raise IncompatibleCheckpointError(
                f"{source.url}: top-level keys {bad_names} cannot be stored as extras (they must be non-empty "
                "strings); use model_only=True to convert the weights alone"
            )
        state["extra"] = {name: serialize_object(value) for name, value in loaded.items()}
    manifest = write_offline_checkpoint(state, checkpoint_dir)
    logger.info("Converted %s -> %s (%d files)", source.url, checkpoint_dir.url, len(manifest.files))
    return checkpoint_dir.url
