"""Do a checkpoint's files still hold what its manifest recorded?

Each committed checkpoint's manifest lists every data file with its size and
the checksum (XXH3-64) computed while the file was written. DCP itself checks none of
this: it reads tensor bytes by offset, so a truncated file fails somewhere
deep in ``torch.load`` at best, and a flipped bit in a tensor loads as a
silently wrong weight. Checking against the manifest catches both, names the
file, and costs:

* :attr:`VerifyMode.SIZE`: one size query per file (a ``stat`` locally, a
  ``HEAD`` on S3) plus one listing; catches missing, truncated, grown and
  unexpected files, but not a flipped bit.
* :attr:`VerifyMode.FULL`: additionally reads every byte once and compares
  checksums (hashing runs at memory speed; the read is the cost). On load the files are split over the ranks, so each rank reads
  about ``checkpoint size / world size`` extra bytes.

Example:
    >>> from stmixer_dist_ckpt.integrity import verify_checkpoint
    >>> report = verify_checkpoint("s3://bucket/run/model_0001000", {"endpoint_url": url})  # doctest: +SKIP
    >>> report.ok, [str(p) for p in report.problems]  # doctest: +SKIP
    (False, ['__1_0.distcp: checksum mismatch (xxh3_64:1c2b..., recorded xxh3_64:9f8e...)'])
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from . import collective
from ._dcp import CHECKSUM_ALGORITHM, file_checksum
from .collective import ProcessGroup
from .errors import CheckpointError, CorruptCheckpointError
from .layout import ResolvedCheckpoint, is_run_directory, read_tag, resolve_checkpoint, resolve_tag
from .manifest import MANIFEST_FILE, FileRecord, Manifest
from .storage import StorageLocation, resolve_location

__all__ = [
    "VerifyMode",
    "Problem",
    "FileProblem",
    "VerifyReport",
    "verify_checkpoint",
    "check_files",
    "verify_for_load",
]

_CHUNK = 8 << 20
_MAX_THREADS = 8


class VerifyMode(str, enum.Enum):
    """How thoroughly to compare files against the manifest (see the module docstring for costs)."""

    FULL = "full"
    SIZE = "size"

    @classmethod
    def from_load_argument(cls, verify: bool | str | VerifyMode) -> VerifyMode | None:
        """``Checkpointer.load(verify=...)``: ``True``/"full", "size", or ``False`` (no check)."""
        if verify is True:
            return cls.FULL
        if verify is False:
            return None
        try:
            return cls(verify)
        except ValueError:
            raise ValueError(f"verify must be True, False, 'full' or 'size', got {verify!r}") from None


class Problem(str, enum.Enum):
    """What is wrong with one file."""

    MISSING = "missing"
    TRUNCATED = "truncated"
    GROWN = "larger than recorded"
    CHECKSUM = "checksum mismatch"
    EXTRA = "unexpected file"


@dataclass(frozen=True, slots=True, kw_only=True)
class FileProblem:
    """One damaged, missing or unexpected file in a checkpoint's data directory."""

    name: str
    problem: Problem
    detail: str

    def __str__(self) -> str:
        return f"{self.name}: {self.problem.value} ({self.detail})"


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyReport:
    """The outcome of checking one checkpoint.

    Attributes:
        checkpoint: the checkpoint directory's URL.
        data_dir: the URL of the data directory that was checked.
        mode: how thoroughly.
        files_checked: how many recorded files were looked at.
        bytes_read: bytes read for checksums (0 in ``SIZE`` mode).
        problems: every problem found, by file name.
    """

    checkpoint: str
    data_dir: str
    mode: VerifyMode
    files_checked: int
    bytes_read: int
    problems: tuple[FileProblem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        """A human-readable, multi-line account: what was checked and every problem."""
        head = f"{self.checkpoint}: {self.files_checked} file(s) checked ({self.mode.value})"
        if self.ok:
            return f"{head}: OK"
        lines = [f"{head}: {len(self.problems)} problem(s) in {self.data_dir}"]
        lines += [f"  {problem}" for problem in self.problems]
        return "\n".join(lines)


def check_files(
    data: StorageLocation,
    manifest: Manifest,
    mode: VerifyMode,
    *,
    names: Sequence[str] | None = None,
    check_extra: bool = True,
) -> tuple[list[FileProblem], int]:
    """Compare files in ``data`` with ``manifest`` (not collective).

    Args:
        data: the checkpoint's data directory.
        manifest: its manifest.
        mode: sizes only, or sizes and checksums.
        names: which recorded files to check (default: all); ranks split the work with it.
        check_extra: also list ``data`` for files the manifest does not record.

    Returns:
        The problems found (sorted by file name) and the number of bytes read.
    """
    chosen = sorted(manifest.files) if names is None else list(names)
    problems: list[FileProblem] = []
    total = 0
    if chosen:
        with ThreadPoolExecutor(max_workers=min(_MAX_THREADS, len(chosen))) as pool:
            for problem, nbytes in pool.map(lambda n: _check_one(data, n, manifest.files[n], mode), chosen):
                total += nbytes
                if problem is not None:
                    problems.append(problem)
    if check_extra:
        for name in sorted(set(data.listdir()) - set(manifest.files)):
            problems.append(FileProblem(name=name, problem=Problem.EXTRA, detail="not in the manifest"))
    problems.sort(key=lambda p: p.name)
    return problems, total


def _check_one(data: StorageLocation, name: str, record: FileRecord, mode: VerifyMode) -> tuple[FileProblem | None, int]:
    location = data.join(name)
    try:
        size = location.size()
    except FileNotFoundError:
        return FileProblem(name=name, problem=Problem.MISSING, detail=f"{record.size} bytes recorded"), 0
    if size != record.size:
        problem = Problem.TRUNCATED if size < record.size else Problem.GROWN
        return FileProblem(name=name, problem=problem, detail=f"{size} bytes, {record.size} recorded"), 0
    if mode is VerifyMode.SIZE:
        return None, 0
    algorithm = record.checksum.partition(":")[0]
    if algorithm != CHECKSUM_ALGORITHM:
        raise CheckpointError(
            f"{location.url}: the manifest records a {algorithm!r} checksum, but this version computes "
            f"{CHECKSUM_ALGORITHM!r}; verify with the stmixer_dist_ckpt version that wrote it"
        )
    with location.open("rb") as handle:
        nbytes, checksum = file_checksum(handle, _CHUNK)
    if nbytes != record.size:  # changed between the size query and the read
        return FileProblem(name=name, problem=Problem.TRUNCATED, detail=f"read {nbytes} bytes, {record.size} recorded"), nbytes
    if checksum != record.checksum:
        detail = f"{checksum}, recorded {record.checksum}"
        return FileProblem(name=name, problem=Problem.CHECKSUM, detail=detail), nbytes
    return None, nbytes


def verify_checkpoint(
    path: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    mode: VerifyMode | str = VerifyMode.FULL,
) -> VerifyReport:
    """Check a committed checkpoint's files against its manifest (no process group needed).

    Args:
        path: a checkpoint directory (local path or fsspec URL), or a run
            directory, in which case the checkpoint its ``last_checkpoint`` names.
        storage_options: fsspec options (S3 ``endpoint_url``, credentials, ...).
        mode: ``"full"`` (sizes and checksums, reads every byte) or ``"size"``.

    Returns:
        The report; ``report.ok`` is False when any file is missing, truncated,
        grown, bit-flipped, or not in the manifest.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        IncompleteCheckpointError: the checkpoint was never committed.
        CorruptCheckpointError: its manifest cannot be read.
        CheckpointError: it has no manifest (a plain DCP directory or a single
            file), so there is nothing to verify against.

    Example:
        >>> report = verify_checkpoint("/runs/exp1/model_0001000")  # doctest: +SKIP
        >>> print(report.describe())  # doctest: +SKIP
        /runs/exp1/model_0001000: 3 file(s) checked (full): OK
    """
    verify_mode = VerifyMode(mode)
    location = resolve_location(path, storage_options)
    if is_run_directory(location):
        location = resolve_tag(location, read_tag(location))
    resolved = resolve_checkpoint(location)
    manifest, data = _manifest_and_data(resolved)
    problems, nbytes = check_files(data, manifest, verify_mode)
    return VerifyReport(
        checkpoint=location.url,
        data_dir=data.url,
        mode=verify_mode,
        files_checked=len(manifest.files),
        bytes_read=nbytes,
        problems=tuple(problems),
    )


def verify_for_load(
    resolved: ResolvedCheckpoint,
    verify: bool | str | VerifyMode,
    *,
    group: ProcessGroup | None,
    logger: logging.Logger,
) -> VerifyReport | None:
    """Check ``resolved`` before loading it (collective: call on every rank).

    Files are split over the ranks; problems are gathered so that every rank
    raises the same error naming every damaged file.

    Returns:
        The report, or ``None`` when ``verify`` is off or the checkpoint has no
        manifest to check against (plain DCP directories, single files).

    Raises:
        CorruptCheckpointError: on every rank, when any file is damaged.
        DistributedCheckpointError: on every rank, when reading failed on any rank.
    """
    mode = VerifyMode.from_load_argument(verify)
    if mode is None:
        return None
    if resolved.manifest is None or resolved.data is None:
        logger.info("%s has no %s; its files cannot be verified", resolved.location.url, MANIFEST_FILE)
        return None
    manifest, data = resolved.manifest, resolved.data
    rank, world = collective.get_rank(group), collective.get_world_size(group)
    mine = sorted(manifest.files)[rank::world]
    local = collective.run_collectively(
        lambda: check_files(data, manifest, mode, names=mine, check_extra=rank == 0),
        what=f"verifying {resolved.location.url}",
        group=group,
    )
    gathered = collective.all_gather_object(local, group)
    problems = sorted((p for rank_problems, _ in gathered for p in rank_problems), key=lambda p: p.name)
    report = VerifyReport(
        checkpoint=resolved.location.url,
        data_dir=data.url,
        mode=mode,
        files_checked=len(manifest.files),
        bytes_read=sum(nbytes for _, nbytes in gathered),
        problems=tuple(problems),
    )
    if not report.ok:
        raise CorruptCheckpointError(
            f"{report.describe()}\nRefusing to load damaged data: restore these files from a copy, or load "
            "an earlier checkpoint (load(f=...)). verify=False would load it anyway, with possibly wrong values."
        )
    logger.info("verified %s (%s, %.1f MB read)", resolved.location.url, mode.value, report.bytes_read / 1e6)
    return report


def _manifest_and_data(resolved: ResolvedCheckpoint) -> tuple[Manifest, StorageLocation]:
    if resolved.manifest is None or resolved.data is None:
        raise CheckpointError(
            f"{resolved.location.url} has no {MANIFEST_FILE} ({resolved.kind.value} checkpoint), so there is no "
            "record of its files to verify against; only checkpoints saved by Checkpointer.save can be verified"
        )
    return resolved.manifest, resolved.data
