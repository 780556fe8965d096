"""The library's exceptions: one small tree rooted at :class:`CheckpointError`.

Every class also derives from the builtin a caller would naturally catch
(``FileNotFoundError``, ``FileExistsError``, ``ValueError``), so code written
against the legacy API keeps working.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "IncompleteCheckpointError",
    "CheckpointExistsError",
    "IncompatibleCheckpointError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "StorageError",
    "DistributedCheckpointError",
]


class CheckpointError(Exception):
    """Base class of every error this library raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path given, or the one the ``last_checkpoint`` tag names, does not exist."""


class IncompleteCheckpointError(CheckpointError):
    """A checkpoint directory exists but was never committed (a save died or is still running)."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A write would replace something that must not be replaced."""


class IncompatibleCheckpointError(CheckpointError, ValueError):
    """Keys or shapes in the checkpoint do not fit the model or optimizer."""


class CorruptCheckpointError(CheckpointError):
    """Stored bytes differ from what the checkpoint's manifest recorded."""


class UnsafeCheckpointError(CheckpointError):
    """Deserializing the file would need a class that is not on the allow list.

    Attributes:
        global_name: the refused ``module.name``, when one global was refused
            (tools such as ``inspect`` show it without the full message).
    """

    def __init__(self, message: str, *, global_name: str | None = None) -> None:
        super().__init__(message)
        self.global_name = global_name


class StorageError(CheckpointError, OSError):
    """The storage backend refused an operation or is not usable for checkpoints."""


class DistributedCheckpointError(CheckpointError):
    """One or more ranks failed; every rank raises this same error.

    Attributes:
        failures: ``{rank: formatted traceback or message}`` for each failed rank.
    """

    def __init__(self, message: str, failures: dict[int, str]) -> None:
        details = "\n".join(f"--- rank {rank} ---\n{text.rstrip()}" for rank, text in sorted(failures.items()))
        super().__init__(f"{message}\n{details}" if details else message)
        self.failures = dict(failures)

    def __reduce__(self) -> tuple[type, tuple[str, dict[int, str]]]:
        return (type(self), (self.args[0].split("\n", 1)[0], self.failures))
