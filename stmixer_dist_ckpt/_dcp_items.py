"""Items of a DCP checkpoint, read one at a time, without a process group.

``dcp.load`` needs a template state dict that already holds every tensor, and
``dcp_to_torch_save`` builds one for the whole checkpoint, so both keep the
full checkpoint in memory. Consolidation, partial reads and ``inspect`` only
ever need one item at a time. :class:`DcpItemReader` reads the metadata once,
then assembles any single tensor from its chunks (one per rank that held a
shard) straight from the data files, so memory stays near the largest tensor.

Each chunk in a ``.distcp`` file is a small ``torch.save`` archive at a known
offset; it is read through a bounded view of the open file (never the whole
file) and deserialized with :func:`~stmixer_dist_ckpt.safe_pickle.safe_torch_load`.
"""

from __future__ import annotations

import io
import pickle
import sys
from collections.abc import Mapping
from typing import IO, Any, cast

import torch
from torch.distributed.checkpoint.metadata import Metadata

from ._dcp import METADATA_FILE, read_checkpoint_metadata
from ._dcp_index import ChunkLocation, StoredItem, index_items
from ._torch_format import archive_byte_order, storage_record_offset
from .errors import CheckpointError, CorruptCheckpointError, StorageError
from .layout import (
    CheckpointKind,
    ResolvedCheckpoint,
    is_run_directory,
    read_tag,
    resolve_checkpoint,
    resolve_tag,
)
from .manifest import MANIFEST_FILE
from .safe_pickle import safe_torch_load
from .storage import StorageLocation, resolve_location

__all__ = ["DcpItemReader", "TensorBuffer", "resolve_checkpoint_or_tag", "open_sharded_checkpoint"]

class _RangeView(io.RawIOBase):
    """A read-only window ``[start, start + length)`` of an open file.

    ``torch.load`` finds a zip archive by reading from the *end* of what it is
    given; handing it the whole ``.distcp`` file would find the last item
    written there instead of this one.
    """

    def __init__(self, handle: IO[bytes], start: int, length: int) -> None:
        super().__init__()
        self._handle = handle
        self._start = start
        self._length = length
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = min(len(view), self._length - self._position)
        if count <= 0:
            return 0
        self._handle.seek(self._start + self._position)
        done = 0
        while done < count:
            got = self._handle.readinto(view[done:count])  # type: ignore[attr-defined]
            if not got:
                break
            done += got
        self._position += done
        return done


class DcpItemReader:
    """Reads single items of the DCP checkpoint in ``data`` (its ``.metadata`` and ``.distcp`` files).

    Args:
        data: the directory holding ``.metadata``.
        source: how to name the checkpoint in messages.
        allow_unsafe_pickle: unpickle objects without the allow list.

    Use as a context manager so the data files it opened are closed.
    """

    def __init__(self, data: StorageLocation, *, source: str | None = None, allow_unsafe_pickle: bool = False) -> None:
        self.data = data
        self.source = source or data.url
        self.allow_unsafe_pickle = allow_unsafe_pickle
        self.metadata: Metadata = read_checkpoint_metadata(data, allow_unsafe_pickle=allow_unsafe_pickle)
        self.items: dict[str, StoredItem] = index_items(self.metadata, self.source)
        self._handles: dict[str, IO[bytes]] = {}
        self._byte_order: dict[str, bool] = {}

    def __enter__(self) -> DcpItemReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.close()

    def files(self) -> set[str]:
        """The data files the metadata refers to."""
        return {chunk.file for item in self.items.values() for chunk in item.chunks}

    def check_complete(self, expected_sizes: Mapping[str, int] | None = None) -> None:
        """Fail before any output is written if data files are missing or truncated.

        Args:
            expected_sizes: file name -> size from our manifest, when there is one.

        Raises:
            CorruptCheckpointError: a referenced file is missing, shorter than an
                item inside it, or differs in size from the manifest.
        """
        present = set(self.data.listdir())
        missing = sorted(self.files() - present)
        if missing:
            raise CorruptCheckpointError(
                f"{self.source} is incomplete: its metadata refers to {missing}, which are not in {self.data.url}; "
                "copy the whole checkpoint directory again"
            )
        ends: dict[str, int] = {}
        for item in self.items.values():
            for chunk in item.chunks:
                ends[chunk.file] = max(ends.get(chunk.file, 0), chunk.start + chunk.length)
        for name, end in sorted(ends.items()):
            size = self.data.join(name).size()
            expected = (expected_sizes or {}).get(name)
            if size < end or (expected is not None and size != expected):
                want = expected if expected is not None else f">= {end}"
                raise CorruptCheckpointError(
                    f"{self.data.join(name).url} holds {size} bytes but the checkpoint needs {want}: the file is "
                    "truncated or was replaced; copy the checkpoint again"
                )

    # ---------------------------------------------------------------- reads
    def _handle(self, name: str) -> IO[bytes]:
        handle = self._handles.get(name)
        if handle is None:
            location = self.data.join(name)  # refuses names with '/' or '..' read from metadata
            try:
                if location.is_local:
                    handle = open(location.path, "rb", buffering=0)  # closed in close()
                else:
                    handle = location.open("rb")
            except FileNotFoundError as exc:
                raise CorruptCheckpointError(f"{location.url} is missing; copy the checkpoint again") from exc
            except OSError as exc:
                raise StorageError(f"could not open {location.url}: {exc}") from exc
            self._handles[name] = handle
        return handle

    def _view(self, chunk: ChunkLocation) -> IO[bytes]:
        return cast(IO[bytes], _RangeView(self._handle(chunk.file), chunk.start, chunk.length))

    def _load_chunk(self, item: StoredItem, chunk: ChunkLocation, *, map_location: str = "cpu") -> Any:
        view = self._view(chunk)
        try:
            return safe_torch_load(
                view,
                source=f"{self.source} [{item.key}]",
                map_location=map_location,
                allow_unsafe_pickle=self.allow_unsafe_pickle,
            )
        except CheckpointError:
            raise
        except OSError as exc:
            raise StorageError(f"reading {self.data.join(chunk.file).url} failed: {exc}") from exc
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            # torch reports a damaged archive as e.g. "PytorchStreamReader failed reading zip archive".
            raise CorruptCheckpointError(
                f"{self.data.join(chunk.file).url}: the item {item.key!r} at offset {chunk.start} is unreadable "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the file is damaged, "
                "copy the checkpoint again"
            ) from exc

    def globals_refused_by_weights_only(self, item: StoredItem) -> list[str]:
        """Classes or functions a pickled item needs that ``torch.load(weights_only=True)`` would refuse.

        Only the item's pickle record is read; nothing is deserialized.
        """
        chunk = item.chunks[0]
        view = self._view(chunk)
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(view))

    def read_object(self, item: StoredItem) -> Any:
        """A pickled (non-tensor) item, deserialized with the allow list."""
        if item.is_tensor:
            raise TypeError(f"{item.key} is a tensor; use read_tensor")
        return self._load_chunk(item, item.chunks[0])

    def read_tensor(self, item: StoredItem, buffer: TensorBuffer | None = None) -> torch.Tensor:
        """The full tensor of ``item``, assembled from its chunks (contiguous, on the CPU).

        Args:
            buffer: reuse this memory for the result, which then stays valid
                only until the buffer's next use. Without one, a new tensor.
        """
        if item.dtype is None or item.shape is None:
            raise TypeError(f"{item.key} is not a tensor; use read_object")
        shape = item.shape
        out = buffer.tensor(item.dtype, shape) if buffer is not None else torch.empty(shape, dtype=item.dtype)
        for chunk in item.chunks:
            region = out[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))]
            # A chunk spanning whole rows (one rank's Shard(0) piece, or the whole tensor) is one
            # contiguous byte range of the result: read it there directly, with no second buffer.
            direct = chunk.sizes[1:] == shape[1:] and not any(chunk.offsets[1:])
            if not (direct and self._read_chunk_into(item, chunk, region)):
                piece = self._load_chunk(item, chunk)
                _check_piece(self.source, item, chunk, piece)
                region.copy_(piece)
                del piece
        return out

    def _read_chunk_into(self, item: StoredItem, chunk: ChunkLocation, region: torch.Tensor) -> bool:
        """Copy a chunk's stored bytes into ``region``; ``False`` when it is not a plain contiguous tensor.

        The chunk's archive is read with ``map_location="meta"``, which parses
        only its pickle and reports where the storage record starts; the bytes
        then go from the file straight into ``region``.
        """
        if region.numel() == 0:
            return True
        meta = self._load_chunk(item, chunk, map_location="meta")
        _check_piece(self.source, item, chunk, meta)
        offset = storage_record_offset(meta)
        plain = meta.is_contiguous() and meta.storage_offset() == 0 and meta.untyped_storage().nbytes() == region.nbytes
        if offset is None or not plain or not self._native_byte_order(chunk):
            return False
        target = region.reshape(-1).view(torch.uint8).numpy().data.cast("B")
        handle = self._handle(chunk.file)
        handle.seek(chunk.start + offset)
        done = 0
        while done < len(target):
            got = handle.readinto(target[done:])  # type: ignore[attr-defined]
            if not got:
                raise CorruptCheckpointError(
                    f"{self.data.join(chunk.file).url}: {item.key!r} ends {len(target) - done} bytes early; "
                    "the file is truncated, copy the checkpoint again"
                )
            done += got
        return True

    def _native_byte_order(self, chunk: ChunkLocation) -> bool:
        # Every item in one data file was written by one process, so one look per file is enough.
        if chunk.file not in self._byte_order:
            view = self._view(chunk)
            self._byte_order[chunk.file] = archive_byte_order(view) == sys.byteorder
        return self._byte_order[chunk.file]


class TensorBuffer:
    """One block of memory reused for every tensor read through it.

    Streaming a checkpoint reads thousands of tensors one after another. A new
    allocation for each lets the C allocator keep freed blocks mapped, so the
    peak grows to two or three of the largest tensor; reusing one block keeps
    it at one and skips re-faulting its pages for every tensor.
    """

    def __init__(self) -> None:
        self._block = torch.empty(0, dtype=torch.uint8)

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor of ``dtype``/``shape`` over the block; valid until the next call."""
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel * dtype.itemsize
        if self._block.numel() < nbytes:
            self._block = torch.empty(0, dtype=torch.uint8)  # release before allocating the larger one
            self._block = torch.empty(nbytes, dtype=torch.uint8)
        return self._block[:nbytes].view(dtype).view(shape)


def _check_piece(source: str, item: StoredItem, chunk: ChunkLocation, piece: Any) -> None:
    if not isinstance(piece, torch.Tensor) or tuple(piece.shape) != chunk.sizes or piece.dtype != item.dtype:
        found = f"{piece.dtype}{tuple(piece.shape)}" if isinstance(piece, torch.Tensor) else type(piece).__name__
        raise CorruptCheckpointError(
            f"{source} [{item.key}]: the chunk at offsets {chunk.offsets} should be a {item.dtype} tensor of shape "
            f"{chunk.sizes}, found {found}; the checkpoint's metadata and data disagree"
        )


def resolve_checkpoint_or_tag(location: StorageLocation) -> ResolvedCheckpoint:
    """Like :func:`~stmixer_dist_ckpt.layout.resolve_checkpoint`, but a ``save_dir`` means its tagged checkpoint.

    A run directory holds ``last_checkpoint`` and no manifest or DCP metadata
    of its own; pointing a tool at it means "the latest checkpoint".
    """
    if is_run_directory(location):
        content = read_tag(location)
        if content:
            return resolve_checkpoint(resolve_tag(location, content))
    return resolve_checkpoint(location)


def open_sharded_checkpoint(
    path: str, storage_options: Mapping[str, Any] | None = None, *, allow_unsafe_pickle: bool = False
) -> tuple[ResolvedCheckpoint, DcpItemReader]:
    """Find the sharded checkpoint at ``path`` (a checkpoint, a DCP directory, or a save_dir) and open it.

    Raises:
        CheckpointNotFoundError: nothing is there.
        IncompleteCheckpointError: a directory that was never committed.
        CheckpointError: ``path`` is a single file, not a sharded checkpoint.
    """
    resolved = resolve_checkpoint_or_tag(resolve_location(path, storage_options))
    if resolved.kind is CheckpointKind.FILE or resolved.data is None:
        raise CheckpointError(
            f"{resolved.location.url} is a single file, not a sharded checkpoint (a directory with "
            f"{MANIFEST_FILE} or {METADATA_FILE}); load it with Checkpointer.load or torch.load"
        )
    reader = DcpItemReader(resolved.data, source=resolved.location.url, allow_unsafe_pickle=allow_unsafe_pickle)
    return resolved, reader
