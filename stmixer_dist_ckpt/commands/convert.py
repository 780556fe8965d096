"""``stmixer-ckpt convert SRC DST``: between checkpoint formats; what happens depends on what SRC is.

* a ``torch.save`` file (``.pth``) -> a sharded checkpoint directory DST;
* a sharded checkpoint -> one file DST (``.pth`` or ``.safetensors``), as ``consolidate``.

SRC kinds are tried in the order of :data:`SOURCE_KINDS`; a new input format
(e.g. Caffe2 ``.pkl``) is one more :class:`SourceKind` entry with a detector
and a converter, and nothing else here changes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import _convert_c2
from ._common import storage_options_from
from .consolidate import add_output_arguments, run_consolidate

if TYPE_CHECKING:
    from ..storage import StorageLocation

__all__ = ["register", "SourceKind", "SOURCE_KINDS", "detect_source_kind"]

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")


@dataclass(frozen=True)
class SourceKind:
    """One kind of SRC ``convert`` accepts.

    Attributes:
        name: shown in messages.
        description: what it is and what it is converted to (shown in ``--help``).
        matches: whether SRC (a resolved location) is of this kind; cheap, reads at most a few bytes.
        convert: does the conversion from the parsed arguments; returns the exit code.
    """

    name: str
    description: str
    matches: Callable[[StorageLocation], bool]
    convert: Callable[[argparse.Namespace], int]


def _is_sharded(location: StorageLocation) -> bool:
    return location.isdir()


def _is_torch_file(location: StorageLocation) -> bool:
    if not location.isfile():
        return False
    if location.name.endswith(_TORCH_SUFFIXES):
        return True
    from ..legacy.legacy_file import is_torch_zip

    with location.open("rb") as stream:  # e.g. a .pth renamed .pkl is still a torch.save file
        return is_torch_zip(stream)


def _torch_file_to_sharded(args: argparse.Namespace) -> int:
    from ..single_to_sharded import convert_to_sharded

    given = [flag for flag, used in (("--format", args.format), ("--dtype", args.dtype)) if used]
    if given:
        raise ValueError(f"{', '.join(given)} apply only when SRC is a sharded checkpoint and DST a file")
    url = convert_to_sharded(
        args.src,
        args.dst,
        model_only=args.model_only,
        storage_options=storage_options_from(args),
        overwrite=args.overwrite,
        allow_unsafe_pickle=args.allow_unsafe_pickle,
    )
    print(f"wrote {url} (sharded checkpoint, loads on any world size)")
    return 0


SOURCE_KINDS: list[SourceKind] = [
    SourceKind("torch file", ".pth/.pt (torch.save) -> sharded checkpoint directory", _is_torch_file, _torch_file_to_sharded),
    SourceKind(_convert_c2.NAME, _convert_c2.DESCRIPTION, _convert_c2.matches, _convert_c2.convert),
    SourceKind("sharded checkpoint", "checkpoint directory -> one .pth or .safetensors file", _is_sharded, run_consolidate),
]


def detect_source_kind(location: StorageLocation) -> SourceKind:
    """The first :class:`SourceKind` that matches ``location``.

    Raises:
        CheckpointNotFoundError: nothing is at ``location``.
        CheckpointError: something is there, but no kind matches.
    """
    from ..errors import CheckpointError, CheckpointNotFoundError

    if not location.exists():
        raise CheckpointNotFoundError(f"no file or directory at {location.url}")
    for kind in SOURCE_KINDS:
        if kind.matches(location):
            return kind
    raise CheckpointError(
        f"cannot convert {location.url}: it is none of " + "; ".join(f"{k.name} ({k.description})" for k in SOURCE_KINDS)
    )


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    kinds = "; ".join(f"{kind.description}" for kind in SOURCE_KINDS)
    parser = subparsers.add_parser(
        "convert",
        help="convert between a single-file checkpoint and the sharded format",
        description=f"Convert SRC to DST; the direction follows what SRC is: {kinds}. No process group is needed.",
    )
    parser.add_argument("src", metavar="SRC", help="the checkpoint to convert: local path or fsspec URL")
    parser.add_argument("dst", metavar="DST", help="where to write the result: local path or fsspec URL")
    add_output_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..storage import resolve_location

    return detect_source_kind(resolve_location(args.src, storage_options_from(args))).convert(args)
