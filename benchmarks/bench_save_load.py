"""Sharded save/load throughput of Checkpointer next to plain DCP, same state, same run.

    python -m benchmarks.bench_save_load --size-mb 256 --world-sizes 1 2

Every rank holds a DDP-replicated model of ``--size-mb`` (float32 Linear
layers); both sides write each tensor once, spread over the ranks. Plain DCP
is ``dcp.save``/``dcp.load`` with ``FileSystemWriter(sync_files=True)``, i.e.
durable like ours. Reported: median GB/s over ``--repeats`` alternating runs
and ours/DCP ratios. Loads read from the page cache (the files were just
written); the ratio, not the absolute number, is what to track.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

from benchmarks._launch import run_ranks


def _model(size_mb: int) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    layer_floats = 1024 * 1024  # 4 MB per weight
    layers = max(1, size_mb * 1024 * 1024 // 4 // layer_floats)
    return nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(layers)])


def _bench(rank: int, world: int, root: str, size_mb: int, repeats: int) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from stmixer_dist_ckpt import Checkpointer

    model: nn.Module = _model(size_mb)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    timings: dict[str, list[float]] = {"ours_save": [], "dcp_save": [], "ours_load": [], "ours_load_size": [], "dcp_load": []}

    def timed(key: str, fn: Any) -> None:
        dist.barrier()
        started = time.perf_counter()
        fn()
        dist.barrier()
        timings[key].append(time.perf_counter() - started)

    for attempt in range(repeats):
        ours_dir = os.path.join(root, f"ours-{attempt}")
        plain_dir = os.path.join(root, f"dcp-{attempt}")
        ckpt = Checkpointer(model, save_dir=ours_dir, save_to_disk=True)
        order = [("ours", "dcp"), ("dcp", "ours")][attempt % 2]
        for side in order:
            if side == "ours":
                timed("ours_save", lambda: ckpt.save("model_0000001"))
            else:
                writer = dcp.FileSystemWriter(plain_dir, sync_files=True)
                timed("dcp_save", lambda: dcp.save({"model": get_model_state_dict(model)}, storage_writer=writer))
        for side in order:
            if side == "ours":
                timed("ours_load", lambda: Checkpointer(model, save_dir=ours_dir).load())  # verify=True: hashes every byte
                timed("ours_load_size", lambda: Checkpointer(model, save_dir=ours_dir).load(verify="size"))
            else:
                def plain_load() -> None:
                    state = {"model": get_model_state_dict(model)}
                    dcp.load(state, checkpoint_id=plain_dir)

                timed("dcp_load", plain_load)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(ours_dir, ignore_errors=True)
            shutil.rmtree(plain_dir, ignore_errors=True)
    medians = {key: statistics.median(values) for key, values in timings.items()}
    return {
        "world_size": world,
        "state_bytes": nbytes,
        **{f"{key}_s": value for key, value in medians.items()},
        **{f"{key}_gbps": nbytes / value / 1e9 for key, value in medians.items()},
        "save_ratio": medians["dcp_save"] / medians["ours_save"],
        "load_ratio": medians["dcp_load"] / medians["ours_load"],
        "load_size_ratio": medians["dcp_load"] / medians["ours_load_size"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write results here")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-save-load-", dir=args.dir) as root:
        for world in args.world_sizes:
            results.append(run_ranks(_bench, world, root, args.size_mb, args.repeats))
    header = (
        f"{'ws':>3} {'MB':>6} {'ours save':>10} {'dcp save':>10} {'ratio':>6} {'ours load':>10} {'(size)':>7} "
        f"{'dcp load':>10} {'ratio':>6} {'(size)':>7}"
    )
    print(header + "   (GB/s; ratio = ours / DCP speed; (size) = load(verify='size'), the default verify=True hashes every byte)")
    for r in results:
        print(
            f"{r['world_size']:>3} {r['state_bytes'] / 1e6:>6.0f} {r['ours_save_gbps']:>10.2f} {r['dcp_save_gbps']:>10.2f} "
            f"{r['save_ratio']:>6.2f} {r['ours_load_gbps']:>10.2f} {r['ours_load_size_gbps']:>7.2f} "
            f"{r['dcp_load_gbps']:>10.2f} {r['load_ratio']:>6.2f} {r['load_size_ratio']:>7.2f}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
