"""Run gloo ranks forked from a pre-warmed server, and let some of them be SIGKILLed on purpose.

The crash-safety tests start one small job per kill point, dozens per test
file. ``tests/_dist.py`` spawns fresh interpreters (2-4 s each, mostly
importing torch); here children are forked from a multiprocessing
forkserver that imported torch, s3fs and this package once, so a 2-rank job
starts in about 0.1 s. The forkserver itself never initializes torch
threads or a process group, so forking from it is as safe as spawning.

Unlike ``run_distributed``, a rank dying is an expected outcome here: once
one rank has died, the others get ``grace`` seconds to fail on their own
(gloo notices the closed connection) and are then killed, as torchrun's
agent tears down a job when a worker dies. Every rank's fate is returned.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RankOutcome", "run_ranks"]

# Imported once by the forkserver. torch._dynamo alone is 1.7 s, pulled in lazily by the
# state-dict helpers on every save; pytest and the helpers are what test modules import.
_PRELOAD = [
    "torch",
    "torch._dynamo",
    "torch.distributed.checkpoint.state_dict",
    "s3fs",
    "pytest",
    "stmixer_dist_ckpt",
    "stmixer_dist_ckpt.integrity",
    "stmixer_dist_ckpt.retention",
    "tests._models",
    "tests.s3_server",
    "tests.fault_proxy",
]


@dataclass(frozen=True)
class RankOutcome:
    """How one rank ended.

    Attributes:
        exitcode: the process exit code (``-9`` when SIGKILLed).
        value: the body's return value when it returned.
        error: the traceback when it raised.
    """

    exitcode: int | None
    value: Any = None
    error: str | None = None

    @property
    def killed(self) -> bool:
        return self.exitcode == -signal.SIGKILL

    @property
    def returned(self) -> bool:
        return self.exitcode == 0 and self.error is None


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _entry(
    fn: Callable[..., Any], rank: int, world_size: int, store: str, env: Mapping[str, str], results: Any, args: tuple[Any, ...]
) -> None:
    os.environ.update(env)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            store=dist.FileStore(store, world_size),  # type: ignore[attr-defined]  # missing from torch's stubs
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=60),
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, None, buffer.getvalue()))
    except BaseException:
        results.put((rank, traceback.format_exc(), None))
    # Skip interpreter teardown: s3fs/aiohttp finalizers can take seconds to close
    # sessions, and nothing of this process is needed once its report is flushed.
    results.close()
    results.join_thread()
    os._exit(0)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    tmp_dir: Path | str,
    *args: Any,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    grace: float = 10.0,
) -> list[RankOutcome]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` forked gloo ranks; never raises for a rank.

    Args:
        fn: a module-level function (children import it by name).
        env: extra environment for the ranks, e.g. ``{"STMIXER_CKPT_FAULT": "save.after_commit@0"}``.
        timeout: overall deadline; ranks still running then are killed.
        grace: how long the other ranks may run once one rank has died.
    """
    import torch

    ctx = _context()
    store = str(Path(tmp_dir) / f"store-{uuid.uuid4().hex}")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, world_size, store, dict(env or {}), results, args), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    reports: dict[int, tuple[str | None, bytes | None]] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            rank, error, payload = results.get(timeout=0.05)
            reports[rank] = (error, payload)
        except queue.Empty:
            pass
        if all(proc.exitcode is not None for proc in procs):
            break
        if any(proc.exitcode not in (None, 0) for proc in procs):
            deadline = min(deadline, time.monotonic() + grace)
    for proc in procs:
        if proc.exitcode is None:
            proc.kill()
        proc.join(timeout=10)
    while True:  # reports put just before exiting
        try:
            rank, error, payload = results.get(timeout=0.05)
            reports[rank] = (error, payload)
        except queue.Empty:
            break
    outcomes = []
    for rank, proc in enumerate(procs):
        error, payload = reports.get(rank, (None, None))
        value = torch.load(io.BytesIO(payload), weights_only=False) if payload is not None else None
        outcomes.append(RankOutcome(exitcode=proc.exitcode, value=value, error=error))
    return outcomes
