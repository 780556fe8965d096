"""``stmixer-ckpt demo``: the end-to-end job (train, preempt, resume elsewhere, consolidate, verify)."""

from __future__ import annotations

import argparse
import os

from ._common import add_storage_options_argument, storage_options_from

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "demo",
        help="train an STMixer-style model on synthetic clips with sharded checkpoints, preempt, resume, consolidate",
        description=(
            "Train a SlowFast-R50-style video action model (PySlowFast names, CPU width) on synthetic clips "
            "under torch.distributed (gloo ranks it launches itself, or torchrun's ranks), save sharded "
            "checkpoints every --checkpoint-period iterations with iteration and person_pool, kill the ranks "
            "at --preempt-at, resume from last_checkpoint on --resume-world-size ranks, finish, consolidate "
            "model_final to one file and check it equals the trained model. Exit 0 only if every check passed."
        ),
    )
    parser.add_argument("--save-dir", default="demo_output", help="run directory: a local path or fsspec URL (default: %(default)s)")
    parser.add_argument("--world-size", type=int, default=2, help="ranks before the preemption (default: %(default)s)")
    parser.add_argument("--resume-world-size", type=int, default=3, help="ranks after the preemption (default: %(default)s)")
    parser.add_argument("--parallel", choices=("ddp", "fsdp2"), default="ddp", help="wrapping before the preemption")
    parser.add_argument("--resume-parallel", choices=("ddp", "fsdp2"), default="ddp", help="wrapping after the preemption")
    parser.add_argument("--max-iter", type=int, default=24, help="total iterations (default: %(default)s)")
    parser.add_argument("--checkpoint-period", type=int, default=4, help="iterations between checkpoints (default: %(default)s)")
    parser.add_argument("--preempt-at", type=int, default=10, help="iteration at which the ranks are killed (default: %(default)s)")
    parser.add_argument("--global-batch-size", type=int, default=6, help="must divide by both world sizes (default: %(default)s)")
    parser.add_argument("--init-weights", default="", metavar="PATH", help="initial weights (.pkl Caffe2 or .pth) when not resuming")
    add_storage_options_argument(parser)
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..demo.run import DemoOptions, run_demo, run_under_torchrun

    options = DemoOptions(
        save_dir=args.save_dir,
        world_size=args.world_size,
        resume_world_size=args.resume_world_size,
        parallel=args.parallel,
        resume_parallel=args.resume_parallel,
        max_iter=args.max_iter,
        checkpoint_period=args.checkpoint_period,
        preempt_at=args.preempt_at,
        global_batch_size=args.global_batch_size,
        init_weights=args.init_weights,
        storage_options=storage_options_from(args),
    )
    for size in {options.world_size, options.resume_world_size}:
        if options.global_batch_size % size:
            raise ValueError(f"--global-batch-size {options.global_batch_size} must divide by world size {size}")
    if not options.checkpoint_period <= options.preempt_at < options.max_iter:
        raise ValueError("--preempt-at must be at least --checkpoint-period and below --max-iter")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        report = run_under_torchrun(options)
        if int(os.environ["RANK"]) != 0:
            return 0 if report.ok else 1
    else:
        report = run_demo(options)
    print(report.render())
    return 0 if report.ok else 1
