"""Spawn gloo ranks for a benchmark and collect rank 0's JSON-able result."""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any


def _entry(fn: Callable[..., Any], rank: int, world: int, store: str, queue: Any, args: tuple[Any, ...]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
        result = fn(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
        queue.put((rank, None, result))
    except BaseException:
        queue.put((rank, traceback.format_exc(), None))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 1800.0) -> Any:
    """Run ``fn(rank, world_size, *args)`` on spawned gloo ranks; return rank 0's result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, store, queue, args)) for r in range(world_size)]
        for proc in procs:
            proc.start()
        results = {}
        for _ in range(world_size):
            rank, error, value = queue.get(timeout=timeout)
            if error:
                for proc in procs:
                    proc.kill()
                raise RuntimeError(f"rank {rank} failed:\n{error}")
            results[rank] = value
        for proc in procs:
            proc.join()
    return results[0]
