"""``stmixer-ckpt inspect PATH``: keys, shapes, dtypes, sizes, saved world size and layout, extras, versions."""

from __future__ import annotations

import argparse
import json

from ._common import add_storage_options_argument, storage_options_from

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "inspect",
        help="show what a checkpoint holds, without reading its tensors",
        description=(
            "Describe a checkpoint: a committed sharded checkpoint, a plain DCP directory, a save_dir (its tagged "
            "checkpoint), a .pth or a .safetensors file. Shows every stored key with dtype, shape and size, the "
            "world size and layout it was saved with, extras and versions. Only metadata is read."
        ),
    )
    parser.add_argument("path", metavar="PATH", help="checkpoint path or fsspec URL")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--prefix", default=None, help="only keys at or below this prefix, e.g. model or optimizer.state")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="show at most N keys in the text output")
    parser.add_argument(
        "--allow-unsafe-pickle",
        action="store_true",
        help="unpickle small stored objects without the allow list (only for checkpoints you trust fully)",
    )
    add_storage_options_argument(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..inspect_checkpoint import format_checkpoint_info, inspect_checkpoint

    if args.limit is not None and args.limit < 0:
        raise ValueError("--limit must be 0 or more")
    info = inspect_checkpoint(args.path, storage_options_from(args), allow_unsafe_pickle=args.allow_unsafe_pickle)
    if args.prefix:
        prefix = args.prefix
        kept = [e for e in info.entries if e.key == prefix or e.key.startswith(prefix + ".")]
        info = dataclasses.replace(info, entries=kept)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2, sort_keys=True, default=str))
    else:
        print(format_checkpoint_info(info, max_entries=args.limit))
    return 0
