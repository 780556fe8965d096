"""Consolidation: ``stmixer_dist_ckpt.consolidate`` vs DCP's ``dcp_to_torch_save`` vs a raw copy.

Builds one sharded checkpoint (default: 1 GiB in 64 float32 tensors, saved by
the Checkpointer) and consolidates it to a ``.pth`` three ways, each in a fresh
subprocess so one run's allocations never colour the next:

* ``stmixer``: :func:`stmixer_dist_ckpt.consolidate.consolidate`;
* ``dcp_to_torch_save``: ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``;
* ``raw_copy``: the checkpoint's data files copied sequentially, 16 MiB at a
  time, then fsynced: the disk's limit for moving these bytes.

Each child imports everything first, records its resident memory as the
baseline, resets the kernel's peak-RSS mark, runs, and reports the peak above
the baseline and the wall time. The data files are evicted from the page cache
(``posix_fadvise(DONTNEED)``) before every run, so each one reads from disk
(``--warm`` keeps them cached, to see the CPU cost).
After timing, both ``.pth`` files are loaded memory-mapped and compared.

Run::

    python -m benchmarks.bench_consolidate                     # 1 GiB, 64 tensors
    python -m benchmarks.bench_consolidate --size-gib 4 --tensors 128 --workdir /scratch
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent(
    """
    import json, os, resource, sys, time
    mode, source, data_dir, out = sys.argv[1:5]
    import torch
    from stmixer_dist_ckpt.consolidate import consolidate
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    def status_kib(field):
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))

    baseline = status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # reset VmHWM so import-time peaks are not counted
        peak_field = "VmHWM"
    except OSError:
        peak_field = None
    started = time.perf_counter()
    if mode == "stmixer":
        consolidate(source, out, progress=False)
    elif mode == "dcp_to_torch_save":
        dcp_to_torch_save(data_dir, out)
        with open(out, "rb+") as handle:  # torch.save does not fsync; the others do
            os.fsync(handle.fileno())
    else:
        block = bytearray(16 << 20)
        view = memoryview(block)
        with open(out, "wb") as target:
            for name in sorted(os.listdir(data_dir)):
                with open(os.path.join(data_dir, name), "rb", buffering=0) as handle:
                    while count := handle.readinto(block):
                        target.write(view[:count])
            target.flush()
            os.fsync(target.fileno())
    seconds = time.perf_counter() - started
    peak = status_kib(peak_field) if peak_field else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_above_baseline": (peak - baseline) * 1024,
                      "baseline": baseline * 1024, "peak_source": peak_field or "ru_maxrss"}))
    """
)

MODES = ("raw_copy", "stmixer", "dcp_to_torch_save")


def build_checkpoint(workdir: Path, size_gib: float, tensors: int) -> tuple[str, str, int]:
    """Save ``tensors`` float32 tensors totalling ``size_gib`` with the Checkpointer; returns (checkpoint, data dir, bytes)."""
    import torch
    from torch import nn

    from stmixer_dist_ckpt import Checkpointer

    elements = int(size_gib * (1 << 30)) // 4 // tensors
    columns = 1024
    rows = max(1, elements // columns)
    holder = nn.Module()
    generator = torch.Generator().manual_seed(0)
    for index in range(tensors):
        holder.register_buffer(f"layer{index:03d}", torch.randn(rows, columns, generator=generator))
    checkpoint = Checkpointer(holder, save_dir=str(workdir / "run"), save_to_disk=True).save("model_0000001")
    assert checkpoint is not None
    data_dir = next(str(path) for path in Path(checkpoint).iterdir() if path.name.startswith("data-"))
    return checkpoint, data_dir, tensors * rows * columns * 4


def evict(directory: str) -> None:
    """Drop a directory's files from the page cache, so the next run reads from disk."""
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_child(mode: str, checkpoint: str, data_dir: str, out: Path, *, cold: bool) -> dict[str, Any]:
    if out.exists():
        out.unlink()
    if cold:
        evict(data_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, checkpoint, data_dir, str(out)],
        capture_output=True, text=True, env=env, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{result.stderr[-3000:]}")
    measured: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    measured["output_bytes"] = out.stat().st_size
    return measured


def verify(ours: Path, theirs: Path) -> None:
    """Both outputs hold the same model tensors (memory-mapped, so this check stays small too)."""
    import torch

    mine = torch.load(ours, weights_only=True, mmap=True)["model"]
    reference = torch.load(theirs, weights_only=True, mmap=True)["model"]
    assert mine.keys() == reference.keys(), "different keys"
    for key, value in reference.items():
        assert torch.equal(mine[key], value), key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="checkpoint size (default: %(default)s)")
    parser.add_argument("--tensors", type=int, default=64, help="number of tensors (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method; the best time is reported")
    parser.add_argument("--workdir", default=None, help="where to build (default: a temp dir under the cwd)")
    parser.add_argument("--json-out", default="bench_consolidate.json", help="results file (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--warm", action="store_true", help="leave the data files in the page cache between runs")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_consolidate-", dir=os.getcwd()))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        checkpoint, data_dir, total = build_checkpoint(workdir, args.size_gib, args.tensors)
        print(f"built {checkpoint}: {args.tensors} tensors, {total / (1 << 30):.2f} GiB "
              f"in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        results: dict[str, dict[str, Any]] = {}
        for _ in range(args.repeat):
            for mode in MODES:
                measured = run_child(mode, checkpoint, data_dir, workdir / f"{mode}.pth", cold=not args.warm)
                best = results.get(mode)
                if best is None or measured["seconds"] < best["seconds"]:
                    results[mode] = measured
        verify(workdir / "stmixer.pth", workdir / "dcp_to_torch_save.pth")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    cache = "warm" if args.warm else "cold"
    print(f"\nconsolidating {total / (1 << 30):.2f} GiB in {args.tensors} tensors ({cache} page cache, fsync included)")
    print(f"{'method':<20} {'seconds':>8} {'GB/s':>7} {'peak RSS above baseline':>26} {'% of checkpoint':>16}")
    for mode in MODES:
        r = results[mode]
        r["gb_per_s"] = total / 1e9 / r["seconds"]
        r["peak_fraction"] = r["peak_above_baseline"] / total
        print(f"{mode:<20} {r['seconds']:>8.2f} {r['gb_per_s']:>7.2f} "
              f"{r['peak_above_baseline'] / (1 << 20):>22.1f} MiB {100 * r['peak_fraction']:>15.1f}%")
    report = {"checkpoint_bytes": total, "tensors": args.tensors, "results": results, "page_cache": cache,
              "torch": __import__("torch").__version__, "cpus": os.cpu_count()}
    Path(args.json_out).write_text(json.dumps(report, indent=2, sort_keys=True))
    print(f"\nwrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
