"""Caffe2 ``.pkl`` weights to our sharded, committed checkpoint format, offline.

Converting once, ahead of a large job, means the job loads a DCP checkpoint
that every rank reads its own slice of, and nobody unpickles a 200 MB Python 2
file at start-up. The output is what :meth:`Checkpointer.save` writes: a
checkpoint directory with ``manifest.json`` (the commit marker, written last)
and one ``data-<token>/`` DCP directory holding ``{"model": state_dict}``, so
``Checkpointer.load(dst)`` and every ``stmixer-ckpt`` subcommand read it.

The file itself is read with :func:`~stmixer_dist_ckpt.legacy.c2_pickle.load_c2_state_dict`
(restricted unpickler, ``latin1``, PySlowFast names plus ``backbone.``, or a
model-provided weight map); :func:`open_weight_file` is shared with
:class:`~stmixer_dist_ckpt.action_checkpointer.ActionCheckpointer`, which reads
the same files on rank 0.
"""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import torch

from . import collective
from .commit import contents_of, write_offline_checkpoint
from .errors import CheckpointError, CheckpointExistsError, CheckpointNotFoundError
from .layout import validate_checkpoint_name
from .legacy.c2_pickle import load_c2_state_dict
from .storage import StorageLocation, resolve_location

__all__ = [
    "C2Conversion",
    "NUM_BATCHES_TRACKED",
    "add_num_batches_tracked",
    "convert_c2_to_sharded",
    "open_weight_file",
]

logger = logging.getLogger(__name__)

NUM_BATCHES_TRACKED = "num_batches_tracked"
"""BatchNorm's step counter: a buffer PyTorch has and no Caffe2 file holds."""

_RUNNING_MEAN = ".running_mean"
# Below this size a bar would flash by; above it, reading from shared storage takes a while.
_AUTO_PROGRESS_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class C2Conversion:
    """What :func:`convert_c2_to_sharded` wrote.

    Attributes:
        checkpoint: URL of the committed checkpoint directory.
        source: URL of the ``.pkl`` that was read.
        num_tensors: model tensors written, ``num_batches_tracked`` included.
        num_bytes: bytes of tensor data written.
        added_num_batches_tracked: ``num_batches_tracked`` buffers added, one per
            BatchNorm found in the file.
    """

    checkpoint: str
    source: str
    num_tensors: int
    num_bytes: int
    added_num_batches_tracked: int


class _ProgressRaw(io.RawIOBase):
    """A read-only stream that advances a tqdm bar as bytes are consumed.

    Wrapped in ``io.BufferedReader`` so the unpickler's many small reads and
    ``readline`` calls stay cheap; the bar follows the position, so the zip
    sniff's seek back does not inflate it.
    """

    def __init__(self, inner: IO[bytes], bar: Any) -> None:
        super().__init__()
        self._inner = inner
        self._bar = bar

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return bool(self._inner.seekable())

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._inner.read(view.nbytes)
        view[: len(data)] = data
        self._advance()
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        position = int(self._inner.seek(offset, whence))
        self._advance()
        return position

    def tell(self) -> int:
        return int(self._inner.tell())

    def _advance(self) -> None:
        self._bar.update(self._inner.tell() - self._bar.n)


def _wants_progress(progress: bool | None, size: int) -> bool:
    if progress is not None:
        return progress
    return size >= _AUTO_PROGRESS_BYTES and sys.stderr.isatty()


@contextmanager
def open_weight_file(
    url: str, *, storage_options: Mapping[str, Any] | None = None, progress: bool | None = False
) -> Iterator[IO[bytes]]:
    """Open a weight file for reading, with an optional progress bar on stderr.

    Args:
        url: a local path or fsspec URL.
        storage_options: fsspec options for ``url``.
        progress: ``True`` always shows a tqdm bar, ``False`` never, ``None``
            when the file is at least 16 MiB and stderr is a terminal.

    Yields:
        A seekable binary stream.

    Raises:
        CheckpointNotFoundError: nothing is at ``url``.
    """
    location = resolve_location(url, storage_options)
    if not location.isfile():
        raise CheckpointNotFoundError(
            f"no weight file at {location.url}; check the path (cfg.MODEL.WEIGHT or the argument to load())"
        )
    size = location.size()
    with location.open("rb") as stream:
        if not _wants_progress(progress, size):
            yield stream
            return
        from tqdm import tqdm

        with tqdm(
            total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"reading {location.name}"
        ) as bar:
            with io.BufferedReader(_ProgressRaw(stream, bar), buffer_size=1 << 20) as buffered:
                yield buffered


def add_num_batches_tracked(state_dict: dict[str, torch.Tensor], value: int) -> int:
    """Give every BatchNorm in ``state_dict`` a ``num_batches_tracked`` buffer, in place.

    A BatchNorm is recognized by its ``running_mean``. ``0`` is what a freshly
    built model holds and what a Caffe2 load leaves in place, so writing it
    makes the converted checkpoint load strictly without changing any result.

    Returns:
        How many buffers were added (existing ones are kept).
    """
    added = 0
    for key in [k for k in state_dict if k.endswith(_RUNNING_MEAN)]:
        counter = key[: -len(_RUNNING_MEAN)] + "." + NUM_BATCHES_TRACKED
        if counter not in state_dict:
            state_dict[counter] = torch.tensor(value, dtype=torch.long)
            added += 1
    return added


def _prepare_destination(destination: StorageLocation, overwrite: bool) -> None:
    if destination.isfile():
        raise CheckpointExistsError(
            f"{destination.url} is a file; the destination of a conversion is a checkpoint directory"
        )
    entries = destination.listdir() if destination.isdir() else []
    if entries and not overwrite:
        raise CheckpointExistsError(
            f"{destination.url} already exists and is not empty ({len(entries)} entries); choose a new "
            "directory or pass overwrite=True (the old data is removed only after the new one is committed)"
        )


def convert_c2_to_sharded(
    src_pkl: str,
    dst_dir: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    weight_map: Mapping[str, str] | None = None,
    progress: bool | None = None,
    num_batches_tracked: int | None = 0,
    overwrite: bool = False,
) -> C2Conversion:
    """Convert a Caffe2/Detectron ``.pkl`` into a committed sharded checkpoint.

    Single-process and not collective: run it from the CLI or before
    ``init_process_group``. The checkpoint holds only model weights, keyed as
    STMixer's model names them (``backbone.s2.pathway0_res0.branch2.a.weight``),
    or by ``weight_map``'s keys. Loading it into STMixer needs ``no_head=True``
    (the file has no ``stm_head``) and, when the file carries ``pred_*``
    (``backbone.head.projection.*``, which STMixer lacks), ``strict=False``.

    Args:
        src_pkl: the ``.pkl`` to read (local path or fsspec URL).
        dst_dir: the checkpoint directory to create, e.g. ``run/model_c2init``;
            its basename becomes the manifest's checkpoint name.
        storage_options: fsspec options for both paths.
        weight_map: ``{model_key: c2_blob_name}`` (AlphAction's
            ``model.c2_weight_mapping()``) instead of the PySlowFast rename rules.
        progress: tqdm bar while reading: ``None`` for large files when stderr
            is a terminal, or force it on/off.
        num_batches_tracked: value stored for each BatchNorm's
            ``num_batches_tracked`` (absent from Caffe2 files); ``None`` stores
            none, and a strict load then reports them missing.
        overwrite: replace a non-empty ``dst_dir``; the new data is committed
            before the old is deleted.

    Returns:
        A :class:`C2Conversion` summary.

    Raises:
        CheckpointNotFoundError: ``src_pkl`` does not exist.
        CheckpointExistsError: ``dst_dir`` is a file, or is not empty and
            ``overwrite`` is not set.
        CheckpointError: ``src_pkl`` is not a Caffe2 weight file, or a process
            group with several ranks is running.

    Example:
        >>> result = convert_c2_to_sharded("SLOWFAST_8x8_R50.pkl", "run/c2_init")  # doctest: +SKIP
        >>> Checkpointer(model).load(result.checkpoint, no_head=True, strict=False)  # doctest: +SKIP
    """
    if collective.get_world_size() > 1:
        raise CheckpointError(
            "convert_c2_to_sharded writes from one process and is not collective; call it before "
            "init_process_group or use `stmixer-ckpt convert`. To load a .pkl on all ranks, use "
            "ActionCheckpointer.load(path), which reads it on rank 0 and broadcasts."
        )
    started = time.perf_counter()
    destination = resolve_location(dst_dir, storage_options)
    validate_checkpoint_name(destination.name)
    _prepare_destination(destination, overwrite)
    with open_weight_file(src_pkl, storage_options=storage_options, progress=progress) as stream:
        source = resolve_location(src_pkl, storage_options).url
        weights = load_c2_state_dict(stream, source=source, weight_map=weight_map)
    added = add_num_batches_tracked(weights, num_batches_tracked) if num_batches_tracked is not None else 0

    contents = contents_of({"model": weights})
    contents["converted_from"] = {"format": "caffe2-pkl", "source": source}
    write_offline_checkpoint({"model": weights}, destination, contents=contents)
    num_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    logger.info(
        "Converted %s -> %s: %d tensors, %.1f MB in %.2f s",
        source,
        destination.url,
        len(weights),
        num_bytes / 1e6,
        time.perf_counter() - started,
    )
    return C2Conversion(
        checkpoint=destination.url,
        source=source,
        num_tensors=len(weights),
        num_bytes=num_bytes,
        added_num_batches_tracked=added,
    )
