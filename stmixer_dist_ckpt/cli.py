"""The ``stmixer-ckpt`` command line: a thin ``main(argv) -> int`` over the library.

Each subcommand lives in its own module under :mod:`stmixer_dist_ckpt.commands`
and exposes ``register(subparsers)``; modules are discovered, so adding a
command never touches this file. Any library error becomes a one-line message
on stderr and exit code 2; success is 0; a failed check (``verify``, ``demo``)
is 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from . import commands
from ._version import __version__
from .errors import CheckpointError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stmixer-ckpt",
        description="Inspect, verify, convert and consolidate stmixer_dist_ckpt checkpoints; run the demo job.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,  # bind to the current stderr even when main() runs more than once in a process
    )
    try:
        return int(args.func(args))
    except (CheckpointError, OSError, ValueError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"stmixer-ckpt {args.command}: error: {first_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stmixer-ckpt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
