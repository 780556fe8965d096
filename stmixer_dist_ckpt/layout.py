"""Names on storage: checkpoint directories, the ``last_checkpoint`` tag, format sniffing.

On-storage layout of a run directory::

    <save_dir>/
      last_checkpoint              text: the name of the latest committed checkpoint
      model_0000100/
        manifest.json              commit marker + integrity record (written last)
        data-<token>/              the DCP checkpoint (.metadata, __<rank>_<n>.distcp)

The tag holds a name relative to ``save_dir`` (as fvcore does) so a moved run
directory still resumes. Tags written by the upstream Checkpointer hold a full
or cwd-relative path; those are read too, but only ever resolve to something
inside ``save_dir``: a tag is data read from storage, and following it
elsewhere would let a stray or hostile file redirect a load.
"""

from __future__ import annotations

import enum
import logging
import os
import posixpath
from dataclasses import dataclass

from .errors import CheckpointNotFoundError, CorruptCheckpointError, IncompleteCheckpointError
from .manifest import MANIFEST_FILE, Manifest, read_manifest
from .storage import StorageLocation

__all__ = [
    "TAG_FILE",
    "DATA_DIR_PREFIX",
    "CheckpointKind",
    "ResolvedCheckpoint",
    "validate_checkpoint_name",
    "read_tag",
    "write_tag",
    "resolve_tag",
    "resolve_checkpoint",
    "committed_checkpoints",
    "choose_resume_checkpoint",
]

logger = logging.getLogger(__name__)

TAG_FILE = "last_checkpoint"
DATA_DIR_PREFIX = "data-"
_DCP_METADATA = ".metadata"


def validate_checkpoint_name(name: str) -> str:
    """Check a name given to ``save``; it becomes one directory inside ``save_dir``.

    Raises:
        ValueError: empty, a path (``/``, ``\\``, ``..``), hidden, reserved, or
            holding glob characters.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"checkpoint name must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name or name in (".", "..") or ".." in name.split("."):
        raise ValueError(f"checkpoint name {name!r} must be a plain name without path separators or '..'")
    if name.startswith("."):
        raise ValueError(f"checkpoint name {name!r} must not start with '.' (hidden names are used for staging)")
    if name == TAG_FILE:
        raise ValueError(f"{TAG_FILE!r} is reserved for the tag file; choose another checkpoint name")
    if set(name) & set("*?[]"):
        # fsspec expands these as glob patterns in rm/find; a name holding one could
        # make a later cleanup delete other checkpoints.
        raise ValueError(f"checkpoint name {name!r} contains one of '*?[]'; choose a name without them")
    return name


def read_tag(save_dir: StorageLocation) -> str:
    """The tag's content, stripped; ``""`` when there is no tag or it is empty."""
    try:
        return save_dir.join(TAG_FILE).read_bytes().decode("utf-8", errors="replace").strip()
    except FileNotFoundError:
        return ""


def write_tag(save_dir: StorageLocation, name: str) -> None:
    """Point the tag at ``name`` atomically (readers see the old or the new name, never a torn one)."""
    save_dir.join(TAG_FILE).write_bytes_atomic(name.encode("utf-8"))


def resolve_tag(save_dir: StorageLocation, content: str) -> StorageLocation:
    """Where a tag's content points, always inside ``save_dir``.

    * ``model_0000100`` (our form) -> ``save_dir/model_0000100``;
    * ``/abs/run/model_0000100.pth`` or ``./model_0000100.pth`` (upstream form) ->
      that path if it lies inside ``save_dir``, otherwise its basename inside
      ``save_dir`` (the run directory was moved).

    Raises:
        CheckpointNotFoundError: the content is a URL to another place, or
            names nothing usable.
    """
    text = content.strip()
    if "://" in text:
        if text.rstrip("/").startswith(save_dir.url.rstrip("/") + "/"):
            text = text.rstrip("/")[len(save_dir.url.rstrip("/")) + 1 :]
        else:
            raise CheckpointNotFoundError(
                f"{save_dir.join(TAG_FILE).url} points at {content!r}, outside {save_dir.url}; "
                "tags may only name checkpoints inside their own save_dir"
            )
    if "/" not in text and "\\" not in text:
        return save_dir.join(validate_checkpoint_name(text))
    if save_dir.is_local:
        absolute = os.path.abspath(text)
        root = os.path.abspath(save_dir.path)
        relative = os.path.relpath(absolute, root)
        if not relative.startswith("..") and "/" not in relative and relative not in (".", ""):
            return save_dir.join(relative)
    basename = posixpath.basename(text.rstrip("/"))
    logger.warning(
        "%s holds the path %r, which is not inside %s; using its basename %r inside save_dir",
        save_dir.join(TAG_FILE).url,
        content,
        save_dir.url,
        basename,
    )
    return save_dir.join(validate_checkpoint_name(basename))


class CheckpointKind(enum.Enum):
    """What kind of thing a checkpoint path holds."""

    COMMITTED = "committed"  # our layout: manifest.json + data dir
    PLAIN_DCP = "plain_dcp"  # a DCP directory written by dcp.save (its .metadata is its commit)
    FILE = "file"  # a single file: consolidated .pth, legacy .pth, .pkl, .safetensors


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A checkpoint found on storage.

    Attributes:
        kind: see :class:`CheckpointKind`.
        location: the path the user (or tag) named.
        data: the DCP directory to read (``None`` for files).
        manifest: our manifest (``None`` for plain DCP directories and files).
    """

    kind: CheckpointKind
    location: StorageLocation
    data: StorageLocation | None
    manifest: Manifest | None


def resolve_checkpoint(location: StorageLocation) -> ResolvedCheckpoint:
    """Classify ``location`` and find its data.

    Raises:
        CheckpointNotFoundError: nothing exists there.
        IncompleteCheckpointError: a directory without a manifest or DCP metadata,
            i.e. a save that never committed.
    """
    if location.isfile():
        return ResolvedCheckpoint(CheckpointKind.FILE, location, None, None)
    if not location.isdir():
        raise CheckpointNotFoundError(f"no checkpoint at {location.url}: the path does not exist")
    names = set(location.listdir())
    if MANIFEST_FILE in names:
        manifest = read_manifest(location)
        if manifest is not None:
            return ResolvedCheckpoint(CheckpointKind.COMMITTED, location, location.join(manifest.data_dir), manifest)
    if _DCP_METADATA in names:
        return ResolvedCheckpoint(CheckpointKind.PLAIN_DCP, location, location, None)
    raise IncompleteCheckpointError(
        f"{location.url} is an incomplete checkpoint: it has no {MANIFEST_FILE} (commit marker), so the save "
        "that wrote it did not finish. Load an earlier checkpoint, or delete this directory."
    )


def committed_checkpoints(save_dir: StorageLocation) -> list[tuple[StorageLocation, Manifest]]:
    """Every committed checkpoint directly inside ``save_dir``, oldest commit first.

    Only directories with a readable manifest count. A manifest that does not
    parse is logged and skipped: it is damaged, which says nothing about age.
    """
    found: list[tuple[StorageLocation, Manifest]] = []
    for name in save_dir.listdir():
        if name == TAG_FILE or name.startswith("."):
            continue
        location = save_dir.join(name)
        if not location.isdir():
            continue
        try:
            manifest = read_manifest(location)
        except CorruptCheckpointError as exc:
            logger.warning("skipping %s: %s", location.url, exc)
            continue
        if manifest is not None:
            found.append((location, manifest))
    found.sort(key=lambda item: (item[1].created_unix, item[0].name))
    return found


def is_run_directory(location: StorageLocation) -> bool:
    """True for a ``save_dir``: it holds ``last_checkpoint`` and no manifest or DCP metadata of its own.

    Pointing a load or a tool at one means "the checkpoint it tags".
    """
    if not location.isdir():
        return False
    names = set(location.listdir())
    return TAG_FILE in names and MANIFEST_FILE not in names and _DCP_METADATA not in names


def choose_resume_checkpoint(save_dir: StorageLocation) -> StorageLocation | None:
    """What a resume (``load()`` without a path) loads: the tag's target, if it is usable.

    ``save`` moves the tag only after a commit, so the tag names a missing or
    uncommitted checkpoint only when something outside a save changed the
    directory (a manual or interrupted delete, a partial copy, a tag written by
    other code). The newest committed checkpoint (by commit time) is then
    loaded with a warning: resuming from older, intact state beats both
    crashing and silently restarting from scratch.

    Returns:
        The checkpoint to load, or ``None`` when there is no tag (a fresh run).

    Raises:
        CheckpointNotFoundError, IncompleteCheckpointError: the tag's target is
            unusable and no committed checkpoint exists to fall back to.
    """
    content = read_tag(save_dir)
    if not content:
        return None
    target = resolve_tag(save_dir, content)
    try:
        resolve_checkpoint(target)
        return target
    except (CheckpointNotFoundError, IncompleteCheckpointError) as exc:
        committed = committed_checkpoints(save_dir)
        if not committed:
            raise type(exc)(
                f"{exc} No committed checkpoint in {save_dir.url} to fall back to; delete "
                f"{save_dir.join(TAG_FILE).url} to start from scratch."
            ) from exc
        fallback = committed[-1][0]
        logger.warning(
            "%s names %s, which is not usable (%s); resuming from the newest committed checkpoint %s instead",
            save_dir.join(TAG_FILE).url,
            target.url,
            str(exc).splitlines()[0],
            fallback.url,
        )
        return fallback
