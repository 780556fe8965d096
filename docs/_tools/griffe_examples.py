"""Griffe extension: read the package's ``Example:`` docstring sections as examples.

The project's docstrings (STYLE.md R9) title their doctest blocks ``Example:``.
Griffe's Google parser knows only ``Examples:`` and would render ``Example:``
as an admonition, turning every ``>>>`` line into a nested quote. Renaming the
title before parsing keeps the source as it is and renders the block as code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_TITLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE_TITLE.sub(r"\1Examples:", obj.docstring.value)
