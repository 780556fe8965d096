"""State that differs per rank: RNG streams, a data-loader position, anything per process.

Model, optimizer and extras are global: stored once and resharded on load.
Per-rank state is different: rank 3's RNG stream means nothing to rank 1, and
a job resumed on another world size has no "rank 3" to give it to. So it has
its own API: objects registered with ``Checkpointer(rank_states=...)`` are
saved under their rank, and restored to the same rank when the world size is
unchanged. When it changed, :class:`RankStatePolicy` decides, and the choice
is always logged: never a silent drop, never a silent mix of ranks.
"""

from __future__ import annotations

import enum
import random
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["RankStatePolicy", "RNGState", "Stateful", "rank_state_key"]


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()``/``load_state_dict()`` (modules, samplers, RNG wrappers)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


class RankStatePolicy(str, enum.Enum):
    """What ``load`` does with per-rank state when the world size changed.

    * ``SKIP``: keep every rank's current per-rank state and log a warning that
      names what was not restored (the default: resuming must not fail because
      a random stream cannot be carried over).
    * ``ERROR``: raise, for jobs whose correctness depends on exact per-rank state.
    """

    SKIP = "skip"
    ERROR = "error"


def rank_state_key(rank: int) -> str:
    """The storage key of one rank's state (zero-padded so keys sort by rank)."""
    return f"rank_{rank:05d}"


class RNGState:
    """Captures and restores this process's Python, NumPy and torch RNG states.

    Example:
        >>> from stmixer_dist_ckpt import Checkpointer, RNGState
        >>> # Checkpointer(model, optimizer, rank_states={"rng": RNGState()}, ...)
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(_as_python_rng_state(state_dict["python"]))
        np.random.set_state(state_dict["numpy"])
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"])


def _as_python_rng_state(state: Any) -> tuple[Any, ...]:
    # random.setstate wants (version, tuple_of_ints, gauss_next); pickling keeps it, but be
    # tolerant of lists from other serializers.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
