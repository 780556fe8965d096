"""The items of a DCP checkpoint as its metadata describes them: key, nesting, dtype, shape, chunks.

DCP's ``.metadata`` holds, per flattened key, the tensor's global shape and the
chunks the ranks stored (offsets and sizes); ``storage_data`` says where each
chunk's bytes live and ``planner_data`` how keys nested in the original state
dict. :func:`index_items` joins the three and checks that every tensor is
fully covered, so a missing rank's data is reported before anything is read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

from .errors import CorruptCheckpointError

__all__ = ["PathPart", "ChunkLocation", "StoredItem", "index_items", "select_items", "insert_at_path"]

PathPart = str | int


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkLocation:
    """Where one chunk of a stored item lives: its place in the tensor and its byte range on storage."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    start: int
    length: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredItem:
    """One leaf of the saved state dict.

    Attributes:
        key: the flattened DCP key (``model.backbone.conv.weight``).
        path: the leaf's place in the original nested state dict
            (``("model", "backbone.conv.weight")``); ints are list positions.
        dtype: the tensor's dtype; ``None`` for pickled objects.
        shape: the tensor's global shape; ``None`` for pickled objects.
        chunks: the stored pieces (a tensor saved by N ranks has up to N).
    """

    key: str
    path: tuple[PathPart, ...]
    dtype: torch.dtype | None
    shape: tuple[int, ...] | None
    chunks: tuple[ChunkLocation, ...]

    @property
    def is_tensor(self) -> bool:
        return self.dtype is not None

    @property
    def nbytes(self) -> int:
        """The tensor's size in memory, or the stored size of an object."""
        if self.dtype is not None and self.shape is not None:
            numel = 1
            for dim in self.shape:
                numel *= dim
            return numel * self.dtype.itemsize
        return sum(chunk.length for chunk in self.chunks)


def select_items(items: Iterable[StoredItem], prefix: str | None) -> list[StoredItem]:
    """The items whose key is ``prefix`` or lies below it at a dot boundary.

    ``model.fc`` selects ``model.fc.weight`` and ``model.fc.bias`` but not
    ``model.fc2.weight``; ``None`` or ``""`` selects everything.
    """
    if not prefix:
        return list(items)
    return [item for item in items if item.key == prefix or item.key.startswith(prefix + ".")]


def insert_at_path(root: dict[PathPart, Any], path: tuple[PathPart, ...], value: Any) -> None:
    """Put ``value`` at ``path`` inside ``root``, creating dicts (and lists for int parts) on the way.

    Mirrors how DCP itself unflattens, so the structure matches what
    ``dcp.load`` would rebuild.
    """
    node: Any = root
    for position, part in enumerate(path):
        last = position == len(path) - 1
        child: Any = value if last else ([] if isinstance(path[position + 1], int) else {})
        if isinstance(node, list):
            if not isinstance(part, int):
                raise CorruptCheckpointError(f"stored path {path!r} uses {part!r} as a list position")
            node.extend([None] * (part + 1 - len(node)))
            if last or node[part] is None:
                node[part] = child
            node = node[part]
        else:
            if last:
                node[part] = child
            node = node.setdefault(part, child)


def index_items(metadata: Metadata, source: str) -> dict[str, StoredItem]:
    planner_data = metadata.planner_data if isinstance(metadata.planner_data, Mapping) else {}
    storage = metadata.storage_data if isinstance(metadata.storage_data, Mapping) else {}
    by_key: dict[str, dict[tuple[int, ...], Any]] = {}
    for index, info in storage.items():
        if getattr(info, "transform_descriptors", None):
            raise CorruptCheckpointError(
                f"{source} [{index.fqn}] is stored with transforms {list(info.transform_descriptors)} "
                "(e.g. compression), which this reader does not support; use dcp.load instead"
            )
        if str(info.relative_path).endswith(".safetensors"):
            raise CorruptCheckpointError(
                f"{source} stores its data as safetensors (HuggingFaceStorageWriter); only the torch.save "
                "layout of FileSystemWriter/FsspecWriter is supported here"
            )
        offset = tuple(int(x) for x in index.offset) if index.offset is not None else ()
        by_key.setdefault(index.fqn, {})[offset] = info
    items: dict[str, StoredItem] = {}
    for key, meta in metadata.state_dict_metadata.items():
        raw_path = planner_data.get(key, (key,))
        path = tuple(part if isinstance(part, int) else str(part) for part in raw_path)
        stored = by_key.get(key, {})
        if isinstance(meta, TensorStorageMetadata):
            shape = tuple(int(x) for x in meta.size)
            chunks = []
            covered = 0
            for chunk in meta.chunks:
                offsets = tuple(int(x) for x in chunk.offsets)
                sizes = tuple(int(x) for x in chunk.sizes)
                info = stored.get(offsets)
                if info is None:
                    raise CorruptCheckpointError(f"{source} [{key}]: no stored data for the chunk at offsets {offsets}")
                chunks.append(_chunk(offsets, sizes, info))
                count = 1
                for size in sizes:
                    count *= size
                covered += count
            numel = 1
            for dim in shape:
                numel *= dim
            if covered != numel:
                raise CorruptCheckpointError(
                    f"{source} [{key}]: its chunks hold {covered} of {numel} elements; the checkpoint is "
                    "incomplete (a rank's data is missing)"
                )
            dtype = meta.properties.dtype
            items[key] = StoredItem(key=key, path=path, dtype=dtype, shape=shape, chunks=tuple(chunks))
        elif isinstance(meta, BytesStorageMetadata):
            info = stored.get(())
            if info is None:
                raise CorruptCheckpointError(f"{source} [{key}]: the metadata names it but no data was stored")
            items[key] = StoredItem(key=key, path=path, dtype=None, shape=None, chunks=(_chunk((), (), info),))
    return items


def _chunk(offsets: tuple[int, ...], sizes: tuple[int, ...], info: Any) -> ChunkLocation:
    name = os.fspath(info.relative_path)
    return ChunkLocation(offsets=offsets, sizes=sizes, file=name, start=int(info.offset), length=int(info.length))
