"""Spawn gloo ranks for a benchmark and collect rank 0's JSON-able result."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import tempfile
import time
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
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(results) < world_size:
                try:
                    rank, error, value = queue.get(timeout=1.0)
                except queue_module.Empty:
                    # A rank that died without reporting (killed, or failed before _entry ran, e.g. a
                    # script without an ``if __name__ == "__main__":`` guard) would otherwise leave us
                    # waiting for the whole timeout.
                    silent = [r for r, proc in enumerate(procs) if proc.exitcode is not None and r not in results]
                    if silent and queue.empty():
                        codes = ", ".join(f"rank {r}: exit code {procs[r].exitcode}" for r in silent)
                        raise RuntimeError(f"benchmark rank(s) exited without a result ({codes}); see their stderr above") from None
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"benchmark ranks did not finish within {timeout:.0f} s") from None
                    continue
                if error:
                    raise RuntimeError(f"rank {rank} failed:\n{error}")
                results[rank] = value
        except BaseException:
            for proc in procs:
                proc.kill()
            raise
        for proc in procs:
            proc.join()
    return results[0]
