"""What survives a save: retention policies and the post-commit cleanup that applies them.

After a save has committed, rank 0 tidies ``save_dir`` in two steps:

1. **Crash leftovers.** A save that died before its commit leaves a
   ``data-<token>/`` directory that no manifest names (inside a new checkpoint
   directory, or beside the live data of a checkpoint it was overwriting).
   Tokens start with the save's start time (in seconds), and one job saves
   one checkpoint at a time, so a leftover whose token is not *newer* than
   the save that just committed belongs to a save that can no longer be
   running: it is removed.
   Anything newer, and anything that is not ours (a directory holding other
   files, a plain DCP directory, a legacy ``.pth``), is left alone.
2. **Retention.** Committed checkpoints the policy does not keep are deleted,
   manifest first: a deletion that dies halfway leaves an *uncommitted*
   directory (skipped by resume, removed by step 1 next time), never a
   committed one with missing files.

Cost: one listing of ``save_dir`` plus about three small requests per
directory in it (8 at a time), and the deletes; on local disks, microseconds.

Never deleted: the checkpoint just committed, the one ``last_checkpoint``
names (read back from storage, not assumed), and any name ending in
``_final``. Failures are logged, not raised: the new checkpoint is already
safe, and a flaky DELETE must not make a successful save look failed.

Why this cannot delete a checkpoint another rank is reading: it runs only
after the commit's collective has completed on rank 0, so every rank has
finished this save; every load is itself collective (all ranks finish reading
before any rank returns from it), so no load from before this save is still
running on any rank; and a load after this save cannot start until rank 0
joins it, i.e. after this cleanup. Other *jobs* reading the same
``save_dir`` (a separate evaluator) are not covered: give them their own
copy, or keep enough checkpoints for them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from . import _faults
from .errors import CheckpointError
from .layout import DATA_DIR_PREFIX, TAG_FILE, read_tag, resolve_tag
from .manifest import MANIFEST_FILE, Manifest, read_manifest
from .storage import StorageLocation

__all__ = [
    "CheckpointInfo",
    "RetentionPolicy",
    "KeepAll",
    "KeepLast",
    "KeepEvery",
    "KeepAny",
    "CleanupReport",
    "make_policy",
    "clean_up_after_commit",
    "discard_failed_write",
]

FINAL_SUFFIX = "_final"
_STEP = re.compile(r"(\d+)$")
# data-<YYYYmmddHHMMSS>-<hex>: the token Checkpointer.save broadcasts.
_TOKEN = re.compile(r"^\d{14}-[0-9a-f]+$")
# StorageLocation.write_bytes_atomic's temp files, left behind by a process killed mid-write.
_TEMP_MANIFEST_PREFIX = f".{MANIFEST_FILE}.tmp-"
_TEMP_TAG_PREFIX = f".{TAG_FILE}.tmp-"
_SCAN_THREADS = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointInfo:
    """A committed checkpoint as a policy sees it.

    Attributes:
        name: directory name inside ``save_dir``.
        created_unix: commit time from its manifest.
        step: trailing number of the name (``model_0005000`` -> 5000), or ``None``.
    """

    name: str
    created_unix: float
    step: int | None

    @classmethod
    def from_manifest(cls, name: str, manifest: Manifest) -> CheckpointInfo:
        match = _STEP.search(name)
        return cls(name=name, created_unix=manifest.created_unix, step=int(match.group(1)) if match else None)


@runtime_checkable
class RetentionPolicy(Protocol):
    """Chooses which committed checkpoints to keep; everything else may be deleted.

    Called on rank 0 only, once per successful save, after the commit. It is a
    pure choice over names: the caller adds the protected checkpoints (the new
    one, the tagged one, ``*_final``) and does the deleting, so a policy cannot
    delete something it should not.
    """

    def select_kept(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        """Names to keep among ``checkpoints`` (ordered oldest commit first)."""
        ...


@dataclass(frozen=True, slots=True)
class KeepAll:
    """Never delete anything (the default, as upstream)."""

    def select_kept(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        return {info.name for info in checkpoints}


@dataclass(frozen=True, slots=True)
class KeepLast:
    """Keep the ``n`` most recently committed checkpoints.

    Example:
        >>> KeepLast(2).select_kept([CheckpointInfo(name=f"m{i}", created_unix=i, step=i) for i in range(4)])
        {'m2', 'm3'}
    """

    n: int

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"KeepLast(n) needs an integer n >= 1, got {self.n!r}; use KeepAll() to keep everything")

    def select_kept(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        return {info.name for info in list(checkpoints)[-self.n :]}


@dataclass(frozen=True, slots=True)
class KeepEvery:
    """Keep checkpoints whose step is a multiple of ``n_steps`` (long-term snapshots).

    A name without a trailing number gives no step to judge, so it is kept.
    Combine with :class:`KeepLast` through :class:`KeepAny`.
    """

    n_steps: int

    def __post_init__(self) -> None:
        if isinstance(self.n_steps, bool) or not isinstance(self.n_steps, int) or self.n_steps < 1:
            raise ValueError(f"KeepEvery(n_steps) needs an integer n_steps >= 1, got {self.n_steps!r}")

    def select_kept(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        return {info.name for info in checkpoints if info.step is None or info.step % self.n_steps == 0}


@dataclass(frozen=True, slots=True, init=False)
class KeepAny:
    """Keep what any of the given policies keeps.

    Example:
        >>> policy = KeepAny(KeepLast(3), KeepEvery(10_000))  # recent ones + every 10k steps
    """

    policies: tuple[RetentionPolicy, ...]

    def __init__(self, *policies: RetentionPolicy) -> None:
        if not policies:
            raise ValueError("KeepAny needs at least one policy")
        for policy in policies:
            if not isinstance(policy, RetentionPolicy):
                raise TypeError(f"KeepAny takes retention policies, got {type(policy).__name__}")
        object.__setattr__(self, "policies", tuple(policies))

    def select_kept(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        kept: set[str] = set()
        for policy in self.policies:
            kept |= policy.select_kept(checkpoints)
        return kept


def make_policy(keep_last: int | None, retention: RetentionPolicy | None) -> RetentionPolicy:
    """The policy for ``Checkpointer(keep_last=..., retention=...)``.

    Raises:
        ValueError: both are given, or ``keep_last`` is not a positive integer.
        TypeError: ``retention`` is not a policy.
    """
    if keep_last is not None and retention is not None:
        raise ValueError(
            f"pass either keep_last={keep_last!r} or retention={retention!r}, not both; "
            "keep_last=K is shorthand for retention=KeepLast(K)"
        )
    if retention is not None:
        if not isinstance(retention, RetentionPolicy):
            raise TypeError(f"retention must be a RetentionPolicy such as KeepLast(3), got {type(retention).__name__}")
        return retention
    return KeepAll() if keep_last is None else KeepLast(keep_last)


@dataclass
class CleanupReport:
    """What one post-commit cleanup did (locations as URLs)."""

    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Entry:
    location: StorageLocation
    manifest: Manifest | None
    children: tuple[str, ...]


def clean_up_after_commit(
    save_dir: StorageLocation,
    *,
    committed: str,
    token: str,
    policy: RetentionPolicy,
    logger: logging.Logger,
) -> CleanupReport:
    """Remove crash leftovers and retired checkpoints after ``committed`` was saved (rank 0 only).

    Args:
        save_dir: the run directory.
        committed: name of the checkpoint the save just committed.
        token: that save's data token; leftovers with newer tokens are left alone.
        policy: which committed checkpoints to keep.
        logger: where removals and failures are reported.

    Returns:
        What was removed and what could not be.
    """
    report = CleanupReport()
    try:
        protected = _protected_names(save_dir, committed)
        entries, temp_tags = _scan(save_dir, logger)
    except (OSError, CheckpointError, ValueError) as exc:  # ValueError: a tag naming no valid checkpoint
        logger.warning("skipping cleanup of %s: %s", save_dir.url, exc)
        return report
    for temp_tag in temp_tags:  # a tag write killed before its rename
        _remove(save_dir.join(temp_tag), report, logger, recursive=False)
    for entry in entries:
        _remove_leftovers(entry, token, protected, report, logger)
    committed_infos = sorted(
        (CheckpointInfo.from_manifest(e.location.name, e.manifest) for e in entries if e.manifest),
        key=lambda info: (info.created_unix, info.name),
    )
    try:
        kept = set(policy.select_kept(committed_infos))
    except Exception:  # a user policy's bug must not fail a committed save on rank 0 alone
        logger.exception("retention policy %r failed; no checkpoint was deleted", policy)
        return report
    for entry in entries:
        name = entry.location.name
        never = name in protected or name.endswith(FINAL_SUFFIX)
        if entry.manifest is not None and name not in kept and not never:
            logger.info("retention (%r): deleting checkpoint %s", policy, entry.location.url)
            # Manifest first: a deletion cut short leaves an uncommitted directory, never a
            # "committed" checkpoint with missing files.
            if _remove(entry.location.join(MANIFEST_FILE), report, logger, recursive=False):
                _remove(entry.location, report, logger, recursive=True)
    return report


def discard_failed_write(checkpoint_dir: StorageLocation, data_dir: StorageLocation, logger: logging.Logger) -> None:
    """Remove what a failed (uncommitted) write left, at once rather than at the next commit (rank 0).

    Called only once every rank's write has ended, when no manifest names
    ``data_dir``. It matters most for a full disk: the partial files would
    otherwise hold the space the next save needs. The checkpoint directory
    goes too if nothing else is in it (a failed save under a new name).
    """
    report = CleanupReport()
    if _remove(data_dir, report, logger, recursive=True):
        logger.info("removed the data of the failed save: %s", data_dir.url)
    try:
        empty = not checkpoint_dir.listdir()
    except (OSError, CheckpointError):
        return
    if empty:
        _remove(checkpoint_dir, report, logger, recursive=True)


def _protected_names(save_dir: StorageLocation, committed: str) -> set[str]:
    protected = {committed}
    content = read_tag(save_dir)
    if content:
        # Raises when the tag cannot be resolved: then nothing is deleted this time.
        protected.add(resolve_tag(save_dir, content).name)
    return protected


def _scan(save_dir: StorageLocation, logger: logging.Logger) -> tuple[list[_Entry], list[str]]:
    names = save_dir.listdir()
    temp_tags = [name for name in names if name.startswith(_TEMP_TAG_PREFIX)]
    candidates = [save_dir.join(name) for name in names if name != TAG_FILE and not name.startswith(".")]
    # About three small requests per directory; on an object store their latency, not their
    # work, is the cost, so they run _SCAN_THREADS at a time.
    with ThreadPoolExecutor(max_workers=_SCAN_THREADS) as pool:
        scanned = list(pool.map(lambda location: _inspect(location, logger), candidates))
    return [entry for entry in scanned if entry is not None], temp_tags


def _inspect(location: StorageLocation, logger: logging.Logger) -> _Entry | None:
    if not location.isdir():
        return None
    try:
        manifest = read_manifest(location)
    except CheckpointError as exc:  # unreadable manifest: not ours to judge, leave it
        logger.warning("not cleaning %s: %s", location.url, exc)
        return None
    return _Entry(location, manifest, tuple(location.listdir()))


def _remove_leftovers(
    entry: _Entry, token: str, protected: set[str], report: CleanupReport, logger: logging.Logger
) -> None:
    name = entry.location.name
    referenced = entry.manifest.data_dir if entry.manifest is not None else None
    temp_manifests = [child for child in entry.children if child.startswith(_TEMP_MANIFEST_PREFIX)]
    known = {MANIFEST_FILE, *temp_manifests}
    if any(not child.startswith(DATA_DIR_PREFIX) and child not in known for child in entry.children):
        return  # holds files we did not write (a plain DCP dir, a user's folder): not ours to tidy
    if entry.manifest is None and name in protected:
        return  # the tag's target, though broken: leave it for a human to inspect
    stale = [
        child
        for child in entry.children
        if child.startswith(DATA_DIR_PREFIX)
        and child != referenced
        and _started_no_later(child[len(DATA_DIR_PREFIX) :], token)
    ]
    for child in stale:
        logger.info("removing data of an interrupted or replaced save: %s", entry.location.join(child).url)
        _remove(entry.location.join(child), report, logger, recursive=True)
    for child in temp_manifests:  # a manifest write killed before its rename
        _remove(entry.location.join(child), report, logger, recursive=False)
    leftover_only = entry.manifest is None and stale and len(stale) + len(temp_manifests) == len(entry.children)
    if leftover_only and not name.endswith(FINAL_SUFFIX):
        _remove(entry.location, report, logger, recursive=True)


def _started_no_later(candidate: str, token: str) -> bool:
    """Whether the save that made ``candidate`` started no later than the one that made ``token``.

    Tokens carry second resolution, so a save from the same second counts as
    earlier: within one job saves run one after another, and two saves of the
    same job in one second are common in tests and fast loops.
    """
    return candidate != token and bool(_TOKEN.match(candidate)) and candidate[:14] <= token[:14]


def _remove(location: StorageLocation, report: CleanupReport, logger: logging.Logger, *, recursive: bool) -> bool:
    try:
        location.remove(recursive=recursive)
    except (OSError, CheckpointError) as exc:
        logger.warning("could not remove %s (%s); remove it by hand to free the space", location.url, exc)
        report.failed.append(location.url)
        return False
    report.removed.append(location.url)
    _faults.hit("cleanup.remove")
    return True
