"""Load a large Caffe2 ``.pkl``: rank 0 reads and broadcasts, vs every rank reading it itself.

Usage::

    .venv/bin/python benchmarks/bench_c2_broadcast.py [--world 2] [--width 64] [--trials 3] [--json out.json]

The file is synthetic but shaped like the real thing: the demo SlowFast model at
``--width 64`` has SlowFast-R50's widths (about 38 M backbone parameters), its
blobs carry the real Caffe2 names, and, as in files written by the Caffe2
trainer, every parameter has a ``*_momentum`` blob, so the file is about twice
the weights (~385 MB).

Each trial times, with barriers before and after so the slowest rank counts:

* ``rank0_broadcast_ddp``: ``ActionCheckpointer.load`` into a DDP model; rank 0
  unpickles and converts, weights go out with ``broadcast_from_rank0``;
* ``rank0_broadcast_fsdp2``: the same into an FSDP2 model (each rank keeps its shard);
* ``every_rank_reads``: what upstream did, every rank unpickles and converts the
  file and loads the matched weights locally.

``cold`` trials first drop the file from the page cache with
``posix_fadvise(DONTNEED)`` (no root needed), which is closer to a first read
from shared storage; ``warm`` trials read it from memory. On one machine the
ranks share one disk and one page cache, so this understates what a shared
filesystem with many nodes costs the every-rank variant.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("rank0_broadcast_ddp", "rank0_broadcast_fsdp2", "every_rank_reads")


def _drop_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_through(path: str) -> None:
    # In chunks: reading the whole file into one bytes object would count toward rank 0's peak RSS.
    with open(path, "rb") as handle:
        while handle.read(8 << 20):
            pass


def _build(mode: str, width: int) -> Any:
    import torch.distributed as dist
    from torch import nn

    from stmixer_dist_ckpt.demo import DemoModelConfig, build_demo_model

    model = build_demo_model(DemoModelConfig(width_per_group=width))
    if mode.endswith("fsdp2"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
        return model
    return nn.parallel.DistributedDataParallel(model)


def _load(mode: str, model: Any, path: str) -> None:
    from stmixer_dist_ckpt import ActionCheckpointer
    from stmixer_dist_ckpt.legacy.c2_pickle import load_c2_state_dict
    from stmixer_dist_ckpt.legacy.key_matching import match_state_dict

    if mode.startswith("rank0_broadcast"):
        ActionCheckpointer(None, model).load(path)
        return
    inner = model.module
    shapes = {key: value.shape for key, value in inner.state_dict().items()}
    weights = load_c2_state_dict(path, source=path)
    updates, _ = match_state_dict(shapes, weights)
    inner.load_state_dict(updates, strict=False)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e6  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rank(
    rank: int,
    world: int,
    store_path: str,
    path: str,
    width: int,
    modes: tuple[str, ...],
    trials: int,
    queue: Any,
) -> None:
    import logging

    import torch
    import torch.distributed as dist

    logging.disable(logging.WARNING)  # the load report (missing head) would interleave with the table
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    timings: dict[str, list[float]] = {}
    before_first_load = 0.0
    try:
        for trial in range(trials):
            for cache in ("cold", "warm"):
                for mode in modes:  # interleaved, so load from other processes hits every mode alike
                    model = _build(mode, width)
                    before_first_load = before_first_load or _status_mb("VmRSS")
                    if cache == "cold" and rank == 0:
                        _drop_page_cache(path)
                    elif cache == "warm" and rank == 0:
                        _read_through(path)  # make sure it is cached
                    dist.barrier()
                    started = time.perf_counter()
                    _load(mode, model, path)
                    dist.barrier()
                    timings.setdefault(f"{mode}/{cache}", []).append(time.perf_counter() - started)
                    del model
            if rank == 0 and len(modes) > 1:
                print(f"trial {trial + 1}/{trials} done", file=sys.stderr, flush=True)
    finally:
        dist.destroy_process_group()
    # VmHWM is this process's peak RSS (ru_maxrss would not do: Linux carries it over from the
    # parent across fork+exec); minus the RSS with the model built and nothing loaded yet, it is
    # what loading cost this rank at its worst moment.
    peak_growth = _status_mb("VmHWM") - before_first_load
    queue.put((rank, timings, peak_growth))


def _spawn(world: int, workdir: str, path: str, width: int, modes: tuple[str, ...], trials: int) -> list[Any]:
    import multiprocessing
    import uuid

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    store = os.path.join(workdir, f"store-{uuid.uuid4().hex}")
    procs = [
        ctx.Process(target=_rank, args=(rank, world, store, path, width, modes, trials, queue))
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    results = sorted(queue.get(timeout=1800) for _ in range(world))
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        raise RuntimeError(f"a rank failed: exit codes {[proc.exitcode for proc in procs]}")
    return results


def _write_pkl(path: str, width: int) -> int:
    from stmixer_dist_ckpt.demo import DemoModelConfig
    from tests.test_dist_c2_load import make_c2_blobs  # the synthetic-file recipe the tests use

    blobs = make_c2_blobs(DemoModelConfig(width_per_group=width))
    with open(path, "wb") as handle:
        pickle.dump({"blobs": blobs}, handle, protocol=2)
    return os.path.getsize(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument(
        "--width", type=int, default=64, help="demo width_per_group; 64 = SlowFast-R50 widths"
    )
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="where the .pkl is written (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        path = os.path.join(workdir, "SLOWFAST_8x8_R50_synthetic.pkl")
        started = time.perf_counter()
        size = _write_pkl(path, args.width)
        print(f"wrote {size / 1e6:.0f} MB in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        timings = _spawn(args.world, workdir, path, args.width, MODES, args.trials)[0][1]
        # Memory: a fresh set of processes per mode, since a freed allocation is reused and would
        # hide the next mode's cost inside one process.
        peaks = {mode: _spawn(args.world, workdir, path, args.width, (mode,), 1) for mode in MODES}

    rows = []
    for key in sorted(timings, key=lambda k: (k.split("/")[1], MODES.index(k.split("/")[0]))):
        mode, cache = key.split("/")
        values = timings[key]
        rows.append(
            {
                "mode": mode,
                "cache": cache,
                "median_s": statistics.median(values),
                "runs_s": values,
                "peak_rss_growth_mb_rank0": round(peaks[mode][0][2], 1),
                "peak_rss_growth_mb_other_ranks": round(max(r[2] for r in peaks[mode][1:]), 1),
            }
        )
    result = {
        "file_mb": round(size / 1e6, 1),
        "world_size": args.world,
        "cpus": os.cpu_count(),
        "trials": args.trials,
        "results": rows,
    }
    print(f"\n{size / 1e6:.0f} MB Caffe2 .pkl on {args.world} ranks (gloo, CPU), median of {args.trials}:")
    print(f"{'cache':<6} {'mode':<24} {'median s':>9} {'+RSS r0 MB':>11} {'+RSS r1.. MB':>13}  runs s")
    for row in rows:
        runs = ", ".join(f"{v:.2f}" for v in row["runs_s"])
        print(
            f"{row['cache']:<6} {row['mode']:<24} {row['median_s']:>9.2f} "
            f"{row['peak_rss_growth_mb_rank0']:>11.0f} {row['peak_rss_growth_mb_other_ranks']:>13.0f}  [{runs}]"
        )
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
