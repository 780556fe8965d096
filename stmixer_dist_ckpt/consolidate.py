"""Consolidation: a sharded checkpoint of any world size to one ``.pth`` or ``.safetensors`` file.

Released weights are single files. DCP's ``dcp_to_torch_save`` loads the whole
checkpoint into memory first (about 1.3x its size) and turns the optimizer's
integer parameter ids into strings, so ``optimizer.load_state_dict`` accepts
the file but silently gets no moments. :func:`consolidate` instead

* reads one tensor at a time from the data files (its chunks from every rank)
  and writes it straight into the output, so memory stays near the largest
  tensor and no process group is needed;
* writes the layout the single-file ``Checkpointer`` always wrote, ``{"model",
  "optimizer", "scheduler", <extras>}``, with the optimizer keyed by integer
  ids in ``param_groups`` order, exactly as ``optimizer.state_dict()`` is;
* publishes the file atomically (a temp file and a rename locally, a completed
  upload on object stores).

:func:`read_checkpoint_entries` uses the same reader to load one key or prefix
(only ``model``, or one tensor) without touching the rest.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ._consolidated_layout import (
    PACKED_ROOTS,
    OutputBuilder,
    UnsafeExtrasPolicy,
    is_checkpointer_layout,
    load_object,
)
from ._dcp_index import insert_at_path, select_items
from ._dcp_items import open_sharded_checkpoint
from ._torch_format import atomic_output, write_safetensors_file, write_torch_file
from .errors import CheckpointExistsError, IncompatibleCheckpointError
from .storage import resolve_location

__all__ = [
    "ConsolidationFormat",
    "UnsafeExtrasPolicy",
    "ConsolidationSummary",
    "consolidate",
    "read_checkpoint_entries",
    "parse_dtype",
]

logger = logging.getLogger(__name__)

ConsolidationFormat = Literal["torch", "safetensors"]

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsolidationSummary:
    """What :func:`consolidate` wrote.

    Attributes:
        source: the checkpoint read.
        destination: the file written.
        format: ``"torch"`` or ``"safetensors"``.
        tensors: how many tensors were written.
        tensor_bytes: their total size.
        file_bytes: the output file's size.
        seconds: wall time of the whole call.
        saved_world_size: the number of ranks that saved the checkpoint (``None``
            for plain DCP directories, which do not record it).
        dropped: stored keys left out of the output, with the reason.
        needs_safe_loader: kept keys that ``torch.load(weights_only=True)`` refuses.
    """

    source: str
    destination: str
    format: ConsolidationFormat
    tensors: int
    tensor_bytes: int
    file_bytes: int
    seconds: float
    saved_world_size: int | None
    dropped: tuple[str, ...] = field(default=())
    needs_safe_loader: tuple[str, ...] = field(default=())

    @property
    def gigabytes_per_second(self) -> float:
        return self.file_bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0


def parse_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``"bf16"``, ``"float16"``, ``torch.float32``... to a floating-point dtype; ``None`` stays ``None``.

    Raises:
        ValueError: not a floating-point dtype name.
    """
    if value is None or isinstance(value, torch.dtype):
        dtype = value
    else:
        dtype = _DTYPE_NAMES.get(str(value).lower().removeprefix("torch."))
        if dtype is None:
            raise ValueError(f"unknown dtype {value!r}; use one of {sorted(_DTYPE_NAMES)}")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype} is not a floating-point type; only float weights are converted")
    return dtype


def _progress_bar(total: int, enabled: bool | None, description: str) -> Any:
    from tqdm import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description, disable=not show,
                file=sys.stderr, dynamic_ncols=True)


def consolidate(
    src: str,
    dst: str,
    *,
    format: ConsolidationFormat = "torch",
    model_only: bool = False,
    dtype: torch.dtype | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
    unsafe_extras: UnsafeExtrasPolicy | str = UnsafeExtrasPolicy.DROP,
    allow_unsafe_pickle: bool = False,
) -> ConsolidationSummary:
    """Write the sharded checkpoint ``src`` as one file ``dst``, streaming one tensor at a time.

    Args:
        src: a committed checkpoint, a plain DCP directory, or a ``save_dir``
            (its tagged checkpoint); local path or fsspec URL. Any world size.
        dst: the output file (local path or URL).
        format: ``"torch"``: a ``torch.save`` file laid out like the legacy
            single-file Checkpointer's. ``"safetensors"``: model tensors only
            (tied weights are written under each name).
        model_only: write only ``{"model": state_dict}`` (torch format), which
            always loads with ``torch.load(weights_only=True)``.
        dtype: convert floating-point *model* tensors (``"bf16"``, ``torch.float16``...);
            optimizer moments keep their precision.
        storage_options: fsspec options for both ``src`` and ``dst``.
        progress: show a progress bar; ``None``: when stderr is a terminal.
        overwrite: replace an existing ``dst``.
        unsafe_extras: see :class:`UnsafeExtrasPolicy`.
        allow_unsafe_pickle: unpickle stored objects without the allow list.

    Returns:
        A :class:`ConsolidationSummary`.

    Raises:
        CheckpointNotFoundError: nothing at ``src``.
        IncompleteCheckpointError: ``src`` was never committed.
        CorruptCheckpointError: data files are missing or truncated (checked before writing).
        CheckpointExistsError: ``dst`` exists and ``overwrite`` is false.
        UnsafeCheckpointError: an object needs a class that is not allowed, or
            ``unsafe_extras="error"`` and one is not ``weights_only`` loadable.

    Example:
        >>> from stmixer_dist_ckpt.consolidate import consolidate
        >>> summary = consolidate("run/model_0001000", "model_final.pth")  # doctest: +SKIP
        >>> ckpt = torch.load("model_final.pth", weights_only=True)  # doctest: +SKIP
        >>> model.load_state_dict(ckpt["model"]); optimizer.load_state_dict(ckpt["optimizer"])  # doctest: +SKIP
    """
    if format not in ("torch", "safetensors"):
        raise ValueError(f"format must be 'torch' or 'safetensors', got {format!r}")
    try:
        policy = UnsafeExtrasPolicy(unsafe_extras)
    except ValueError as exc:
        raise ValueError(f"unsafe_extras must be one of {[p.value for p in UnsafeExtrasPolicy]}, got {unsafe_extras!r}") from exc
    target_dtype = parse_dtype(dtype)
    started = time.perf_counter()
    destination = resolve_location(dst, storage_options)
    if not overwrite and destination.exists():  # fail before any work; atomic_output checks again
        raise CheckpointExistsError(f"{destination.url} already exists; pass overwrite=True (--overwrite) to replace it")
    resolved, reader = open_sharded_checkpoint(src, storage_options, allow_unsafe_pickle=allow_unsafe_pickle)
    with reader:
        expected = {name: record.size for name, record in resolved.manifest.files.items()} if resolved.manifest else None
        reader.check_complete(expected)
        builder = OutputBuilder(reader, dtype=target_dtype, policy=policy)
        obj: Any = builder.model_state() if format == "safetensors" else builder.torch_object(model_only)
        bar = _progress_bar(builder.tensor_bytes, progress, f"consolidate -> {destination.name}")
        with bar, atomic_output(destination, overwrite=overwrite) as stream:
            if format == "safetensors":
                written = write_safetensors_file(obj, stream, on_written=bar.update)
            else:
                written = write_torch_file(obj, stream, on_written=bar.update)
    summary = ConsolidationSummary(
        source=resolved.location.url,
        destination=destination.url,
        format=format,
        tensors=builder.tensors,
        tensor_bytes=written,
        file_bytes=destination.size(),
        seconds=time.perf_counter() - started,
        saved_world_size=resolved.manifest.world_size if resolved.manifest else None,
        dropped=tuple(builder.dropped),
        needs_safe_loader=tuple(builder.needs_safe_loader),
    )
    logger.info(
        "Consolidated %s -> %s: %d tensors, %.1f MB in %.2f s (%.2f GB/s)", summary.source, summary.destination,
        summary.tensors, summary.file_bytes / 1e6, summary.seconds, summary.gigabytes_per_second,
    )
    return summary


def read_checkpoint_entries(
    src: str,
    prefix: str | None = "model",
    storage_options: Mapping[str, Any] | None = None,
    *,
    allow_unsafe_pickle: bool = False,
) -> dict[Any, Any]:
    """Load only the entries of a sharded checkpoint at or below ``prefix``; nothing else is read.

    Keys are the flattened names the checkpoint stores (``model``,
    ``model.backbone.conv.weight``, ``optimizer.state``, ``extra.iteration``);
    a prefix matches at dot boundaries. The result keeps the saved nesting.

    Args:
        src: a committed checkpoint, a plain DCP directory or a ``save_dir``.
        prefix: what to load; ``None`` or ``""`` loads everything.
        storage_options: fsspec options for ``src``.
        allow_unsafe_pickle: unpickle stored objects without the allow list.

    Returns:
        The selected part of the saved state dict, e.g. ``{"model": {fqn: tensor}}``.

    Raises:
        IncompatibleCheckpointError: nothing is stored under ``prefix``.

    Example:
        >>> from stmixer_dist_ckpt.consolidate import read_checkpoint_entries
        >>> weights = read_checkpoint_entries("run/model_0001000", "model")["model"]  # doctest: +SKIP
        >>> read_checkpoint_entries("run/model_0001000", "extra.iteration")  # doctest: +SKIP
        {'extra': {'iteration': 1000}}
    """
    resolved, reader = open_sharded_checkpoint(src, storage_options, allow_unsafe_pickle=allow_unsafe_pickle)
    with reader:
        selected = select_items(reader.items.values(), prefix)
        if not selected:
            roots = sorted({str(item.path[0]) for item in reader.items.values()})
            raise IncompatibleCheckpointError(
                f"{resolved.location.url} holds nothing under {prefix!r}; its top-level entries are {roots}. "
                "Pass one of them or a full key such as 'model.<parameter name>' (see `stmixer-ckpt inspect`)."
            )
        ours = is_checkpointer_layout(list(reader.items.values()))
        root: dict[Any, Any] = {}
        for item in selected:
            if item.is_tensor:
                value = reader.read_tensor(item)
            else:
                packed = reader.read_object(item) if ours and item.path[0] in PACKED_ROOTS else None
                value = load_object(reader, item, packed)
            insert_at_path(root, item.path, value)
        return root
