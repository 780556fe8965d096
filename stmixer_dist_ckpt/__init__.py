"""stmixer_dist_ckpt: sharded, resumable, safe checkpoints for distributed PyTorch training."""

from ._version import __version__
from .action_checkpointer import ActionCheckpointer, C2WeightMap
from .checkpointer import DEFAULT_HEAD_PREFIXES, Checkpointer
from .consolidate import ConsolidationSummary, UnsafeExtrasPolicy, consolidate, read_checkpoint_entries
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DistributedCheckpointError,
    IncompatibleCheckpointError,
    IncompleteCheckpointError,
    StorageError,
    UnsafeCheckpointError,
)
from .inspect_checkpoint import inspect_checkpoint, list_checkpoints
from .integrity import VerifyMode, VerifyReport, verify_checkpoint
from .legacy.key_matching import LoadReport
from .load_result import LoadResult
from .manifest import Manifest
from .memory_pool import MemoryPool
from .rank_state import RankStatePolicy, RNGState
from .retention import KeepAll, KeepAny, KeepEvery, KeepLast, RetentionPolicy
from .safe_pickle import register_safe_class
from .single_to_sharded import convert_to_sharded

__all__ = [
    "__version__",
    "ActionCheckpointer",
    "C2WeightMap",
    "Checkpointer",
    "ConsolidationSummary",
    "UnsafeExtrasPolicy",
    "consolidate",
    "convert_to_sharded",
    "inspect_checkpoint",
    "KeepAll",
    "KeepAny",
    "KeepEvery",
    "KeepLast",
    "RetentionPolicy",
    "VerifyMode",
    "VerifyReport",
    "verify_checkpoint",
    "list_checkpoints",
    "read_checkpoint_entries",
    "DEFAULT_HEAD_PREFIXES",
    "LoadResult",
    "LoadReport",
    "Manifest",
    "MemoryPool",
    "RNGState",
    "RankStatePolicy",
    "register_safe_class",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DistributedCheckpointError",
    "IncompatibleCheckpointError",
    "IncompleteCheckpointError",
    "StorageError",
    "UnsafeCheckpointError",
]
