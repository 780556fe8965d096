"""The end-to-end demo job: train, get preempted, resume on another world size, consolidate, verify.

``stmixer-ckpt demo`` launches its own gloo ranks (spawned processes on this
machine). Under ``torchrun`` it instead runs one training phase on the ranks
torchrun started, resuming from ``last_checkpoint`` if there is one, and rank 0
consolidates and verifies at the end.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .train import DEMO_MODEL_CONFIG, TrainOptions, train_on_rank

__all__ = ["DemoOptions", "DemoReport", "run_demo", "run_under_torchrun"]


@dataclass(frozen=True)
class DemoOptions:
    """Knobs of the demo; the defaults finish in well under 3 minutes on 2 CPU cores."""

    save_dir: str
    world_size: int = 2
    resume_world_size: int = 3
    parallel: str = "ddp"
    resume_parallel: str = "ddp"
    max_iter: int = 24
    checkpoint_period: int = 4
    preempt_at: int = 10
    global_batch_size: int = 6
    init_weights: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 600.0


@dataclass
class DemoReport:
    """What the demo did and whether every check passed."""

    lines: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)

    def check(self, name: str, passed: bool, detail: str = "") -> None:
        self.checks[name] = passed
        self.lines.append(f"  [{'PASS' if passed else 'FAIL'}] {name}{': ' + detail if detail else ''}")

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(self.checks.values())

    def render(self) -> str:
        verdict = "ALL CHECKS PASSED" if self.ok else "SOME CHECKS FAILED"
        return "\n".join(["stmixer-ckpt demo report", *self.lines, verdict])


def _rank_entry(rank: int, world_size: int, store_path: str, options: TrainOptions) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        store = dist.FileStore(store_path, world_size)  # type: ignore[attr-defined]
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        summary = train_on_rank(rank, world_size, options)
        if rank == 0:
            with open(os.path.join(options.work_dir, f"result-{options.phase}.json"), "w") as handle:
                json.dump(summary, handle)
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(options.work_dir, f"error-{options.phase}-rank{rank}.txt"), "w") as handle:
            handle.write(traceback.format_exc())
        raise


def _launch(options: TrainOptions, world_size: int) -> list[Any]:
    ctx = mp.get_context("spawn")
    store = os.path.join(options.work_dir, f"store-{options.phase}")
    procs = [ctx.Process(target=_rank_entry, args=(r, world_size, store, options), daemon=True) for r in range(world_size)]
    for proc in procs:
        proc.start()
    return procs


def _progress_events(work_dir: str, phase: str) -> list[dict[str, Any]]:
    path = os.path.join(work_dir, "progress.jsonl")
    if not os.path.exists(path):
        return []
    events = []
    with open(path) as handle:
        for line in handle:
            if line.strip():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a killed rank may be torn
                if event.get("phase") == phase:
                    events.append(event)
    return events


def _phase_errors(work_dir: str, phase: str) -> str:
    texts = []
    for name in sorted(os.listdir(work_dir)):
        if name.startswith(f"error-{phase}-"):
            with open(os.path.join(work_dir, name)) as handle:
                texts.append(f"{name}:\n{handle.read()}")
    return "\n".join(texts)


def _run_until_preempted(options: TrainOptions, world_size: int, preempt_at: int, timeout_s: float) -> int:
    procs = _launch(options, world_size)
    deadline = time.monotonic() + timeout_s
    reached = 0
    while time.monotonic() < deadline:
        iterations = [e["iteration"] for e in _progress_events(options.work_dir, options.phase) if e["event"] == "iteration"]
        reached = max(iterations, default=0)
        if reached >= preempt_at or any(p.exitcode not in (None,) for p in procs):
            break
        time.sleep(0.05)
    for proc in procs:  # preemption: no warning, no cleanup, like a node going away
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
    for proc in procs:
        proc.join()
    if reached < preempt_at:
        raise RuntimeError(f"phase {options.phase!r} stopped at iteration {reached} before the preemption point:\n"
                           + _phase_errors(options.work_dir, options.phase))
    return reached


def _run_to_completion(options: TrainOptions, world_size: int, timeout_s: float) -> dict[str, Any]:
    procs = _launch(options, world_size)
    for proc in procs:
        proc.join(timeout=timeout_s)
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    if failed:
        raise RuntimeError(f"ranks {failed} of phase {options.phase!r} failed:\n" + _phase_errors(options.work_dir, options.phase))
    with open(os.path.join(options.work_dir, f"result-{options.phase}.json")) as handle:
        return dict(json.load(handle))


def _throughput(saves: list[dict[str, Any]]) -> str:
    total_bytes = sum(s["bytes"] for s in saves)
    total_s = sum(s["seconds"] for s in saves)
    if not total_bytes:
        return f"{len(saves)} save(s) in {total_s:.2f} s"
    return f"{len(saves)} save(s), {total_bytes / len(saves) / 1e6:.1f} MB each, {total_bytes / total_s / 1e6:.1f} MB/s"


def run_demo(options: DemoOptions) -> DemoReport:
    """Run the whole scenario and return the report (``report.ok`` is the verdict)."""
    from .verify import consolidate_and_verify

    report = DemoReport()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stmixer-demo-") as work_dir:
        base = TrainOptions(
            save_dir=options.save_dir,
            work_dir=work_dir,
            max_iter=options.max_iter,
            checkpoint_period=options.checkpoint_period,
            global_batch_size=options.global_batch_size,
            init_weights=options.init_weights,
            storage_options=dict(options.storage_options),
        )
        first = replace(base, phase="first", parallel=options.parallel)
        reached = _run_until_preempted(first, options.world_size, options.preempt_at, options.timeout_s)
        first_events = _progress_events(work_dir, "first")
        first_saves = [e for e in first_events if e["event"] == "saved"]
        report.lines.append(
            f"phase 1: {options.world_size} rank(s) {options.parallel}, trained to iteration {reached}, killed with SIGKILL; "
            f"{_throughput(first_saves)}"
        )
        if options.init_weights:
            first_load = next(e for e in first_events if e["event"] == "loaded")
            report.check(
                "phase 1 started from --init-weights",
                first_load["initialized_tensors"] > 0,
                f"{first_load['initialized_tensors']} tensors from {options.init_weights} in {first_load['seconds']:.2f} s",
            )
        expected_resume = (reached // options.checkpoint_period) * options.checkpoint_period
        reference = os.path.join(work_dir, "reference.pt")
        second = replace(base, phase="second", parallel=options.resume_parallel, reference_path=reference)
        result = _run_to_completion(second, options.resume_world_size, options.timeout_s)
        second_events = _progress_events(work_dir, "second")
        loaded = next(e for e in second_events if e["event"] == "loaded")
        load_rate = f", {loaded['bytes'] / loaded['seconds'] / 1e6:.1f} MB/s" if loaded["bytes"] else ""
        report.lines.append(
            f"phase 2: {options.resume_world_size} rank(s) {options.resume_parallel}, resumed from "
            f"{result['resumed_from'] or 'nothing'} at iteration {result['start_iter']} in {loaded['seconds']:.2f} s{load_rate}; "
            f"trained to {options.max_iter}; {_throughput(result['saves'])}"
        )
        report.check(
            "resumed from the last committed checkpoint",
            result["start_iter"] == expected_resume,
            f"iteration {result['start_iter']} (expected {expected_resume})",
        )
        report.check(
            "resumed on a different world size",
            options.resume_world_size != options.world_size or options.resume_parallel != options.parallel,
            f"{options.world_size} {options.parallel} -> {options.resume_world_size} {options.resume_parallel}",
        )
        consolidate_and_verify(options, reference, report)
    report.lines.append(f"wall time: {time.perf_counter() - started:.1f} s")
    return report


def run_under_torchrun(options: DemoOptions) -> DemoReport:
    """One training phase on torchrun's ranks; rank 0 then consolidates and verifies."""
    import torch.distributed as dist

    from .verify import consolidate_and_verify

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    report = DemoReport()
    with tempfile.TemporaryDirectory(prefix=f"stmixer-demo-rank{rank}-") as work_dir:
        reference = os.path.join(work_dir, "reference.pt")
        train_options = TrainOptions(
            save_dir=options.save_dir,
            work_dir=work_dir,
            max_iter=options.max_iter,
            checkpoint_period=options.checkpoint_period,
            global_batch_size=options.global_batch_size,
            parallel=options.parallel,
            init_weights=options.init_weights,
            storage_options=dict(options.storage_options),
            reference_path=reference,
        )
        result = train_on_rank(rank, world_size, train_options)
        dist.barrier()
        if rank == 0:
            report.lines.append(
                f"torchrun: {world_size} rank(s) {options.parallel}, started at iteration {result['start_iter']}"
                f" ({result['resumed_from'] or 'fresh'}); {_throughput(result['saves'])}"
            )
            consolidate_and_verify(options, reference, report)
        dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        report.check("rank finished", True)
    return report


__all__ += ["DEMO_MODEL_CONFIG"]
