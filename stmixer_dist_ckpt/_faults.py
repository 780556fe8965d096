"""Fault-injection points for the crash-safety tests; inert unless an env var names one.

A checkpoint protocol is only as good as its behaviour when a process dies at
the worst moment, and that moment cannot be reached from outside a process.
So ``save`` calls :func:`hit` at the points listed in :data:`POINTS`. In
normal runs :data:`ENV_VAR` is unset and ``hit`` returns after one dict lookup
(no parsing, no allocation), which is negligible next to the file writes
around each call.

Spec syntax (``STMIXER_CKPT_FAULT``)::

    <point>[#<n>][@<rank>][:<action>]

* ``point``: one of :data:`POINTS`;
* ``#n``: fire on the n-th time this process reaches the point (default 1),
  e.g. ``storage.atomic_write#2`` is the second atomic write of a save: the tag;
* ``@rank``: fire only on that global rank (default: every rank);
* ``action``: ``kill`` (default; SIGKILL, no cleanup, no flush, like an OOM
  kill or a lost node) or ``raise`` (an ``OSError(EIO)``, like a failing disk).

The spec is read on every call rather than at import so that processes
forked from a pre-warmed parent (the tests use a forkserver) can arm it after
import. An unknown point name raises ``ValueError`` so a typo cannot turn a
crash test into one that silently never crashes.

Example:
    >>> import os, subprocess, sys
    >>> env = dict(os.environ, STMIXER_CKPT_FAULT="save.after_commit@0")
    >>> subprocess.run([sys.executable, "train.py"], env=env)  # doctest: +SKIP
"""

from __future__ import annotations

import errno
import os
import signal

__all__ = ["ENV_VAR", "POINTS", "hit"]

ENV_VAR = "STMIXER_CKPT_FAULT"

#: Every point ``save`` reaches, in order. ``storage.atomic_write`` fires inside
#: ``StorageLocation.write_bytes_atomic`` after the temp file is durable and
#: before it replaces the target (local) or before the single PUT (S3).
POINTS: frozenset[str] = frozenset(
    {
        "save.begin",  # all ranks: after the vote, before state capture
        "save.before_write",  # all ranks: state captured, no file written yet
        "save.shard_write",  # all ranks: after a chunk of a shard file was written
        "save.metadata_write",  # rank 0: after a chunk of DCP's .metadata was written
        "save.after_write",  # all ranks: this rank's files are durable
        "save.before_commit",  # rank 0: every file visible, manifest not yet written
        "storage.atomic_write",  # rank 0: #1 = manifest, #2 = tag (in a save)
        "save.after_commit",  # rank 0: manifest written, tag not yet moved
        "save.after_tag",  # rank 0: tag moved, post-commit cleanup not started
        "cleanup.remove",  # rank 0: after each leftover or retired path was removed
    }
)

_counts: dict[str, int] = {}  # per process; only touched once a spec is armed


def hit(point: str) -> None:
    """Fire the fault named by :data:`ENV_VAR` if it names ``point`` here and now.

    Raises:
        OSError: the spec's action is ``raise``.
        ValueError: the spec is malformed or names an unknown point.
    """
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    target, occurrence, rank, action = _parse(spec)
    if target != point:
        return
    if rank is not None and rank != _current_rank():
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] != occurrence:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.EIO, f"injected fault at {point} ({ENV_VAR}={spec!r})")


def _parse(spec: str) -> tuple[str, int, int | None, str]:
    text, _, action = spec.partition(":")
    action = action or "kill"
    text, _, rank_text = text.partition("@")
    point, _, occurrence_text = text.partition("#")
    if point not in POINTS:
        raise ValueError(f"{ENV_VAR}={spec!r}: unknown fault point {point!r}; known points: {sorted(POINTS)}")
    if action not in ("kill", "raise"):
        raise ValueError(f"{ENV_VAR}={spec!r}: action must be 'kill' or 'raise', got {action!r}")
    try:
        occurrence = int(occurrence_text) if occurrence_text else 1
        rank = int(rank_text) if rank_text else None
    except ValueError as exc:
        raise ValueError(f"{ENV_VAR}={spec!r}: '#n' and '@rank' must be integers") from exc
    return point, occurrence, rank, action


def _current_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return int(os.environ.get("RANK", "0"))
