"""Restricted deserialization: the allow list and the loaders every read path uses.

Checkpoints travel between teams and are downloaded from the internet, and a
pickle can run any code while it loads. So nothing in this library calls plain
``pickle.load`` or ``torch.load(weights_only=False)`` on stored data unless the
caller opts in with ``allow_unsafe_pickle=True``. Instead, two loaders share one
allow list of globals:

* :func:`safe_torch_load` for ``torch.save`` data (DCP items, extras, ``.pth``):
  ``torch.load(weights_only=True)`` plus our allow list;
* :func:`safe_pickle_load` for raw pickles (DCP ``.metadata``, Caffe2 ``.pkl``):
  an unpickler whose ``find_class`` only returns allowed globals and which
  refuses to set attributes on classes, functions and other shared objects.

Tensors, numpy arrays, Python primitives and containers, :class:`MemoryPool`
(also under its AlphAction name) and DCP's metadata classes are allowed.
Anything else raises :class:`UnsafeCheckpointError` naming the file and class
and how to allow it with :func:`register_safe_class`.
"""

from __future__ import annotations

import _compat_pickle
import collections
import enum
import functools
import importlib
import io
import pickle
import struct
import threading
import types
from collections.abc import Callable, Iterable
from typing import IO, Any, ClassVar

import torch

from .errors import UnsafeCheckpointError
from .memory_pool import MemoryPool

__all__ = [
    "register_safe_class",
    "registered_safe_classes",
    "safe_pickle_load",
    "safe_torch_load",
    "LEGACY_MEMORY_POOL_NAME",
]

LEGACY_MEMORY_POOL_NAME = "alphaction.structures.memory_pool.MemoryPool"

# Names are "module.qualname" as they appear in a pickle's GLOBAL opcode.
_lock = threading.Lock()
_user_allowed: dict[str, Any] = {}


def _qualified_name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def register_safe_class(cls: Any, *, name: str | None = None) -> None:
    """Allow ``cls`` (a class or function) to be unpickled from checkpoints.

    Register every class that your ``save(**extra)`` values or scheduler hold,
    once per process, before loading (on every rank).

    Args:
        cls: the class or function to allow.
        name: the ``module.qualname`` it was pickled under, when that differs
            from where it lives now (a renamed or moved class).

    Example:
        >>> from stmixer_dist_ckpt import register_safe_class
        >>> class RunStats:
        ...     pass
        >>> register_safe_class(RunStats)
    """
    key = name or _qualified_name(cls)
    with _lock:
        _user_allowed[key] = cls
    _builtin_allow_list.cache_clear()


def registered_safe_classes() -> dict[str, Any]:
    """The classes added with :func:`register_safe_class`, by pickled name."""
    with _lock:
        return dict(_user_allowed)


def _numpy_globals() -> dict[str, Any]:
    import numpy as np

    found: dict[str, Any] = {}
    multiarray = importlib.import_module("numpy._core.multiarray")
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        found[f"{module}._reconstruct"] = multiarray._reconstruct
        found[f"{module}.scalar"] = multiarray.scalar
    found["numpy.ndarray"] = np.ndarray
    found["numpy.dtype"] = np.dtype
    for dtype_name in dir(np.dtypes):
        if dtype_name.endswith("DType"):
            found[f"numpy.dtypes.{dtype_name}"] = getattr(np.dtypes, dtype_name)
    return found


def _dcp_metadata_globals() -> dict[str, Any]:
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    found: dict[str, Any] = {
        "torch.distributed.checkpoint.filesystem._StorageInfo": filesystem._StorageInfo,
        "torch.serialization._get_layout": torch.serialization._get_layout,
        "torch.Size": torch.Size,
        "pathlib.PosixPath": pathlib.PosixPath,
        "pathlib.PurePosixPath": pathlib.PurePosixPath,
    }
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    ):
        if hasattr(metadata, name):
            found[f"torch.distributed.checkpoint.metadata.{name}"] = getattr(metadata, name)
    for value in vars(torch).values():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            found[f"torch.{str(value).removeprefix('torch.')}"] = value
    return found


def _builtin_globals() -> dict[str, Any]:
    import builtins

    found: dict[str, Any] = {
        f"builtins.{name}": getattr(builtins, name)
        for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes", "bytearray", "bool", "slice", "range")
    }
    found["collections.OrderedDict"] = collections.OrderedDict
    found["collections.defaultdict"] = collections.defaultdict
    found["_codecs.encode"] = __import__("codecs").encode  # py2 byte strings in latin1 pickles
    return found


@functools.lru_cache(maxsize=1)
def _builtin_allow_list() -> dict[str, Any]:
    # Building this walks torch and numpy namespaces (~1 ms); loads call it per item.
    allowed = _builtin_globals()
    allowed.update(_numpy_globals())
    allowed.update(_dcp_metadata_globals())
    allowed[_qualified_name(MemoryPool)] = MemoryPool
    allowed[LEGACY_MEMORY_POOL_NAME] = MemoryPool
    return allowed


def _allowed_globals() -> dict[str, Any]:
    allowed = dict(_builtin_allow_list())
    allowed.update(registered_safe_classes())
    return allowed


def _refusal(source: str, global_name: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{source}: refusing to unpickle {global_name!r}: it is not on the safe-load allow list, and "
        "loading it could run arbitrary code. If you trust this class, call "
        f"stmixer_dist_ckpt.register_safe_class(<the class>) (name={global_name!r} if it moved) before "
        "loading; if you trust the whole file, pass allow_unsafe_pickle=True.",
        global_name=global_name,
    )


# BUILD sets attributes on whatever sits below it on the stack. On an allowed
# class, function or enum member that would let a file rewrite shared objects
# for the whole process (a method of ``MemoryPool``, the value of a DCP enum member)
# while "only" loading allow-listed names.
_SHARED_OBJECT_TYPES = (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType, enum.Enum)
_plain_build: Callable[[Any], None] = pickle._Unpickler.dispatch[pickle.BUILD[0]]


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, because only it lets BUILD be checked (about 2x slower than C)."""

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)
    stack: list[Any]  # the unpickler's working stack (not in typeshed's stub)

    def __init__(self, file: IO[bytes], *, source: str, allowed: dict[str, Any], encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self._source = source
        self._allowed = allowed
        self._resolved_ids: set[int] = set()

    def load(self) -> Any:
        try:
            return super().load()
        except (KeyError, IndexError, struct.error) as exc:
            # Where the C unpickler reports malformed data as UnpicklingError (which
            # callers catch), the Python one lets an unknown opcode or a short stack
            # escape as these.
            raise pickle.UnpicklingError(f"malformed pickle data ({type(exc).__name__}: {exc})") from exc

    def _load_build(self) -> None:
        target = self.stack[-2]
        if id(target) in self._resolved_ids or isinstance(target, _SHARED_OBJECT_TYPES):
            raise UnsafeCheckpointError(
                f"{self._source}: refusing to set attributes on {getattr(target, '__qualname__', repr(target))!r}: "
                "the pickle tries to modify a shared class, function or constant while loading, which no "
                "checkpoint needs. Do not load this file; if you trust it fully, pass allow_unsafe_pickle=True."
            )
        _plain_build(self)

    dispatch[pickle.BUILD[0]] = _load_build

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 pickles (protocol < 3) name builtins "__builtin__" and so on;
        # map them the way pickle's own find_class does before checking.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        global_name = f"{module}.{name}"
        if global_name in self._allowed:
            found = self._allowed[global_name]
            self._resolved_ids.add(id(found))  # stays alive in the allow list, so the id is stable
            return found
        raise _refusal(self._source, global_name)


def safe_pickle_load(
    file: IO[bytes] | bytes,
    *,
    source: str,
    encoding: str = "ASCII",
    allow_unsafe_pickle: bool = False,
) -> Any:
    """Unpickle ``file`` allowing only allow-listed globals.

    Args:
        file: an open binary stream or the raw bytes.
        source: the file or key name used in error messages.
        encoding: ``"latin1"`` for Python 2 era pickles (Caffe2 ``.pkl``).
        allow_unsafe_pickle: skip the allow list; only for files you trust fully.

    Raises:
        UnsafeCheckpointError: the pickle names a global that is not allowed.
    """
    stream = io.BytesIO(file) if isinstance(file, (bytes, bytearray, memoryview)) else file
    if allow_unsafe_pickle:
        return pickle.Unpickler(stream, encoding=encoding).load()
    return _RestrictedUnpickler(stream, source=source, allowed=_allowed_globals(), encoding=encoding).load()


@functools.lru_cache(maxsize=1)
def _torch_format_globals() -> dict[str, Any]:
    # The globals torch's own weights_only loader accepts: tensor/storage rebuild
    # functions, dtypes, devices. Reusing its list keeps us in step with torch.
    from torch import _weights_only_unpickler

    return dict(_weights_only_unpickler._get_allowed_globals())


class _RestrictedPickleModule:
    """A stand-in for the ``pickle`` module that ``torch.load(pickle_module=...)`` accepts.

    ``torch.load(weights_only=True)`` has its own unpickler that, among other
    gaps, cannot rebuild a ``defaultdict`` (AlphAction's ``MemoryPool`` holds
    one). Handing torch a real unpickler with our ``find_class`` keeps every
    pickle feature while still refusing unknown globals.
    """

    def __init__(self, source: str, allowed: dict[str, Any]) -> None:
        outer = self

        class Unpickler(_RestrictedUnpickler):
            def __init__(self, file: IO[bytes], **kwargs: Any) -> None:
                super().__init__(file, source=outer.source, allowed=outer.allowed, encoding=kwargs.get("encoding", "ASCII"))

        self.source = source
        self.allowed = allowed
        self.Unpickler = Unpickler
        self.__name__ = "stmixer_dist_ckpt.safe_pickle"

    def load(self, file: IO[bytes], **kwargs: Any) -> Any:
        return self.Unpickler(file, **kwargs).load()


def safe_torch_load(
    file: IO[bytes] | bytes | str,
    *,
    source: str,
    map_location: str | torch.device = "cpu",
    allow_unsafe_pickle: bool = False,
    mmap: bool = False,
) -> Any:
    """``torch.load`` whose unpickler accepts only allow-listed globals.

    Args:
        file: a path, an open binary stream or the raw bytes.
        source: the file or key name used in error messages.
        map_location: where tensors land; CPU by default so no rank piles onto GPU 0.
        allow_unsafe_pickle: load with plain pickle; only for files you trust fully.
        mmap: memory-map the file instead of reading it (paths only).

    Raises:
        UnsafeCheckpointError: the data needs a global that is not allowed.
    """
    target: Any = io.BytesIO(file) if isinstance(file, (bytes, bytearray, memoryview)) else file
    if allow_unsafe_pickle:
        return torch.load(target, map_location=map_location, weights_only=False, mmap=mmap)
    allowed = dict(_torch_format_globals())
    allowed.update(_allowed_globals())
    restricted = _RestrictedPickleModule(source, allowed)
    return torch.load(
        target, map_location=map_location, weights_only=False, mmap=mmap, pickle_module=restricted
    )


def iter_allowed_names() -> Iterable[str]:
    """Every ``module.qualname`` the safe loaders accept right now (for docs and ``inspect``)."""
    return sorted(_allowed_globals())
