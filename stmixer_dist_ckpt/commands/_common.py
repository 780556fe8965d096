"""Helpers shared by subcommands."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_storage_options_argument", "storage_options_from"]


def add_storage_options_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-options",
        metavar="JSON",
        default=None,
        help='fsspec options as JSON, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\' for S3',
    )


def storage_options_from(args: argparse.Namespace) -> dict[str, Any]:
    text = getattr(args, "storage_options", None)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--storage-options is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError("--storage-options must be a JSON object")
    return value
