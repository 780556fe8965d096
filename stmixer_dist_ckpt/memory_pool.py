"""A person memory pool compatible with AlphAction's ``MemoryPool``.

AlphAction's long-term feature bank caches per-person features keyed by
``[movie_id][timestamp]``. Training scripts save it as ``person_pool`` beside the
iteration, so old checkpoints pickle it under the name
``alphaction.structures.memory_pool.MemoryPool``. This class keeps the same
attribute layout (a ``cache`` defaultdict) so those pickles load into it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Iterator
from typing import Any

__all__ = ["MemoryPool"]


class MemoryPool:
    """Two-level cache ``{movie_id: {timestamp: value}}`` with tuple-key access.

    Example:
        >>> pool = MemoryPool()
        >>> pool["movie_a", 902] = [1, 2]
        >>> ("movie_a", 902) in pool
        True
        >>> pool["movie_a"][902]
        [1, 2]
    """

    def __init__(self) -> None:
        self.cache: defaultdict[Hashable, dict[Hashable, Any]] = defaultdict(dict)

    def update(self, update_info: dict[Hashable, dict[Hashable, Any]]) -> None:
        """Merge a ``{movie_id: {timestamp: value}}`` mapping into the pool."""
        for movie_id, movie_items in update_info.items():
            self.cache[movie_id].update(movie_items)

    def update_list(self, update_info_list: Iterable[dict[Hashable, dict[Hashable, Any]]]) -> None:
        """Merge several mappings, in order (later entries win)."""
        for update_info in update_info_list:
            self.update(update_info)

    def __getitem__(self, item: Hashable | tuple[Hashable, Hashable]) -> Any:
        if isinstance(item, tuple) and len(item) == 2:
            return self.cache[item[0]][item[1]]
        return self.cache[item]

    def __setitem__(self, key: tuple[Hashable, Hashable], value: Any) -> None:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise KeyError(
                f"MemoryPool keys are (movie_id, timestamp) tuples, got {key!r}; "
                "use pool.update({movie_id: {timestamp: value}}) to add a whole movie"
            )
        self.cache[key[0]][key[1]] = value

    def __delitem__(self, item: Hashable | tuple[Hashable, Hashable]) -> None:
        if isinstance(item, tuple) and len(item) == 2:
            del self.cache[item[0]][item[1]]
        else:
            del self.cache[item]

    def __contains__(self, item: object) -> bool:
        if isinstance(item, tuple) and len(item) == 2:
            return item[0] in self.cache and item[1] in self.cache[item[0]]
        return item in self.cache

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self.cache)

    def __len__(self) -> int:
        return len(self.cache)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MemoryPool):
            return NotImplemented
        return dict(self.cache) == dict(other.cache)

    def __repr__(self) -> str:
        entries = sum(len(v) for v in self.cache.values())
        return f"MemoryPool(movies={len(self.cache)}, entries={entries})"
