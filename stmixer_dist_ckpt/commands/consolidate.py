"""``stmixer-ckpt consolidate SRC DST``: a sharded checkpoint to one ``.pth`` or ``.safetensors`` file."""

from __future__ import annotations

import argparse
from typing import Literal

from ._common import add_storage_options_argument, storage_options_from

__all__ = ["register", "add_output_arguments", "run_consolidate"]


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the single output file; shared with ``convert`` (sharded -> file)."""
    parser.add_argument(
        "--format",
        choices=("torch", "safetensors"),
        default=None,
        help="output format (default: safetensors when DST ends in .safetensors, else torch)",
    )
    parser.add_argument("--model-only", action="store_true", help="write only the model weights ({'model': ...})")
    parser.add_argument("--dtype", default=None, help="convert floating-point model tensors, e.g. bf16, fp16, fp32")
    parser.add_argument(
        "--unsafe-extras",
        choices=("drop", "keep", "error"),
        default="drop",
        help="stored objects that torch.load(weights_only=True) refuses, e.g. a MemoryPool: leave them out "
        "(default), keep them (the file then needs Checkpointer.load), or fail",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it is shown only on a terminal anyway)")
    parser.add_argument(
        "--allow-unsafe-pickle",
        action="store_true",
        help="unpickle stored objects without the allow list (only for checkpoints you trust fully)",
    )
    add_storage_options_argument(parser)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "consolidate",
        help="write a sharded checkpoint (any world size) as one .pth or .safetensors file",
        description=(
            "Stream a sharded checkpoint (a committed checkpoint directory, a plain DCP directory, or a save_dir "
            "meaning its tagged checkpoint) into one file, one tensor at a time, without a process group. The .pth "
            "has the legacy Checkpointer layout {model, optimizer, scheduler, extras} with integer optimizer keys, "
            "so torch.load(weights_only=True), Checkpointer.load and optimizer.load_state_dict all work. "
            ".safetensors holds the model tensors."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="sharded checkpoint: local path or fsspec URL")
    parser.add_argument("dst", metavar="DST", help="output file: local path or fsspec URL")
    add_output_arguments(parser)
    parser.set_defaults(func=run_consolidate)


def run_consolidate(args: argparse.Namespace) -> int:
    from ..consolidate import consolidate

    output_format: Literal["torch", "safetensors"] = args.format or (
        "safetensors" if str(args.dst).endswith(".safetensors") else "torch"
    )
    summary = consolidate(
        args.src,
        args.dst,
        format=output_format,
        model_only=args.model_only,
        dtype=args.dtype,
        storage_options=storage_options_from(args),
        progress=False if args.no_progress else None,
        overwrite=args.overwrite,
        unsafe_extras=args.unsafe_extras,
        allow_unsafe_pickle=args.allow_unsafe_pickle,
    )
    print(
        f"wrote {summary.destination} ({summary.format}): {summary.tensors} tensors, "
        f"{summary.file_bytes / 1e6:.1f} MB in {summary.seconds:.2f} s ({summary.gigabytes_per_second:.2f} GB/s)"
    )
    for what in summary.dropped:
        print(f"  left out: {what}")
    for what in summary.needs_safe_loader:
        print(f"  kept (needs Checkpointer.load, not torch.load(weights_only=True)): {what}")
    return 0
