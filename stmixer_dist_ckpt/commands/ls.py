"""``stmixer-ckpt ls SAVE_DIR``: the checkpoints of a run, which one is tagged, complete or not, size, age."""

from __future__ import annotations

import argparse
import json

from ._common import add_storage_options_argument, storage_options_from

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "ls",
        help="list the checkpoints in a save_dir",
        description=(
            "List the checkpoints in a run directory (save_dir / OUTPUT_DIR): '*' marks the one last_checkpoint "
            "names; STATE is complete, incomplete (a save that never committed) or corrupt; SIZE is on storage; "
            "AGE is since the commit."
        ),
    )
    parser.add_argument("save_dir", metavar="SAVE_DIR", help="run directory: local path or fsspec URL")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_storage_options_argument(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..inspect_checkpoint import format_listing, list_checkpoints

    listing = list_checkpoints(args.save_dir, storage_options_from(args))
    if args.json:
        print(json.dumps(listing.to_dict(), indent=2, sort_keys=True))
    else:
        print(format_listing(listing))
    return 0
