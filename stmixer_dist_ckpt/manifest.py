"""The manifest: what a committed checkpoint contains, written last as its commit marker.

A checkpoint directory ``<save_dir>/<name>/`` holds ``manifest.json`` and one
data directory ``data-<token>/`` with the DCP files. The manifest names that
data directory and records every file's size and XXH3-64 checksum, the world size and
parallel layout at save time, what state was stored, and library versions.

Because the manifest is written (atomically) only after every rank's data is
durable, "has a readable manifest" is the definition of *committed*; a
directory without one is an interrupted save and is never loaded.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ._version import __version__
from .errors import CorruptCheckpointError
from .storage import StorageLocation

__all__ = ["MANIFEST_FILE", "FORMAT_NAME", "FORMAT_VERSION", "FileRecord", "Manifest", "read_manifest", "write_manifest"]

MANIFEST_FILE = "manifest.json"
FORMAT_NAME = "stmixer_dist_ckpt"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FileRecord:
    """One data file: its size in bytes and a checksum of its content, ``"<algorithm>:<hex>"``."""

    size: int
    checksum: str


@dataclass(frozen=True)
class Manifest:
    """Everything recorded about one committed checkpoint.

    Attributes:
        name: the checkpoint name (its directory name inside ``save_dir``).
        data_dir: the data directory's name inside the checkpoint directory.
        files: data file name -> :class:`FileRecord`.
        world_size: number of ranks that saved it.
        layout: how the model was wrapped when saved (``"single"``, ``"ddp"``, ``"fsdp2"``).
        contents: what state was stored (``model``, ``optimizer``, ``scheduler``,
            ``extra`` names, ``rank_state`` world size).
        versions: library and torch versions that wrote it.
        created_unix: commit time (seconds since the epoch).
    """

    name: str
    data_dir: str
    files: dict[str, FileRecord]
    world_size: int
    layout: str
    contents: dict[str, Any]
    versions: dict[str, str] = field(default_factory=lambda: {FORMAT_NAME: __version__, "torch": torch.__version__})
    created_unix: float = field(default_factory=time.time)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(record.size for record in self.files.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str) -> Manifest:
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT_NAME:
                raise ValueError(f"format is {raw.get('format')!r}, expected {FORMAT_NAME!r}")
            if int(raw["format_version"]) > FORMAT_VERSION:
                raise ValueError(
                    f"format_version {raw['format_version']} is newer than this library reads "
                    f"({FORMAT_VERSION}); upgrade stmixer_dist_ckpt"
                )
            files = {str(name): FileRecord(int(rec["size"]), str(rec["checksum"])) for name, rec in raw["files"].items()}
            data_dir = str(raw["data_dir"])
            if "/" in data_dir or data_dir in ("", ".", ".."):
                raise ValueError(f"data_dir {data_dir!r} must be a plain directory name")
            for name in files:
                if "/" in name or name in ("", ".", ".."):
                    raise ValueError(f"file name {name!r} must be a plain file name")
            return cls(
                name=str(raw["name"]),
                data_dir=data_dir,
                files=files,
                world_size=int(raw["world_size"]),
                layout=str(raw["layout"]),
                contents=dict(raw["contents"]),
                versions={str(k): str(v) for k, v in raw["versions"].items()},
                created_unix=float(raw["created_unix"]),
                format_version=int(raw["format_version"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptCheckpointError(f"{source}: unreadable manifest: {exc}") from exc


def write_manifest(checkpoint_dir: StorageLocation, manifest: Manifest) -> None:
    """Commit: write the manifest atomically (the last write of a save)."""
    checkpoint_dir.join(MANIFEST_FILE).write_bytes_atomic(manifest.to_json().encode())


def read_manifest(checkpoint_dir: StorageLocation) -> Manifest | None:
    """The manifest of ``checkpoint_dir``, or ``None`` when it has none (not committed)."""
    location = checkpoint_dir.join(MANIFEST_FILE)
    try:
        text = location.read_bytes().decode()
    except FileNotFoundError:
        return None
    return Manifest.from_json(text, source=location.url)
