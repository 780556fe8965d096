"""Save/load throughput to a local S3 endpoint: Checkpointer next to plain DCP's FsspecWriter/FsspecReader.

    python -m benchmarks.bench_s3 --size-mb 256 --world-sizes 1 2

Starts moto's S3 server on 127.0.0.1 (a free port) in this process, then for
each world size spawns gloo ranks that hold a DDP-replicated model of
``--size-mb`` and, alternating the order per repeat:

* ours: ``Checkpointer.save`` (checksums, manifest commit, tag) and
  ``Checkpointer.load`` with ``verify=True`` (reads every byte once more to
  check it) and ``verify="size"``;
* plain DCP: ``dcp.save``/``dcp.load`` with ``FsspecWriter``/``FsspecReader``
  and the same ``storage_options``, ``sync_files=True`` and one thread per rank.

Every load fills a differently initialized model and is checked against the
saved weights after timing. moto is a Python server sharing this machine's
CPUs, so absolute GB/s are far below real S3; the ratios are what to track.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import uuid
from functools import partial
from typing import Any

from benchmarks._launch import run_ranks


def _model(size_mb: int, seed: int) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers = max(1, size_mb // 4)  # 4 MB per 1024x1024 float32 weight
    return nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(layers)])


def _bench(rank: int, world: int, bucket: str, options: dict[str, Any], size_mb: int, repeats: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    from stmixer_dist_ckpt import Checkpointer
    from stmixer_dist_ckpt._dcp import FsspecReader, FsspecWriter  # DCP's fsspec classes: one import site

    def wrap(model: nn.Module) -> nn.Module:
        return nn.parallel.DistributedDataParallel(model) if world > 1 else model

    model, target = wrap(_model(size_mb, 0)), wrap(_model(size_mb, 1))
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    timings: dict[str, list[float]] = {k: [] for k in ("ours_save", "dcp_save", "ours_load", "ours_load_size", "dcp_load")}

    def timed(key: str, fn: Any) -> None:
        dist.barrier()
        started = time.perf_counter()
        fn()
        dist.barrier()
        timings[key].append(time.perf_counter() - started)

    def check_loaded() -> None:
        for (name, expected), loaded in zip(model.state_dict().items(), target.state_dict().values(), strict=True):
            if not torch.equal(expected, loaded):
                raise AssertionError(f"rank {rank}: {name} differs after load")
        with torch.no_grad():
            for parameter in target.parameters():
                parameter.zero_()

    def plain_save(path: str) -> None:
        writer = FsspecWriter(path, sync_files=True, thread_count=1, **options)
        dcp_save({"model": get_model_state_dict(model)}, storage_writer=writer)

    def plain_load(path: str) -> None:
        state = {"model": get_model_state_dict(target)}
        dcp_load(state, storage_reader=FsspecReader(path, **options))

    for attempt in range(repeats):
        ours_dir, plain_dir = f"{bucket}/ours-{attempt}", f"{bucket}/dcp-{attempt}"
        writer_ckpt = Checkpointer(model, save_dir=ours_dir, save_to_disk=True, storage_options=options)
        reader_ckpt = Checkpointer(target, save_dir=ours_dir, storage_options=options)
        order = [("ours", "dcp"), ("dcp", "ours")][attempt % 2]
        for side in order:
            if side == "ours":
                timed("ours_save", partial(writer_ckpt.save, "model_0000001"))
            else:
                timed("dcp_save", partial(plain_save, plain_dir))
        for side in order:
            if side == "ours":
                timed("ours_load", partial(reader_ckpt.load, verify=True))
                check_loaded()
                timed("ours_load_size", partial(reader_ckpt.load, verify="size"))
                check_loaded()
            else:
                timed("dcp_load", partial(plain_load, plain_dir))
                check_loaded()
    medians = {key: statistics.median(values) for key, values in timings.items()}
    return {
        "world_size": world,
        "state_bytes": nbytes,
        **{f"{key}_s": value for key, value in medians.items()},
        **{f"{key}_mbps": nbytes / value / 1e6 for key, value in medians.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write results here")
    args = parser.parse_args(argv)

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "bench", "secret": "bench"}
    results = []
    try:
        for world in args.world_sizes:
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
            fs.mkdir(bucket)
            results.append(run_ranks(_bench, world, f"s3://{bucket}", options, args.size_mb, args.repeats))
            fs.rm(bucket, recursive=True)  # moto keeps objects in this process's memory
    finally:
        server.stop()
    print(f"S3 endpoint: moto on 127.0.0.1, {args.repeats} repeats, medians in MB/s")
    print(f"{'ws':>3} {'MB':>5} {'ours save':>10} {'dcp save':>9} {'ours load':>10} {'load size':>10} {'dcp load':>9}")
    for r in results:
        print(
            f"{r['world_size']:>3} {r['state_bytes'] / 1e6:>5.0f} {r['ours_save_mbps']:>10.0f} {r['dcp_save_mbps']:>9.0f} "
            f"{r['ours_load_mbps']:>10.0f} {r['ours_load_size_mbps']:>10.0f} {r['dcp_load_mbps']:>9.0f}"
        )
    print("ours load = verify=True (every byte checked); load size = verify='size'")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
