"""What a consolidated file holds: the stored items arranged as the single-file Checkpointer wrote them.

A checkpoint written by our ``Checkpointer`` stores ``model``, ``optimizer``
(name-keyed, as ``get_optimizer_state_dict`` gives it), ``scheduler``,
``extra.<name>`` and ``rank_state.<rank>``. The legacy file is
``{"model", "optimizer" (integer ids, as ``optimizer.state_dict()``),
"scheduler", <extras at the top level>}``; per-rank state has no place in it.
Any other DCP checkpoint is written with its own nesting.

Tensors stay :class:`~stmixer_dist_ckpt._torch_format.PendingTensor` here:
they are read only when the writer reaches them.
"""

from __future__ import annotations

import enum
import io
import logging
from typing import Any

import torch

from ._dcp_index import StoredItem, insert_at_path
from ._dcp_items import DcpItemReader, TensorBuffer
from ._torch_format import PendingTensor
from .errors import CheckpointError, IncompatibleCheckpointError, UnsafeCheckpointError
from .safe_pickle import safe_torch_load

__all__ = ["UnsafeExtrasPolicy", "OutputBuilder", "is_checkpointer_layout", "load_object", "PACKED_ROOTS"]

logger = logging.getLogger(__name__)

#: Top-level keys the Checkpointer writes; a checkpoint with only these is laid out as the legacy file.
_CHECKPOINTER_ROOTS = frozenset({"model", "optimizer", "scheduler", "extra", "rank_state"})
#: Roots whose items the Checkpointer stores pre-serialized (``torch.save`` bytes inside the DCP item),
#: so that DCP keeps each user object as one opaque item instead of flattening it.
PACKED_ROOTS = frozenset({"scheduler", "extra", "rank_state"})


class UnsafeExtrasPolicy(str, enum.Enum):
    """What :func:`consolidate` does with stored objects that ``torch.load(weights_only=True)`` refuses.

    The scheduler state and extras are arbitrary pickled objects. Most are
    plain data (``iteration``, a scheduler's state dict), but e.g. AlphAction's
    ``person_pool`` is a :class:`MemoryPool`, which only this library's loader
    (``Checkpointer.load``) or ``weights_only=False`` accept.

    * ``DROP`` (default): leave them out and log which, so the file is what
      releases need: loadable anywhere with ``torch.load(weights_only=True)``.
      A memory pool is a training cache; resuming training belongs to the
      sharded checkpoint, which keeps it.
    * ``KEEP``: write them; ``Checkpointer.load(file)`` restores them, but
      ``torch.load(weights_only=True)`` then refuses the file. The summary
      lists them under ``needs_safe_loader``.
    * ``ERROR``: raise, for pipelines that must not lose anything silently.

    ``model_only=True`` writes no objects, so it never needs this.
    """

    KEEP = "keep"
    DROP = "drop"
    ERROR = "error"


class OutputBuilder:
    """Turns the stored items into the object to write, with tensors left as :class:`PendingTensor`."""

    def __init__(self, reader: DcpItemReader, *, dtype: torch.dtype | None, policy: UnsafeExtrasPolicy) -> None:
        self.reader = reader
        self.dtype = dtype
        self.policy = policy
        self.items = list(reader.items.values())
        self.ours = is_checkpointer_layout(self.items)
        self.dropped: list[str] = []
        self.needs_safe_loader: list[str] = []
        self.tensors = 0
        self.tensor_bytes = 0
        # Every tensor is read into this one block: the writer consumes each before asking for the next.
        self.buffer = TensorBuffer()

    def pending(self, item: StoredItem, *, convert: bool) -> PendingTensor:
        stored = item.dtype
        if stored is None or item.shape is None:
            raise TypeError(f"{item.key} is not a tensor")
        target = self.dtype if convert and self.dtype is not None and stored.is_floating_point else stored
        reader, buffer = self.reader, self.buffer

        def produce() -> torch.Tensor:
            tensor = reader.read_tensor(item, buffer)
            return tensor if tensor.dtype == target else tensor.to(target)

        pending = PendingTensor(dtype=target, shape=item.shape, produce=produce)
        self.tensors += 1
        self.tensor_bytes += pending.nbytes
        return pending

    def value(self, item: StoredItem, *, convert: bool = False) -> tuple[bool, Any]:
        """``(keep, value)`` for one item; objects go through the unsafe-extras policy."""
        if item.is_tensor:
            return True, self.pending(item, convert=convert)
        packed = self.reader.read_object(item) if self.ours and item.path[0] in PACKED_ROOTS else None
        if isinstance(packed, (bytes, bytearray)):
            refused = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(packed)))
        else:
            refused = self.reader.globals_refused_by_weights_only(item)
        if refused:
            what = f"{item.key} (needs {', '.join(refused)})"
            if self.policy is UnsafeExtrasPolicy.ERROR:
                raise UnsafeCheckpointError(
                    f"{self.reader.source} [{item.key}] holds {', '.join(refused)}, which torch.load(weights_only=True) "
                    "refuses; pass unsafe_extras='drop' (--unsafe-extras drop) to leave it out, or 'keep' to write it "
                    "(the file then needs Checkpointer.load)"
                )
            if self.policy is UnsafeExtrasPolicy.DROP:
                logger.warning(
                    "%s: leaving out %s so the file loads with torch.load(weights_only=True); "
                    "pass unsafe_extras='keep' (--unsafe-extras keep) to write it", self.reader.source, what,
                )
                self.dropped.append(what)
                return False, None
            self.needs_safe_loader.append(what)
        return True, load_object(self.reader, item, packed)

    def model_items(self) -> list[tuple[str, StoredItem]]:
        tensors = [item for item in self.items if item.is_tensor]
        under_model = [item for item in tensors if item.path[0] == "model" and len(item.path) > 1]
        if under_model:
            return [(".".join(str(part) for part in item.path[1:]), item) for item in under_model]
        # A plain `dcp.save(model.state_dict())` directory has the weights at the top level.
        return [(".".join(str(part) for part in item.path), item) for item in tensors]

    def model_state(self) -> dict[str, PendingTensor]:
        entries = self.model_items()
        if not entries:
            raise IncompatibleCheckpointError(f"{self.reader.source} holds no tensors; there are no weights to write")
        return {name: self.pending(item, convert=True) for name, item in entries}

    def torch_object(self, model_only: bool) -> dict[Any, Any]:
        if model_only:
            return {"model": self.model_state()}
        if not self.ours:
            root: dict[Any, Any] = {}
            for item in self.items:
                keep, value = self.value(item, convert=item.path[0] == "model")
                if keep:
                    insert_at_path(root, item.path, value)
            return root
        output: dict[Any, Any] = {"model": self.model_state()}
        optimizer: dict[Any, Any] = {}
        scheduler: dict[Any, Any] = {}
        extras: dict[Any, Any] = {}
        for item in self.items:
            root_key = item.path[0]
            if root_key == "rank_state":
                self.dropped.append(f"{item.key} (per-rank state has no meaning in a single file)")
                continue
            target = {"optimizer": optimizer, "scheduler": scheduler, "extra": extras}.get(str(root_key))
            if target is None:
                continue
            keep, value = self.value(item)
            if keep:
                insert_at_path(target, item.path, value)
        if optimizer:
            output["optimizer"] = _integer_optimizer_keys(optimizer["optimizer"], self.reader.source)
        if "scheduler" in scheduler:
            output["scheduler"] = scheduler["scheduler"]
        output.update(extras.get("extra", {}))
        return output


def is_checkpointer_layout(items: list[StoredItem]) -> bool:
    roots = {item.path[0] for item in items}
    return "model" in roots and roots <= _CHECKPOINTER_ROOTS


def load_object(reader: DcpItemReader, item: StoredItem, packed: Any) -> Any:
    """A stored object; ``packed`` bytes (the Checkpointer's pre-serialized objects) are unpacked safely."""
    if isinstance(packed, (bytes, bytearray)):
        return safe_torch_load(bytes(packed), source=f"{reader.source} [{item.key}]",
                               allow_unsafe_pickle=reader.allow_unsafe_pickle)
    return packed if packed is not None else reader.read_object(item)


def _integer_optimizer_keys(state: Any, source: str) -> Any:
    """``{"state": {fqn: ...}, "param_groups": [{"params": [fqn]}]}`` to ``optimizer.state_dict()``'s integer ids.

    ``optimizer.load_state_dict`` pairs saved and current parameters by
    position, numbering them through ``param_groups`` in order; ids assigned
    the same way make the moments land on the right parameters.
    """
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        logger.warning("%s: the optimizer state has no param_groups with params; writing it as stored", source)
        return state
    ids: dict[Any, int] = {}
    new_groups = [{**group, "params": [ids.setdefault(name, len(ids)) for name in group["params"]]} for group in groups]
    new_state: dict[int, Any] = {}
    for name, entries in dict(state.get("state", {})).items():
        if name not in ids:
            raise CheckpointError(
                f"{source}: optimizer state for {name!r} belongs to no parameter group; the checkpoint is "
                "inconsistent. Consolidate with model_only=True to write the weights alone."
            )
        new_state[ids[name]] = entries
    return {"state": dict(sorted(new_state.items())), "param_groups": new_groups}
