"""The ``torch.save`` file format, one tensor at a time: streaming writers, and two reading helpers.

``torch.save(obj)`` needs every tensor of ``obj`` in memory at once. Its file
format does not: a ``torch.save`` file is a zip archive holding ``data.pkl``
(the object with each tensor replaced by a reference to a storage record) and
one record per storage. So the pickle is written first from
:class:`PendingTensor` placeholders that only know dtype and shape, and each
storage record is then written as its tensor is produced, through torch's own
zip writer (``PyTorchFileWriter``, the one ``torch.save`` uses), which computes
the CRC of each record as it goes. The result is byte-for-byte the layout
``torch.save`` produces for the same object, so ``torch.load(weights_only=True)``
reads it and ``mmap=True`` works.

safetensors is simpler still: a JSON header with every tensor's offsets, then
the raw bytes in that order.

Reading a stored tensor's bytes straight into place needs to know where its
storage record starts: :func:`storage_record_offset` and
:func:`archive_byte_order` answer that for an archive loaded with
``map_location="meta"``.

This is the one module that touches torch's serialization internals
(``PyTorchFileWriter``/``PyTorchFileReader``, the dtype to storage-class table,
``_rebuild_tensor_v2`` as a pickled name, a meta storage's ``_checkpoint_offset``):
they are what ``torch.save``/``torch.load`` are made of, and the round-trip
tests pin them.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import pickle
import struct
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, cast

import torch
from torch.serialization import DEFAULT_PROTOCOL, get_crc32_options

from .errors import CheckpointError, CheckpointExistsError, StorageError
from .storage import StorageLocation, fsync_directory

__all__ = [
    "PendingTensor",
    "atomic_output",
    "write_torch_file",
    "write_safetensors_file",
    "storage_record_offset",
    "archive_byte_order",
    "SAFETENSORS_DTYPES",
]

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
}


@dataclass(eq=False, slots=True, kw_only=True)
class PendingTensor:
    """A tensor that will be produced when its bytes are written.

    Attributes:
        dtype: the dtype written (after any conversion ``produce`` applies).
        shape: the shape written.
        produce: returns the tensor; called once, right before its bytes are written.
        requires_grad: recorded in the pickle, as ``torch.save`` does.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]
    requires_grad: bool = False

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * self.dtype.itemsize

    @classmethod
    def of(cls, tensor: torch.Tensor) -> PendingTensor:
        """Wrap a tensor that is already in memory (e.g. inside a pickled extra)."""
        detached = tensor.detach()
        return cls(dtype=detached.dtype, shape=tuple(detached.shape), produce=lambda: detached,
                   requires_grad=tensor.requires_grad)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


class _StorageRef:
    __slots__ = ("tensor",)

    def __init__(self, tensor: PendingTensor) -> None:
        self.tensor = tensor


def _storage_class(dtype: torch.dtype) -> Any:
    names: dict[torch.dtype, str] = torch.storage._dtype_to_storage_type_map()
    if dtype not in names:
        raise CheckpointError(f"torch.save has no storage class for dtype {dtype}; it cannot be written as a .pth")
    return getattr(torch, names[dtype])


class _SkeletonPickler(pickle.Pickler):
    """Pickles like ``torch.save`` but with storages as references to records written later."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file, protocol=DEFAULT_PROTOCOL)
        self.storages: list[PendingTensor] = []

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, PendingTensor):
            arguments: tuple[Any, ...] = (_StorageRef(obj), 0, obj.shape, _contiguous_strides(obj.shape), obj.requires_grad,
                         collections.OrderedDict())
            return (torch._utils._rebuild_tensor_v2, arguments)
        if type(obj) is torch.nn.Parameter:
            return (torch._utils._rebuild_parameter, (PendingTensor.of(obj), obj.requires_grad, collections.OrderedDict()))
        if isinstance(obj, torch.Tensor):
            if type(obj) is not torch.Tensor or obj.layout != torch.strided or obj.device.type != "cpu":
                raise CheckpointError(
                    f"cannot stream a {type(obj).__name__} tensor (layout {obj.layout}, device {obj.device}) into a "
                    ".pth; only dense CPU tensors are supported inside stored objects"
                )
            return self.reducer_override(PendingTensor.of(obj))
        return NotImplemented

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            key = str(len(self.storages))
            self.storages.append(obj.tensor)
            numel = obj.tensor.nbytes // max(obj.tensor.dtype.itemsize, 1)
            return ("storage", _storage_class(obj.tensor.dtype), key, "cpu", numel)
        return None


def _compact(tensor: torch.Tensor, expected: PendingTensor, what: str) -> torch.Tensor:
    if tensor.dtype != expected.dtype or tuple(tensor.shape) != expected.shape:
        raise CheckpointError(
            f"{what}: produced {tensor.dtype}{tuple(tensor.shape)}, expected {expected.dtype}{expected.shape}"
        )
    tensor = tensor.detach().cpu().contiguous()
    if tensor.storage_offset() != 0:
        tensor = tensor.clone()  # records are written from the start of the storage
    return tensor


class _Sink:
    """The stream handed to torch's zip writer; after a failure it swallows writes (see write_torch_file)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.live = True

    def write(self, data: Any) -> int:
        return self.stream.write(data) if self.live else memoryview(data).nbytes

    def flush(self) -> None:
        if self.live:
            self.stream.flush()


def write_torch_file(obj: Any, stream: IO[bytes], *, on_written: Callable[[int], None] | None = None) -> int:
    """Write ``obj`` (which may hold :class:`PendingTensor` leaves) in the ``torch.save`` format.

    Returns:
        The number of storage bytes written.
    """
    buffer = io.BytesIO()
    pickler = _SkeletonPickler(buffer)
    pickler.dump(obj)
    skeleton = buffer.getvalue()
    from torch.utils.serialization import config

    alignment = int(config.save.storage_alignment)
    sink = _Sink(stream)
    writer: Any = torch._C.PyTorchFileWriter(cast(IO[bytes], sink), get_crc32_options(), alignment)
    total = 0
    try:
        # The same records, in the same order, as torch.serialization._save.
        for name, payload in (
            ("data.pkl", skeleton),
            (".format_version", b"1"),
            (".storage_alignment", str(alignment).encode()),
            ("byteorder", sys.byteorder.encode()),
        ):
            writer.write_record(name, payload, len(payload))
        for key, pending in enumerate(pickler.storages):
            tensor = _compact(pending.produce(), pending, f"storage {key}")
            # The storage may be a larger reused block; only the tensor's own leading bytes are written.
            writer.write_record(f"data/{key}", tensor.untyped_storage(), tensor.nbytes)
            total += tensor.nbytes
            if on_written is not None:
                on_written(tensor.nbytes)
            del tensor
        writer.write_end_of_file()
    except BaseException:
        # An unfinished writer writes the zip's end in its C++ destructor; into a stream that
        # is closed or discarded by then, that raises inside a destructor and aborts the whole
        # process. Finish it now, into nothing.
        sink.live = False
        writer.write_end_of_file()
        raise
    return total


def write_safetensors_file(
    tensors: dict[str, PendingTensor],
    stream: IO[bytes],
    *,
    metadata: dict[str, str] | None = None,
    on_written: Callable[[int], None] | None = None,
) -> int:
    """Write ``tensors`` as a safetensors file, producing one tensor at a time.

    Returns:
        The number of tensor bytes written.
    """
    if sys.byteorder != "little":
        raise CheckpointError("safetensors files are little-endian; writing them on a big-endian host is not supported")
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, pending in tensors.items():
        if pending.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name}: safetensors has no dtype for {pending.dtype}; convert it or use --format torch")
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[pending.dtype],
            "shape": list(pending.shape),
            "data_offsets": [offset, offset + pending.nbytes],
        }
        offset += pending.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned, as safetensors pads it
    stream.write(struct.pack("<Q", len(encoded)))
    stream.write(encoded)
    for name, pending in tensors.items():
        tensor = _compact(pending.produce(), pending, name)
        stream.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        if on_written is not None:
            on_written(tensor.nbytes)
        del tensor
    return offset


def storage_record_offset(meta_tensor: torch.Tensor) -> int | None:
    """Where the storage of a tensor loaded with ``map_location="meta"`` starts in its archive.

    ``torch.load`` records it on meta storages (it is how lazy loading finds
    data); ``None`` when this torch does not.
    """
    offset = getattr(meta_tensor.untyped_storage(), "_checkpoint_offset", None)
    return int(offset) if offset is not None else None


def archive_byte_order(stream: IO[bytes]) -> str:
    """The byte order a ``torch.save`` archive's tensors were written in (``"little"`` if unrecorded)."""
    archive: Any = torch._C.PyTorchFileReader(stream)
    return archive.get_record("byteorder").decode() if archive.has_record("byteorder") else "little"


@contextmanager
def atomic_output(destination: StorageLocation, *, overwrite: bool) -> Iterator[IO[bytes]]:
    """A binary stream whose content appears at ``destination`` only if the block succeeds.

    Local: a hidden temp file beside the destination, fsync, ``os.replace``,
    fsync of the directory. Object stores (and other fsspec backends) publish
    an object only when its upload completes; on failure the upload is
    discarded (or the partial object removed).

    Raises:
        CheckpointExistsError: ``destination`` exists and ``overwrite`` is false.
    """
    if destination.isdir():
        raise CheckpointExistsError(f"{destination.url} is a directory; name an output file")
    if not overwrite and destination.exists():
        raise CheckpointExistsError(f"{destination.url} already exists; pass overwrite=True (--overwrite) to replace it")
    try:
        if destination.is_local:
            yield from _local_atomic(destination)
        else:
            yield from _remote_atomic(destination)
    except OSError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise StorageError(f"writing {destination.url} failed: {exc}") from exc


def _local_atomic(destination: StorageLocation) -> Iterator[IO[bytes]]:
    directory = os.path.dirname(destination.path) or "."
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(destination.path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(temporary, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, destination.path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    fsync_directory(directory)


def _remote_atomic(destination: StorageLocation) -> Iterator[IO[bytes]]:
    handle = destination.open("wb")
    try:
        yield handle
    except BaseException:
        discard = getattr(handle, "discard", None)
        if callable(discard):
            discard()  # s3fs: abort the multipart upload, so no partial object appears
            # Mark it closed too: s3fs leaves a discarded file open, and its __del__ then tries to
            # flush the dropped buffer ("'NoneType' object has no attribute 'tell'" at collection).
            with contextlib.suppress(AttributeError):
                setattr(handle, "closed", True)  # noqa: B010  (IO.closed is read-only to type checkers)
        else:
            handle.close()
            destination.remove()
        raise
    handle.close()
    destination.refresh()
