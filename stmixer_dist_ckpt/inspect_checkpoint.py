"""What a checkpoint holds and what a run directory holds: the data behind ``inspect`` and ``ls``.

Both only read metadata: DCP's ``.metadata``, our ``manifest.json``, a
safetensors header, or a ``.pth`` memory-mapped so its tensors are never read.
The one exception is small stored objects (``iteration``, a scheduler state):
they are unpickled, with the allow list, to show their value.
"""

from __future__ import annotations

import datetime
import json
import pickle
import re
import struct
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ._dcp_index import StoredItem
from ._dcp_items import DcpItemReader, resolve_checkpoint_or_tag
from .errors import CheckpointError, CheckpointNotFoundError, IncompleteCheckpointError, UnsafeCheckpointError
from .layout import DATA_DIR_PREFIX, TAG_FILE, CheckpointKind, read_tag, resolve_checkpoint, resolve_tag
from .legacy.legacy_file import is_torch_zip
from .safe_pickle import safe_torch_load
from .storage import StorageLocation, resolve_location

__all__ = [
    "EntryInfo",
    "CheckpointInfo",
    "ListedCheckpoint",
    "SaveDirListing",
    "inspect_checkpoint",
    "list_checkpoints",
    "format_checkpoint_info",
    "format_listing",
]

#: Stored objects up to this size are unpickled to show their value.
_PREVIEW_LIMIT_BYTES = 64 * 1024
_CHECKPOINT_FILE_SUFFIXES = (".pth", ".pt", ".pkl", ".safetensors", ".bin")
_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


@dataclass(frozen=True, slots=True, kw_only=True)
class EntryInfo:
    """One stored leaf: a tensor (dtype, shape, bytes, chunks) or an object (its type and a preview)."""

    key: str
    kind: str
    dtype: str | None = None
    shape: list[int] | None = None
    nbytes: int = 0
    chunks: int = 1
    preview: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointInfo:
    """Everything ``stmixer-ckpt inspect`` shows (``to_dict`` is its ``--json``)."""

    url: str
    kind: str
    world_size: int | None = None
    writer_ranks: int | None = None
    layout: str | None = None
    created_unix: float | None = None
    versions: dict[str, str] = field(default_factory=dict)
    storage_bytes: int = 0
    files: int = 0
    contents: dict[str, Any] = field(default_factory=dict)
    extras: list[str] = field(default_factory=list)
    entries: list[EntryInfo] = field(default_factory=list)

    @property
    def tensor_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries if entry.kind == "tensor")

    def to_dict(self) -> dict[str, Any]:
        result = asdict(self)
        result["tensor_bytes"] = self.tensor_bytes
        return result


def _preview(value: Any) -> str:
    return _preview_text(repr(value), 80)


def _preview_text(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dcp_entry(reader: DcpItemReader, item: StoredItem, packed: bool) -> EntryInfo:
    if item.is_tensor:
        return EntryInfo(key=item.key, kind="tensor", dtype=str(item.dtype).removeprefix("torch."),
                         shape=list(item.shape or ()), nbytes=item.nbytes, chunks=len(item.chunks))
    preview = None
    if item.nbytes <= _PREVIEW_LIMIT_BYTES:
        try:
            value = reader.read_object(item)
            if packed and isinstance(value, (bytes, bytearray)):
                value = safe_torch_load(bytes(value), source=f"{reader.source} [{item.key}]")
            preview = _preview(value)
        except UnsafeCheckpointError as exc:  # a class not on the allow list: say which, instead of failing
            needs = exc.global_name or "a global that is not allowed"
            preview = f"<not shown: needs {needs}, not on the safe-load allow list; --allow-unsafe-pickle shows it>"
        except CheckpointError as exc:
            preview = f"<not shown: {_preview_text(str(exc).splitlines()[0])}>"
    return EntryInfo(key=item.key, kind="object", nbytes=item.nbytes, preview=preview)


def _inspect_sharded(location: StorageLocation, allow_unsafe_pickle: bool) -> CheckpointInfo:
    resolved = resolve_checkpoint_or_tag(location)
    if resolved.kind is CheckpointKind.FILE or resolved.data is None:
        return _inspect_file(resolved.location, allow_unsafe_pickle)
    with DcpItemReader(resolved.data, source=resolved.location.url, allow_unsafe_pickle=allow_unsafe_pickle) as reader:
        ours = resolved.manifest is not None
        entries = [_dcp_entry(reader, item, ours and item.path[0] in ("scheduler", "extra", "rank_state"))
                   for item in reader.items.values()]
        names = reader.data.listdir()
        ranks = {int(match.group(1)) for name in names if (match := _RANK_FILE.match(name))}
        versions = {"dcp_metadata": str(reader.metadata.version)} if reader.metadata.version else {}
    manifest = resolved.manifest
    if manifest is not None:
        return CheckpointInfo(
            url=resolved.location.url, kind=resolved.kind.value, world_size=manifest.world_size,
            writer_ranks=len(ranks), layout=manifest.layout, created_unix=manifest.created_unix,
            versions={**manifest.versions, "format_version": str(manifest.format_version), **versions},
            storage_bytes=manifest.total_bytes, files=len(manifest.files), contents=dict(manifest.contents),
            extras=list(manifest.contents.get("extra", [])), entries=entries,
        )
    sizes = [resolved.data.join(name).size() for name in names]
    return CheckpointInfo(
        url=resolved.location.url, kind=resolved.kind.value, writer_ranks=len(ranks), versions=versions,
        storage_bytes=sum(sizes), files=len(names), entries=entries,
    )


def _flatten(prefix: str, value: Any, out: list[EntryInfo]) -> None:
    if isinstance(value, torch.Tensor):
        out.append(EntryInfo(key=prefix, kind="tensor", dtype=str(value.dtype).removeprefix("torch."),
                             shape=list(value.shape), nbytes=value.numel() * value.element_size()))
    elif isinstance(value, Mapping) and value and all(isinstance(k, (str, int)) for k in value):
        for key, child in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), child, out)
    else:
        out.append(EntryInfo(key=prefix, kind="object", preview=_preview(value)))


def _inspect_file(location: StorageLocation, allow_unsafe_pickle: bool) -> CheckpointInfo:
    entries: list[EntryInfo] = []
    extras: list[str] = []
    if location.name.endswith(".safetensors"):
        with location.open("rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(stream.read(length))
        metadata = header.pop("__metadata__", {}) or {}
        for name, spec in header.items():
            begin, end = spec["data_offsets"]
            entries.append(EntryInfo(key=name, kind="tensor", dtype=spec["dtype"], shape=list(spec["shape"]),
                                     nbytes=int(end) - int(begin)))
        return CheckpointInfo(url=location.url, kind="safetensors", storage_bytes=location.size(), files=1,
                              contents={"metadata": metadata}, entries=entries)
    with location.open("rb") as stream:
        zipped = is_torch_zip(stream)
    try:
        if location.is_local and zipped:  # memory-mapped: the tensors' bytes are never read
            data = safe_torch_load(location.path, source=location.url, allow_unsafe_pickle=allow_unsafe_pickle, mmap=True)
        else:
            with location.open("rb") as stream:
                data = safe_torch_load(stream, source=location.url, allow_unsafe_pickle=allow_unsafe_pickle)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(
            f"{location.url} is neither a torch.save file nor safetensors ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); a Caffe2 .pkl converts with `stmixer-ckpt convert`"
        ) from exc
    _flatten("", data, entries)
    if isinstance(data, Mapping) and "model" in data:
        extras = [str(key) for key in data if key not in ("model", "optimizer", "scheduler")]
    return CheckpointInfo(url=location.url, kind="torch_file", storage_bytes=location.size(), files=1,
                          extras=extras, entries=entries)


def inspect_checkpoint(
    path: str, storage_options: Mapping[str, Any] | None = None, *, allow_unsafe_pickle: bool = False
) -> CheckpointInfo:
    """Describe the checkpoint at ``path`` without reading its tensors.

    Args:
        path: a committed checkpoint, a plain DCP directory, a ``save_dir``
            (its tagged checkpoint), a ``.pth`` or a ``.safetensors`` file.
        storage_options: fsspec options.
        allow_unsafe_pickle: unpickle stored objects without the allow list.

    Raises:
        CheckpointNotFoundError: nothing is at ``path``.
        IncompleteCheckpointError: a directory that was never committed.

    Example:
        >>> info = inspect_checkpoint("run/model_0001000")  # doctest: +SKIP
        >>> info.world_size, info.layout, len(info.entries)  # doctest: +SKIP
        (4, 'fsdp2', 812)
    """
    return _inspect_sharded(resolve_location(path, storage_options), allow_unsafe_pickle)


@dataclass(frozen=True, slots=True, kw_only=True)
class ListedCheckpoint:
    """One checkpoint in a ``save_dir`` (``state``: ``complete``, ``incomplete`` or ``corrupt``)."""

    name: str
    url: str
    kind: str
    state: str
    tagged: bool
    size_bytes: int | None
    created_unix: float | None
    world_size: int | None = None
    problem: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SaveDirListing:
    """Everything ``stmixer-ckpt ls`` shows (``to_dict`` is its ``--json``)."""

    url: str
    tag: str
    tagged_name: str | None
    checkpoints: list[ListedCheckpoint]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _modified_unix(location: StorageLocation) -> float | None:
    try:
        info = location.fs.info(location.path)
    except (OSError, ValueError):
        return None
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
    return None


def _tree_size(location: StorageLocation) -> int | None:
    try:
        return int(location.fs.du(location.path, total=True))
    except (OSError, ValueError, TypeError):
        return None


def _list_entry(save_dir: StorageLocation, name: str, tagged_name: str | None) -> ListedCheckpoint | None:
    child = save_dir.join(name)
    common: dict[str, Any] = {"name": name, "url": child.url, "tagged": name == tagged_name}
    if child.isfile():
        if not name.endswith(_CHECKPOINT_FILE_SUFFIXES):
            return None  # logs, configs and metrics live beside checkpoints
        return ListedCheckpoint(**common, kind="file", state="complete", size_bytes=child.size(),
                                created_unix=_modified_unix(child))
    try:
        resolved = resolve_checkpoint(child)
    except IncompleteCheckpointError as exc:
        if not any(entry.startswith(DATA_DIR_PREFIX) for entry in child.listdir()):
            return None  # a directory that no save ever wrote to (e.g. STMixer's inference/)
        return ListedCheckpoint(**common, kind="committed", state="incomplete", size_bytes=_tree_size(child),
                                created_unix=_modified_unix(child), problem=str(exc).splitlines()[0])
    except CheckpointError as exc:
        return ListedCheckpoint(**common, kind="committed", state="corrupt", size_bytes=_tree_size(child),
                                created_unix=_modified_unix(child), problem=str(exc).splitlines()[0])
    if resolved.manifest is not None:
        return ListedCheckpoint(**common, kind=resolved.kind.value, state="complete",
                                size_bytes=resolved.manifest.total_bytes, created_unix=resolved.manifest.created_unix,
                                world_size=resolved.manifest.world_size)
    return ListedCheckpoint(**common, kind=resolved.kind.value, state="complete", size_bytes=_tree_size(child),
                            created_unix=_modified_unix(child.join(".metadata")))


def list_checkpoints(save_dir: str, storage_options: Mapping[str, Any] | None = None) -> SaveDirListing:
    """The checkpoints in a run directory: which one the tag names, which are complete, size, age.

    Raises:
        CheckpointNotFoundError: ``save_dir`` is not a directory.

    Example:
        >>> listing = list_checkpoints("run")  # doctest: +SKIP
        >>> [(c.name, c.state, c.tagged) for c in listing.checkpoints]  # doctest: +SKIP
        [('model_0000100', 'complete', False), ('model_0000200', 'complete', True)]
    """
    location = resolve_location(save_dir, storage_options)
    if not location.isdir():
        raise CheckpointNotFoundError(f"{location.url} is not a directory; pass the run's save_dir (OUTPUT_DIR)")
    tag = read_tag(location)
    tagged_name: str | None = None
    if tag:
        try:
            tagged_name = resolve_tag(location, tag).name
        except CheckpointError:
            tagged_name = None
    checkpoints = []
    for name in location.listdir():
        if name == TAG_FILE or name.startswith("."):
            continue
        entry = _list_entry(location, name, tagged_name)
        if entry is not None:
            checkpoints.append(entry)
    return SaveDirListing(url=location.url, tag=tag, tagged_name=tagged_name, checkpoints=checkpoints)


def _human_bytes(count: int | None) -> str:
    if count is None:
        return "?"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


def _human_age(created: float | None, now: float) -> str:
    if created is None:
        return "?"
    seconds = max(0.0, now - created)
    for limit, divisor, unit in ((60, 1, "s"), (3600, 60, "m"), (86400, 3600, "h")):
        if seconds < limit:
            return f"{seconds / divisor:.0f}{unit}"
    return f"{seconds / 86400:.0f}d"


def format_listing(listing: SaveDirListing, *, now: float | None = None) -> str:
    """``ls`` as text: one line per checkpoint, ``*`` marking the tagged one."""
    current = time.time() if now is None else now
    tag = f"last_checkpoint -> {listing.tag}" if listing.tag else "no last_checkpoint tag"
    lines = [f"{listing.url}  ({tag})"]
    if listing.tag and listing.tagged_name not in {c.name for c in listing.checkpoints}:
        lines.append("  warning: the tag names a checkpoint that is not here")
    lines.append(f"  {'':1} {'NAME':<28} {'STATE':<11} {'SIZE':>10} {'AGE':>6} {'RANKS':>5}")
    for c in listing.checkpoints:
        ranks = str(c.world_size) if c.world_size is not None else "-"
        lines.append(f"  {'*' if c.tagged else ' '} {c.name:<28} {c.state:<11} {_human_bytes(c.size_bytes):>10} "
                     f"{_human_age(c.created_unix, current):>6} {ranks:>5}")
    if not listing.checkpoints:
        lines.append("  (no checkpoints)")
    return "\n".join(lines)


def format_checkpoint_info(info: CheckpointInfo, *, max_entries: int | None = None) -> str:
    """``inspect`` as text: a header, then one line per stored entry."""
    lines = [info.url, f"  kind:      {info.kind}"]
    if info.world_size is not None or info.writer_ranks:
        saved = f"{info.world_size} rank(s)" if info.world_size is not None else f"data from {info.writer_ranks} rank(s)"
        layout = f", layout {info.layout}" if info.layout else ""
        when = ""
        if info.created_unix is not None:
            when = ", " + datetime.datetime.fromtimestamp(info.created_unix, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        lines.append(f"  saved by:  {saved}{layout}{when}")
    if info.versions:
        lines.append("  versions:  " + ", ".join(f"{k} {v}" for k, v in sorted(info.versions.items())))
    tensors = [e for e in info.entries if e.kind == "tensor"]
    lines.append(f"  size:      {_human_bytes(info.storage_bytes)} in {info.files} file(s); "
                 f"{len(tensors)} tensor(s), {_human_bytes(info.tensor_bytes)}")
    if info.extras:
        lines.append("  extras:    " + ", ".join(info.extras))
    shown = info.entries if max_entries is None else info.entries[:max_entries]
    width = max((len(e.key) for e in shown), default=10)
    for e in shown:
        if e.kind == "tensor":
            chunks = f"  ({e.chunks} chunks)" if e.chunks > 1 else ""
            lines.append(f"    {e.key:<{width}}  {e.dtype:<9} {e.shape!s:<20} {_human_bytes(e.nbytes):>10}{chunks}")
        else:
            lines.append(f"    {e.key:<{width}}  {'object':<9} {e.preview or ''}")
    if len(shown) < len(info.entries):
        lines.append(f"    ... {len(info.entries) - len(shown)} more (raise --limit, drop it to show all, or use --json)")
    return "\n".join(lines)
