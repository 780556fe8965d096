"""Run a test body on several gloo ranks, report every rank's traceback, never hang.

Rank bodies must be module-level functions in an importable module (spawned
children import them by name). Rendezvous goes through a FileStore in the
test's tmp dir: no ports, so parallel pytest-xdist workers never collide.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT_S = 150.0


def _entry(fn: Callable[..., Any], rank: int, world_size: int, store_path: str, results: Any, args: tuple[Any, ...]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        try:
            value = fn(rank, world_size, *args)
        finally:
            if dist.is_initialized():  # a body may have destroyed it on purpose
                dist.destroy_process_group()
        # Serialize to bytes: tensors put on a queue travel as shared-memory handles
        # that die with this process, before the parent reads them.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, None, buffer.getvalue()))
    except BaseException:
        results.put((rank, traceback.format_exc(), None))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    tmp_dir: Path | str,
    *args: Any,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks.

    Returns every rank's return value (picklable), in rank order.

    Raises:
        AssertionError: any rank raised, died, or did not finish in time; the
            message holds each failed rank's traceback.
    """
    ctx = mp.get_context("spawn")
    store_path = str(Path(tmp_dir) / f"store-{uuid.uuid4().hex}")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, world_size, store_path, results, args), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    import time

    deadline = time.monotonic() + timeout
    outcomes: dict[int, tuple[str | None, Any]] = {}
    while len(outcomes) < world_size and time.monotonic() < deadline:
        try:
            rank, error, value = results.get(timeout=0.5)
            outcomes[rank] = (error, value)
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcomes]
            if dead and all(p.exitcode is not None for p in procs):
                break
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()) if len(outcomes) == world_size else 1.0)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    failures = {rank: error for rank, (error, _) in outcomes.items() if error}
    for rank, proc in enumerate(procs):
        if rank not in outcomes:
            failures[rank] = f"no result (exit code {proc.exitcode}; timed out after {timeout:.0f}s or died)"
    if failures:
        raise AssertionError("\n".join(f"[rank {rank}]\n{text}" for rank, text in sorted(failures.items())))
    import torch

    # weights_only=False: these are our own test processes' return values.
    return [torch.load(io.BytesIO(outcomes[rank][1]), weights_only=False) for rank in range(world_size)]
