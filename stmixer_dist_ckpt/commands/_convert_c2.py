"""The Caffe2 ``.pkl`` source kind of ``stmixer-ckpt convert``: ``.pkl`` -> sharded checkpoint.

Kept out of ``convert.py`` so that command stays a table of source kinds; it
lists this one as ``SourceKind(NAME, DESCRIPTION, matches, convert)``. The
leading underscore keeps the CLI from registering this module as a subcommand.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ._common import storage_options_from

if TYPE_CHECKING:
    from ..storage import StorageLocation

__all__ = ["DESCRIPTION", "NAME", "convert", "matches"]

NAME = "Caffe2 weights"
DESCRIPTION = ".pkl (Caffe2/Detectron blobs) -> sharded checkpoint directory"


def matches(location: StorageLocation) -> bool:
    """A ``.pkl`` file that is not a ``torch.save`` archive (those convert as torch files)."""
    if not (location.name.lower().endswith(".pkl") and location.isfile()):
        return False
    from ..legacy.legacy_file import is_torch_zip

    with location.open("rb") as stream:
        return not is_torch_zip(stream)


def convert(args: argparse.Namespace) -> int:
    """Run the conversion for ``convert SRC DST``; returns the exit code."""
    from ..c2_conversion import convert_c2_to_sharded

    given = [flag for flag, used in (("--format", args.format), ("--dtype", args.dtype)) if used]
    if given:
        raise ValueError(f"{', '.join(given)} apply only when SRC is a sharded checkpoint and DST a file")
    result = convert_c2_to_sharded(
        args.src,
        args.dst,
        storage_options=storage_options_from(args),
        progress=False if args.no_progress else None,
        overwrite=args.overwrite,
    )
    print(
        f"wrote {result.checkpoint} (sharded checkpoint of {result.num_tensors} tensors, "
        f"{result.num_bytes / 1e6:.1f} MB, from Caffe2 weights; load it with no_head=True, and strict=False "
        "if the file has a pred_* classifier the model lacks)"
    )
    return 0
