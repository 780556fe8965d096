"""Single-file ``.pth`` checkpoints written by the upstream ``Checkpointer``.

STMixer and AlphAction saved ``torch.save({"model", "optimizer", "scheduler",
"iteration", "person_pool", ...})`` to one file per checkpoint. Reading those
files safely is the point of this module: since torch 2.6 a plain
``torch.load`` refuses the pickled ``MemoryPool``, and ``weights_only=False``
would let any downloaded file run code. :func:`load_legacy_checkpoint` goes
through :func:`~stmixer_dist_ckpt.safe_pickle.safe_torch_load`, whose allow
list maps ``alphaction.structures.memory_pool.MemoryPool`` onto our own
:class:`~stmixer_dist_ckpt.memory_pool.MemoryPool`, so the AlphAction package
need not be installed.

It also normalizes the shapes of file that upstream's ``ActionCheckpointer``
accepted into the one shape the rest of the library reads, a dict with a
``"model"`` state dict.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from collections.abc import Iterable, Mapping
from typing import IO, Any

import torch

from ..errors import CheckpointError, CheckpointNotFoundError
from ..safe_pickle import safe_torch_load

__all__ = [
    "BACKBONE_PREFIX",
    "TORCH_ZIP_MAGIC",
    "PathOrStream",
    "is_torch_zip",
    "load_legacy_checkpoint",
]

logger = logging.getLogger(__name__)

PathOrStream = str | os.PathLike[str] | IO[bytes]
"""A local path or an open binary stream (e.g. from ``fsspec.open(url, "rb")``)."""

TORCH_ZIP_MAGIC = b"PK\x03\x04"
"""First bytes of every ``torch.save`` file since torch 1.6 (a zip archive)."""

BACKBONE_PREFIX = "backbone."
"""Where STMixer puts weights found under a ``"module"`` key (VideoMAE/DeepSpeed files)."""

_MODEL = "model"
_MODULE = "module"


def _read_head(path_or_stream: PathOrStream, size: int) -> bytes:
    """Read the first ``size`` bytes without consuming them from a stream."""
    if isinstance(path_or_stream, (str, os.PathLike)):
        with open(path_or_stream, "rb") as f:
            return f.read(size)
    if not path_or_stream.seekable():
        raise CheckpointError(
            "cannot sniff the format of a non-seekable stream without consuming it; "
            "read it into io.BytesIO first"
        )
    position = path_or_stream.tell()
    try:
        return path_or_stream.read(size)
    finally:
        path_or_stream.seek(position)


def is_torch_zip(path_or_stream: PathOrStream) -> bool:
    """Whether a file starts like a ``torch.save`` zip archive.

    Used to catch ``.pth`` files that were renamed ``.pkl`` (PySlowFast model
    zoo downloads, SlowFast issues #69 and #85), which otherwise fail deep in
    the unpickler with "unpickling stack underflow" or a UTF-8 decode error.
    A stream is read from its current position, and left there.

    Args:
        path_or_stream: a local path or a seekable binary stream.

    Returns:
        True when the first four bytes are the zip local-file-header magic.

    Raises:
        CheckpointError: the stream cannot seek, so peeking would consume it.

    Example:
        >>> import io, torch
        >>> buffer = io.BytesIO()
        >>> torch.save({"w": torch.zeros(1)}, buffer)
        >>> _ = buffer.seek(0)
        >>> is_torch_zip(buffer)
        True
    """
    return _read_head(path_or_stream, len(TORCH_ZIP_MAGIC)) == TORCH_ZIP_MAGIC


def _backbone_keys(module_sd: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Re-key a ``"module"`` state dict under ``backbone.`` as STMixer HEAD does.

    Upstream prefixed every key unconditionally, so a file saved from a whole
    detector (keys already ``backbone.*`` next to ``stm_head.*``) became
    ``backbone.backbone.*`` and silently matched nothing. A file where any key
    already starts with ``backbone.`` is therefore taken as model-rooted and
    left as it is.
    """
    if any(str(key).startswith(BACKBONE_PREFIX) for key in module_sd):
        logger.info(
            "%s: weights under 'module' already carry the %r prefix; using their keys unchanged",
            source,
            BACKBONE_PREFIX,
        )
        return dict(module_sd)
    return {BACKBONE_PREFIX + str(key): value for key, value in module_sd.items()}


def _describe_keys(keys: Iterable[Any], limit: int = 20) -> str:
    names = [repr(key) for key in keys]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return "[" + ", ".join(names[:limit]) + more + "]"


def _normalize(data: Any, source: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise CheckpointError(
            f"{source}: expected a dict (a checkpoint or a state dict), found {type(data).__name__}. "
            "Files holding a whole pickled nn.Module are not supported: load them in the code that "
            "defined the model and save model.state_dict() instead."
        )
    if not data:
        raise CheckpointError(f"{source}: the file holds an empty dict; there are no weights to load.")
    if _MODEL in data:
        if not isinstance(data[_MODEL], Mapping):
            raise CheckpointError(
                f"{source}: 'model' holds a {type(data[_MODEL]).__name__}, not a state dict."
            )
        return dict(data)
    if _MODULE in data and isinstance(data[_MODULE], Mapping):
        dropped = [key for key in data if key != _MODULE]
        if dropped:
            # DeepSpeed/VideoMAE training state (optimizer, steps) has no
            # counterpart here; passing an optimizer dict of another shape on
            # would fail later and less clearly. STMixer also kept only weights.
            logger.info("%s: using only 'module' as the model; ignoring %s", source, _describe_keys(dropped))
        return {_MODEL: _backbone_keys(data[_MODULE], source)}
    if all(isinstance(value, torch.Tensor) for value in data.values()):
        return {_MODEL: dict(data)}
    raise CheckpointError(
        f"{source}: cannot find model weights. Expected a 'model' key (an upstream Checkpointer "
        "file), a 'module' key (VideoMAE/DeepSpeed) or a bare state dict whose values are all "
        f"tensors; found top-level keys {_describe_keys(data)}. Re-save the weights as "
        "{'model': state_dict}."
    )


def load_legacy_checkpoint(
    path_or_stream: PathOrStream,
    *,
    source: str,
    allow_unsafe_pickle: bool = False,
) -> dict[str, Any]:
    """Load an upstream single-file checkpoint as ``{"model": state_dict, ...}``.

    Accepted shapes, checked in this order:

    * ``{"model": ..., "optimizer": ..., "iteration": ..., "person_pool": ...}``
      from the upstream ``Checkpointer``: returned as is (a shallow copy).
      ``person_pool`` comes back as our ``MemoryPool``.
    * ``{"module": state_dict, ...}`` (VideoMAE/DeepSpeed): ``{"model": ...}``
      with every key under ``backbone.``, unless some key already is; the other
      top-level entries are dropped and logged.
    * a bare state dict (every value a tensor): wrapped as ``{"model": sd}``.

    A non-seekable stream is read into memory first, since torch needs to seek.
    Keys are not otherwise touched; a ``module.`` prefix from DDP is left for
    :func:`~stmixer_dist_ckpt.legacy.key_matching.match_state_dict` to strip.
    Tensors are loaded onto the CPU.

    Args:
        path_or_stream: a local path or an open binary stream.
        source: the file name used in error messages.
        allow_unsafe_pickle: unpickle without the allow list. Only for files you
            trust completely: a pickle can run arbitrary code while loading.

    Returns:
        A new dict with at least a ``"model"`` key.

    Raises:
        CheckpointNotFoundError: the path does not exist.
        UnsafeCheckpointError: the file needs a class that is not allowed.
        CheckpointError: the file is not a torch checkpoint, or holds no weights
            in any of the shapes above.

    Example:
        >>> import io, torch
        >>> buffer = io.BytesIO()
        >>> torch.save({"conv.weight": torch.ones(1)}, buffer)
        >>> _ = buffer.seek(0)
        >>> list(load_legacy_checkpoint(buffer, source="bare.pth")["model"])
        ['conv.weight']
    """
    target: str | IO[bytes]
    if isinstance(path_or_stream, (str, os.PathLike)):
        target = os.fspath(path_or_stream)
        if not os.path.isfile(target):
            raise CheckpointNotFoundError(f"{source}: no such checkpoint file: {target!r}")
    elif not path_or_stream.seekable():
        # torch.load seeks to read the zip directory; a pipe or an HTTP body cannot.
        target = io.BytesIO(path_or_stream.read())
    else:
        target = path_or_stream
    try:
        data = safe_torch_load(target, source=source, allow_unsafe_pickle=allow_unsafe_pickle)
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        # A truncated zip, a Caffe2 pickle or random bytes surface as one of
        # these from deep inside torch.load; name the file and the likely fix.
        raise CheckpointError(
            f"{source}: not a readable torch checkpoint ({type(e).__name__}: {e}). If it is a "
            "Caffe2 .pkl, load it with load_c2_state_dict; if it was truncated, copy it again."
        ) from e
    return _normalize(data, source)
