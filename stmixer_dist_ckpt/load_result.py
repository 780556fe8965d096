"""The value ``Checkpointer.load`` returns: the extras dict, plus the key report."""

from __future__ import annotations

from typing import Any

__all__ = ["LoadResult"]


class LoadResult(dict[str, Any]):
    """The extras that ``load`` did not consume, as a plain ``dict``.

    It stays a ``dict`` so legacy code (``arguments.update(checkpointer.load(...))``)
    works unchanged; ``report`` tells which model keys were loaded, missing,
    unexpected, mis-shaped or skipped as head keys.

    Attributes:
        report: a :class:`~stmixer_dist_ckpt.legacy.key_matching.LoadReport`,
            or ``None`` when nothing was loaded.
    """

    def __init__(self, extras: dict[str, Any], report: Any | None = None) -> None:
        super().__init__(extras)
        self.report = report
