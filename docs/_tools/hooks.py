"""MkDocs hooks: fail the (strict) docs build when ``docs/cli.md`` no longer matches ``--help``."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

# A logger under "mkdocs." so `mkdocs build --strict` counts the warning and fails.
log = logging.getLogger("mkdocs.hooks.cli_reference")


def _cli_reference() -> Any:
    path = Path(__file__).with_name("cli_reference.py")
    spec = importlib.util.spec_from_file_location("_stmixer_docs_cli_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri == "cli.md" and not _cli_reference().is_current(markdown):
        log.warning(
            "docs/cli.md differs from `stmixer-ckpt --help`; regenerate it: python docs/_tools/cli_reference.py"
        )
    return markdown
