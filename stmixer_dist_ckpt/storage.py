"""Where checkpoints live: local paths and fsspec URLs behind one small class.

This is the only module that talks to fsspec directly. Paths stay ``str``
(``pathlib.Path`` would turn ``s3://bucket`` into ``s3:/bucket``), and a
location remembers the user's spelling so messages show what they typed.

Object stores have no atomic rename, so nothing here offers one: the commit
protocol (:mod:`stmixer_dist_ckpt.commit`) only needs "write one small object
atomically", which both local disks (temp file + ``os.replace``) and S3 (one
PUT) provide.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from . import _faults
from .errors import StorageError

__all__ = ["StorageLocation", "resolve_location"]

# Characters fsspec expands as glob patterns in some calls (find, rm, expand_path).
_GLOB_CHARACTERS = frozenset("*?[]")


@dataclass(frozen=True)
class StorageLocation:
    """A file or directory on some filesystem.

    Attributes:
        fs: the fsspec filesystem.
        path: the path as ``fs`` understands it (protocol stripped).
        url: the location as the user would write it (``s3://b/run`` or ``/abs/run``).
        storage_options: the options ``fs`` was built with, kept so workers in
            other processes can rebuild it.
    """

    fs: Any
    path: str
    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def join(self, *parts: str) -> StorageLocation:
        """The location ``parts`` below this one."""
        for part in parts:
            if part in ("", ".", "..") or "/" in part or "\\" in part:
                raise StorageError(f"refusing path component {part!r} below {self.url}: it must be a plain name")
        path = posixpath.join(self.path, *parts)
        url = self.url.rstrip("/") + "/" + "/".join(parts) if self.url else "/".join(parts)
        return StorageLocation(self.fs, path, url, self.storage_options)

    def parent(self) -> StorageLocation:
        path = posixpath.dirname(self.path.rstrip("/"))
        url = self.url.rstrip("/").rsplit("/", 1)[0] if "/" in self.url.rstrip("/") else ""
        return StorageLocation(self.fs, path, url, self.storage_options)

    # ---- queries; object-store listing caches are dropped first so another
    # process's writes (a tag, a manifest) are seen at once.
    def refresh(self) -> None:
        if not self.is_local:
            self.fs.invalidate_cache(self.path)
            self.fs.invalidate_cache(posixpath.dirname(self.path.rstrip("/")))

    def exists(self) -> bool:
        self.refresh()
        return bool(self.fs.exists(self.path))

    def isdir(self) -> bool:
        self.refresh()
        return bool(self.fs.isdir(self.path))

    def isfile(self) -> bool:
        self.refresh()
        return bool(self.fs.isfile(self.path))

    def listdir(self) -> list[str]:
        """Names directly below this directory; ``[]`` if it does not exist."""
        self.refresh()
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        names = {posixpath.basename(str(entry).rstrip("/")) for entry in entries}
        names.discard("")
        return sorted(names)

    def size(self) -> int:
        self.refresh()
        return int(self.fs.size(self.path))

    def read_bytes(self) -> bytes:
        self.refresh()
        try:
            return bytes(self.fs.cat_file(self.path))
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StorageError(f"could not read {self.url}: {exc}") from exc

    def open(self, mode: str = "rb", **kwargs: Any) -> IO[bytes]:
        if "r" in mode:
            self.refresh()
        return self.fs.open(self.path, mode, **kwargs)  # type: ignore[no-any-return]

    # ---- writes
    def makedirs(self) -> None:
        self.fs.makedirs(self.path, exist_ok=True)

    def write_bytes_atomic(self, data: bytes) -> None:
        """Write ``data`` so that readers see either the old content or all of the new.

        Local: a temp file in the same directory, fsync, ``os.replace``, fsync of
        the directory. Object stores: one PUT, which is atomic per object.
        """
        if self.is_local:
            directory = os.path.dirname(self.path) or "."
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".{os.path.basename(self.path)}.tmp-{uuid.uuid4().hex}")
            try:
                with open(tmp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                _faults.hit("storage.atomic_write")
                os.replace(tmp, self.path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            fsync_directory(directory)
        else:
            _faults.hit("storage.atomic_write")
            self.fs.pipe_file(self.path, data)
            self.refresh()

    def remove(self, *, recursive: bool = False) -> None:
        """Delete this file or (with ``recursive``) directory; missing is fine."""
        try:
            if recursive:
                self.fs.rm(self.path, recursive=True)
            else:
                self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass
        self.refresh()

    def __str__(self) -> str:
        return self.url


def fsync_directory(directory: str) -> None:
    """Make a rename or new file in ``directory`` durable (POSIX needs the directory fsynced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (e.g. certain network mounts) refuse directory fsync
    finally:
        os.close(fd)


def resolve_location(url_or_path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> StorageLocation:
    """Turn a user path or URL into a :class:`StorageLocation`.

    Args:
        url_or_path: ``/abs/dir``, ``relative/dir``, ``file:///x``, ``s3://bucket/prefix``, ``memory://x``.
        storage_options: passed to the fsspec filesystem (for S3: ``endpoint_url``,
            ``key``/``secret``, ``client_kwargs``, multipart sizes, ...).

    Raises:
        StorageError: the protocol is unknown, its package is missing, or the
            path holds glob characters that fsspec would expand.
    """
    text = os.fspath(url_or_path)
    if not text:
        raise StorageError("empty path: pass a directory or URL")
    options = dict(storage_options or {})
    if "://" not in text:
        text = os.path.abspath(os.path.expanduser(text))
    if _GLOB_CHARACTERS & set(text.split("://", 1)[-1]):
        raise StorageError(
            f"{text!r} contains one of {''.join(sorted(_GLOB_CHARACTERS))}, which fsspec treats as a glob "
            "pattern; choose a path without them"
        )
    try:
        fs, path = fsspec.core.url_to_fs(text, **options)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open {text!r}: {exc}") from exc
    return StorageLocation(fs=fs, path=path, url=text, storage_options=options)
