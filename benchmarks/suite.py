"""The throughput suite: every number next to its baseline, measured in the same run on the same directory.

    python -m benchmarks.suite                       # 1 GiB state, world sizes 1 2 4
    python -m benchmarks.suite --size-mb 128 --world-sizes 1 2   # quick

For each world size (FSDP2-sharded state when > 1, so every rank writes only
its shard) it reports, in GB/s of state bytes:

* save: ours (durable: fsync'd, committed, tagged) vs plain ``dcp.save``
  (``FileSystemWriter(sync_files=True)``) vs the legacy way (gather on rank 0
  + ``torch.save`` + fsync) vs raw sequential writes of the same bytes with
  fsync, one file per rank (the physical limit);
* load: ours vs ``dcp.load`` vs ``torch.load`` of the gathered file vs raw reads;
* async: the time ``save()`` blocks with ``async_save=True`` vs a sync save
  of the same state (model + SGD momentum, twice the model bytes), and
  ``dcp.async_save``'s blocking time for that state;
* small checkpoints: latency of a 10 MB save, ours vs DCP vs torch.save;
* consolidation of the widest world size's checkpoint into one ``.pth``: ours
  vs ``dcp_to_torch_save`` vs a raw copy of the files, GB/s and peak RSS
  (each in a fresh subprocess, cold page cache, best of two runs in opposite
  orders; see ``bench_consolidate``);
* resharding: load time of a checkpoint saved at 4 ranks, loaded at 2, vs
  saved and loaded at 2 (when both 2 and 4 are among ``--world-sizes``).

Every time is the slowest rank's, from a common barrier. The methods run in a
rotated order each repeat and the median is reported. Loads read right after
the writes, so they come from the page cache where RAM allows; the ratios, not
the absolute numbers, are what we track.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from benchmarks._launch import run_ranks


def _build(size_mb: int, world: int) -> Any:
    import torch
    import torch.distributed as dist
    from torch import nn

    torch.manual_seed(0)
    layers = max(4, size_mb // 4)  # 4 MB per 1024x1024 float32 weight
    model = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(layers)])
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # One real step, so the optimizer holds its momentum buffers as it does during training
    # (a never-stepped optimizer would make every state capture materialize them first).
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def _timed(samples: dict[str, list[float]], key: str, fn: Any) -> Any:
    import torch
    import torch.distributed as dist

    if dist.get_rank() == 0:
        os.sync()  # start from no dirty pages: earlier steps' writeback must not bill this one
    dist.barrier()
    started = time.perf_counter()
    result = fn()
    # The slowest rank's own time: a trailing barrier would add the wait for the other
    # ranks' scheduling (4 ranks share 2 cores here) and, for an async save, the
    # background writer's competition for the CPU, to a number meant to be "save() blocked".
    slowest = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    elapsed = float(slowest.item())
    samples.setdefault(key, []).append(elapsed)
    if dist.get_rank() == 0:
        print(f"  [ws{dist.get_world_size()}] {key}: {elapsed:.3f} s", file=sys.stderr, flush=True)
    return result


def _local_bytes(model: Any) -> list[Any]:
    from torch.distributed.tensor import DTensor

    out = []
    for param in model.parameters():
        local = param._local_tensor if isinstance(param, DTensor) else param
        out.append(local.detach().contiguous().view(-1).view(dtype=__import__("torch").uint8))
    return out


def _raw_write(path: str, chunks: list[Any]) -> None:
    with open(path, "wb") as handle:
        for chunk in chunks:
            handle.write(memoryview(chunk.numpy()))
        handle.flush()
        os.fsync(handle.fileno())


def _raw_read(path: str) -> int:
    total = 0
    with open(path, "rb", buffering=0) as handle:
        while True:
            block = handle.read(16 * 1024 * 1024)
            if not block:
                return total
            total += len(block)


def _rotated(steps: list[tuple[str, Any]], attempt: int) -> list[tuple[str, Any]]:
    """Run the methods in a different order each repeat: this VM's disk slows down as its write
    cache fills, so a fixed order would bill the cache's state to whichever method runs last."""
    shift = attempt % len(steps)
    return steps[shift:] + steps[:shift]


def _rank_body(rank: int, world: int, root: str, size_mb: int, repeats: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
    )

    from stmixer_dist_ckpt import Checkpointer

    model, optimizer = _build(size_mb, world)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    samples: dict[str, list[float]] = {}
    chunks = _local_bytes(model)
    # dcp.async_save's background collectives need their own group: on the default group they
    # would interleave with this loop's barriers and deadlock (one of the faults issue 7 names).
    dcp_group = dist.new_group(backend="gloo")
    for attempt in range(repeats):
        base = os.path.join(root, f"ws{world}-{attempt}")
        ours, plain, legacy, raw = (os.path.join(base, name) for name in ("ours", "dcp", "legacy.pth", "raw"))
        if rank == 0:
            os.makedirs(raw, exist_ok=True)
        dist.barrier()
        raw_file = os.path.join(raw, f"rank{rank}.bin")

        def legacy_save() -> None:
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                with open(legacy, "wb") as handle:
                    torch.save({"model": full}, handle)
                    handle.flush()
                    os.fsync(handle.fileno())

        def legacy_load() -> None:
            full = torch.load(legacy, weights_only=True, mmap=True)["model"] if rank == 0 else {}
            set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=world > 1))

        saves = [
            ("save_ours", lambda: Checkpointer(model, save_dir=ours, save_to_disk=True).save("model_0000001")),
            ("save_dcp", lambda: dcp.save({"model": get_model_state_dict(model)},
                                          storage_writer=dcp.FileSystemWriter(plain, sync_files=True))),
            ("save_torch", legacy_save),
            ("save_raw", lambda: _raw_write(raw_file, chunks)),
        ]
        loads = [
            ("load_ours", lambda: Checkpointer(model, save_dir=ours).load()),
            ("load_dcp", lambda: dcp.load({"model": get_model_state_dict(model)}, checkpoint_id=plain)),
            ("load_torch", legacy_load),
            ("load_raw", lambda: _raw_read(raw_file)),
        ]
        for key, step in _rotated(saves, attempt) + _rotated(loads, attempt):
            _timed(samples, key, step)

        # async: how long save() blocks, then how long until it is committed; the sync save of the
        # same state (model + optimizer) is the reference
        async_ckpt = Checkpointer(model, optimizer, save_dir=ours + "-async", save_to_disk=True, async_save=True)
        _timed(samples, "async_warmup_ours", lambda: (async_ckpt.save("model_0000001"), async_ckpt.wait()))
        _timed(samples, "stall_async_ours", lambda: async_ckpt.save("model_0000002"))
        # save() copies nothing; the background copies the state while training runs its
        # forward/backward. An optimizer.step() that comes before the copy is done waits for it:
        # this is the longest such wait (a step issued the instant save() returns).
        _timed(samples, "snapshot_copy_ours", async_ckpt.wait_for_snapshot)
        _timed(samples, "async_total_ours", async_ckpt.wait)
        sync_ckpt = Checkpointer(model, optimizer, save_dir=ours + "-sync", save_to_disk=True)
        _timed(samples, "save_sync_with_optimizer", lambda: sync_ckpt.save("model_0000002"))
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}  # what the async Checkpointer saves
        future_box: list[Any] = []
        _timed(samples, "stall_async_dcp", lambda: future_box.append(
            dcp.async_save(state, storage_writer=dcp.FileSystemWriter(plain + "-async", sync_files=True),
                           process_group=dcp_group)))
        _timed(samples, "async_total_dcp", lambda: future_box[0].result())

        dist.barrier()
        if rank == 0:
            shutil.rmtree(base, ignore_errors=True)
        dist.barrier()
    medians = {key: statistics.median(values) for key, values in samples.items()}
    return {"world_size": world, "state_bytes": full_bytes, "seconds": medians}


def _small_latency(rank: int, world: int, root: str, repeats: int) -> dict[str, Any]:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch import nn

    from stmixer_dist_ckpt import Checkpointer

    model = nn.Sequential(*[nn.Linear(512, 512, bias=False) for _ in range(10)])  # 10.5 MB
    samples: dict[str, list[float]] = {}
    for attempt in range(repeats):
        ckpt = Checkpointer(model, save_dir=os.path.join(root, f"small-{attempt}"), save_to_disk=True)
        _timed(samples, "small_ours", lambda: ckpt.save("model_0000001"))
        _timed(samples, "small_dcp", lambda: dcp.save({"model": model.state_dict()}, storage_writer=dcp.FileSystemWriter(os.path.join(root, f"small-dcp-{attempt}"), sync_files=True)))

        def legacy() -> None:
            with open(os.path.join(root, f"small-{attempt}.pth"), "wb") as handle:
                torch.save({"model": model.state_dict()}, handle)
                handle.flush()
                os.fsync(handle.fileno())

        _timed(samples, "small_torch", legacy)
    return {key: statistics.median(values) for key, values in samples.items()}


def _save_sharded(rank: int, world: int, root: str, size_mb: int) -> str:
    """Save the benchmark state once at ``world`` ranks; returns the checkpoint directory."""
    from stmixer_dist_ckpt import Checkpointer

    model, _ = _build(size_mb, world)
    saved = Checkpointer(model, save_dir=os.path.join(root, f"sharded-from-{world}"), save_to_disk=True).save("model_0000001")
    return str(saved)


def _reshard_vs_same(rank: int, world: int, root: str, size_mb: int, repeats: int) -> dict[str, float]:
    """Load time at ``world`` ranks of the checkpoint saved at 4 ranks (resharded) and of the one
    saved at ``world`` ranks (same topology), alternating, from the same page-cache state.

    Both checkpoints are loaded once untimed first: the consolidation step evicts the 4-rank one
    from the page cache, and a cold read against a warm one would be a disk comparison."""
    from stmixer_dist_ckpt import Checkpointer

    model, _ = _build(size_mb, world)
    sources = [("reshard", os.path.join(root, "sharded-from-4")), ("same", os.path.join(root, f"sharded-from-{world}"))]
    for _, source in sources:
        Checkpointer(model, save_dir=source).load()
    samples: dict[str, list[float]] = {}
    for attempt in range(repeats):
        for key, source in _rotated(sources, attempt):
            _timed(samples, key, lambda source=source: Checkpointer(model, save_dir=source).load())
    return {key: statistics.median(values) for key, values in samples.items()}


def _consolidation(checkpoint: str, root: str, world: int) -> dict[str, Any]:
    """Consolidate the ``world``-rank checkpoint three ways, each in a fresh subprocess with a cold
    page cache (see ``bench_consolidate``): ours, ``dcp_to_torch_save`` and a raw copy of its files."""
    from pathlib import Path

    from benchmarks.bench_consolidate import MODES, evict, run_child

    data_dir = next(str(path) for path in Path(checkpoint).iterdir() if path.name.startswith("data-"))
    data_bytes = sum(path.stat().st_size for path in Path(data_dir).iterdir())
    measured: dict[str, dict[str, Any]] = {}
    # Twice, forward then reversed, keeping each method's faster run: this VM's disk slows
    # down after a burst of writes, and a fixed order would bill that to whichever runs first.
    for mode in [*MODES, *reversed(MODES)]:
        print(f"  consolidate ({mode}) the {world}-rank checkpoint", file=sys.stderr, flush=True)
        run = run_child(mode, checkpoint, data_dir, Path(root) / f"consolidated-{mode}.pth", cold=True)
        os.remove(Path(root) / f"consolidated-{mode}.pth")
        if mode not in measured or run["seconds"] < measured[mode]["seconds"]:
            measured[mode] = run
    evict(data_dir)
    return {"world_size": world, "data_bytes": data_bytes, "methods": measured}


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="state size (default: %(default)s)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3, help="runs per method, in rotated order; the median is reported")
    parser.add_argument("--dir", default=None, help="directory to benchmark in (default: a temp dir)")
    parser.add_argument("--json", default="bench_output/suite.json")
    parser.add_argument("--plot", default="bench_output/suite.png")
    args = parser.parse_args(argv)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)
    results: dict[str, Any] = {"size_mb": args.size_mb, "per_world_size": []}
    with tempfile.TemporaryDirectory(prefix="bench-suite-", dir=args.dir) as root:
        for world in args.world_sizes:
            results["per_world_size"].append(run_ranks(_rank_body, world, root, args.size_mb, args.repeats))
        results["small"] = run_ranks(_small_latency, 1, root, max(3, args.repeats))
        widest = max(args.world_sizes)
        reshard = 4 in args.world_sizes and 2 in args.world_sizes
        checkpoints = {world: run_ranks(_save_sharded, world, root, args.size_mb) for world in sorted({widest, 2, 4} if reshard else {widest})}
        results["consolidate"] = _consolidation(checkpoints[widest], root, widest)
        if reshard:
            loads = run_ranks(_reshard_vs_same, 2, root, args.size_mb, args.repeats)
            results["reshard_4_to_2_s"], results["same_2_to_2_s"] = loads["reshard"], loads["same"]
    _print_table(results)
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=2)
    plotted = _plot(results, args.plot)
    print(f"\nJSON: {args.json}" + (f"   plot: {args.plot}" if plotted else ""))
    return 0


def _print_table(results: dict[str, Any]) -> None:
    print(f"state: {results['size_mb']} MB requested; GB/s of state bytes (median)")
    print(f"{'ws':>3} | {'save: ours':>10} {'dcp':>6} {'torch':>6} {'raw':>6} | {'load: ours':>10} {'dcp':>6} {'torch':>6} {'raw':>6} | {'stall async':>11} {'snapshot':>8} {'sync save':>9} {'dcp async':>9}")
    for row in results["per_world_size"]:
        s, n = row["seconds"], row["state_bytes"]
        print(
            f"{row['world_size']:>3} | {_gbps(n, s['save_ours']):>10.2f} {_gbps(n, s['save_dcp']):>6.2f} {_gbps(n, s['save_torch']):>6.2f} "
            f"{_gbps(n, s['save_raw']):>6.2f} | {_gbps(n, s['load_ours']):>10.2f} {_gbps(n, s['load_dcp']):>6.2f} "
            f"{_gbps(n, s['load_torch']):>6.2f} {_gbps(n, s['load_raw']):>6.2f} | {s['stall_async_ours']:>10.3f}s "
            f"{s['snapshot_copy_ours']:>7.3f}s {s['save_sync_with_optimizer']:>8.3f}s {s['stall_async_dcp']:>8.3f}s"
        )
    print("\nratios (ours / baseline):")
    for row in results["per_world_size"]:
        s = row["seconds"]
        print(
            f"  ws{row['world_size']}: save/raw-fsync {s['save_raw'] / s['save_ours']:.2f}, save/dcp {s['save_dcp'] / s['save_ours']:.2f}, "
            f"load/raw {s['load_raw'] / s['load_ours']:.2f}, load/dcp {s['load_dcp'] / s['load_ours']:.2f}, "
            f"async stall/sync save {s['stall_async_ours'] / s['save_sync_with_optimizer']:.3f} "
            f"(dcp.async_save stall/sync {s['stall_async_dcp'] / s['save_sync_with_optimizer']:.3f}), "
            f"snapshot copy/sync save {s['snapshot_copy_ours'] / s['save_sync_with_optimizer']:.3f}"
        )
    small = results["small"]
    print(f"\n10 MB checkpoint latency: ours {small['small_ours'] * 1e3:.1f} ms, dcp {small['small_dcp'] * 1e3:.1f} ms, torch.save {small['small_torch'] * 1e3:.1f} ms")
    consolidated = results["consolidate"]
    print(f"\nconsolidation of the {consolidated['world_size']}-rank checkpoint into one .pth "
          f"({consolidated['data_bytes'] / 1e6:.0f} MB of data files, cold page cache, fsync included):")
    for mode, measured in consolidated["methods"].items():
        print(f"  {mode:<18} {_gbps(consolidated['data_bytes'], measured['seconds']):>6.2f} GB/s   "
              f"peak RSS above baseline {measured['peak_above_baseline'] / 2**20:>7.1f} MiB "
              f"({100 * measured['peak_above_baseline'] / consolidated['data_bytes']:.1f}% of the checkpoint)")
    if "reshard_4_to_2_s" in results:
        print(f"resharded load (saved at 4, loaded at 2): {results['reshard_4_to_2_s']:.3f} s vs same topology (2->2): "
              f"{results['same_2_to_2_s']:.3f} s, ratio {results['reshard_4_to_2_s'] / results['same_2_to_2_s']:.2f}")


def _plot(results: dict[str, Any], path: str) -> bool:
    """Save the throughput-vs-world-size plot; False (and a hint) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install -c constraints.txt -e '.[bench]')")
        return False
    rows = results["per_world_size"]
    worlds = [r["world_size"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("save_ours", "ours"), ("save_dcp", "dcp.save"), ("save_torch", "torch.save (rank 0)"), ("save_raw", "raw write+fsync")):
        left.plot(worlds, [_gbps(r["state_bytes"], r["seconds"][key]) for r in rows], marker="o", label=label)
    for key, label in (("load_ours", "ours"), ("load_dcp", "dcp.load"), ("load_torch", "torch.load (rank 0)"), ("load_raw", "raw read")):
        right.plot(worlds, [_gbps(r["state_bytes"], r["seconds"][key]) for r in rows], marker="o", label=label)
    for axis, title in ((left, "save (durable)"), (right, "load")):
        axis.set_title(f"{title}, {results['size_mb']} MB state")
        axis.set_xlabel("world size")
        axis.set_ylabel("GB/s")
        axis.set_xticks(worlds)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
