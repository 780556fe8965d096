"""``stmixer-ckpt verify PATH``: check a checkpoint's files against its manifest.

Exit codes: 0 intact; 1 damaged (a file missing, truncated, bit-flipped or
unexpected; the checkpoint never committed; its manifest unreadable);
2 could not check (nothing at PATH, no manifest to check against, storage error).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import CorruptCheckpointError, IncompleteCheckpointError
from ..integrity import VerifyMode, verify_checkpoint
from ._common import add_storage_options_argument, storage_options_from

__all__ = ["register", "run"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check a checkpoint's files against its manifest (sizes and checksums)",
        description=(
            "Check every data file of a checkpoint against the sizes and checksums recorded in its "
            "manifest, and report missing, truncated, bit-flipped and unexpected files by name. PATH is a "
            "checkpoint directory or a run directory (then the checkpoint its last_checkpoint names). "
            "Exit 0: intact; 1: damaged; 2: could not check."
        ),
    )
    parser.add_argument("path", metavar="PATH", help="checkpoint or run directory: local path or URL (s3://...)")
    parser.add_argument(
        "--size-only",
        action="store_true",
        help="compare sizes only (fast: no data is read; misses bit flips)",
    )
    add_storage_options_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    mode = VerifyMode.SIZE if args.size_only else VerifyMode.FULL
    try:
        report = verify_checkpoint(args.path, storage_options_from(args), mode=mode)
    except (IncompleteCheckpointError, CorruptCheckpointError) as exc:
        print(f"DAMAGED {args.path}: {exc}")
        return 1
    print(report.describe())
    return 0 if report.ok else 1
