"""The demo's training loop: what runs on every rank of the demo job.

It is written the way an STMixer/AlphAction training script is (a Checkpointer
built with ``save_to_disk=(rank == 0)``, ``arguments`` seeded with
``iteration`` and ``person_pool`` and updated from ``load``, periodic
``model_{iteration:07d}`` saves and a ``model_final``), so it doubles as an
example of adopting the library without changing training code.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..action_checkpointer import ActionCheckpointer
from ..checkpointer import Checkpointer
from ..memory_pool import MemoryPool
from ..rank_state import RNGState
from .data import SyntheticClipConfig, batch_for_iteration
from .model import DemoModelConfig, build_demo_model

__all__ = ["TrainOptions", "train_on_rank", "DEMO_MODEL_CONFIG", "DEMO_CLIP_CONFIG"]

#: A two-pathway R50 at CPU width; 81 classes like AVA (80 actions + background).
DEMO_MODEL_CONFIG = DemoModelConfig(num_classes=81)
DEMO_CLIP_CONFIG = SyntheticClipConfig(num_classes=81, num_frames=8, height=32, width=32)


@dataclass(frozen=True)
class TrainOptions:
    """What one training phase does (picklable: it travels to spawned ranks).

    Attributes:
        save_dir: run directory, local path or fsspec URL.
        work_dir: local directory for progress and result files.
        max_iter: total iterations of the whole run.
        checkpoint_period: save ``model_{iteration:07d}`` every this many iterations.
        global_batch_size: samples per iteration over all ranks; must divide
            evenly by every world size the run uses.
        parallel: ``"ddp"`` or ``"fsdp2"``.
        init_weights: optional weights (``.pkl``/``.pth``) to start from when
            there is nothing to resume.
        storage_options: fsspec options for ``save_dir``.
        phase: a label written into progress lines.
        seed: data and initialization seed.
        reference_path: if set, rank 0 writes the final full model state here
            (a local file) so the demo can compare the consolidated copy with it.
    """

    save_dir: str
    work_dir: str
    max_iter: int = 24
    checkpoint_period: int = 4
    global_batch_size: int = 6
    parallel: str = "ddp"
    init_weights: str = ""
    storage_options: dict[str, Any] = field(default_factory=dict)
    phase: str = "train"
    seed: int = 0
    reference_path: str = ""


def _wrap(model: nn.Module, parallel: str) -> nn.Module:
    if not dist.is_initialized():
        return model
    if parallel == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for stage in ("s2", "s3", "s4", "s5"):
            fully_shard(getattr(model.backbone, stage), mesh=mesh)  # type: ignore[union-attr]
        fully_shard(model, mesh=mesh)
        return model
    return nn.parallel.DistributedDataParallel(model)


def _progress(options: TrainOptions, rank: int, event: str, **fields: Any) -> None:
    if rank != 0:
        return
    line = json.dumps({"phase": options.phase, "event": event, "time": time.time(), **fields})
    with open(os.path.join(options.work_dir, "progress.jsonl"), "a") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _checkpoint_bytes(location: str | None) -> int:
    if not location or "://" in location:
        return 0
    total = 0
    for root, _, files in os.walk(location):
        total += sum(os.path.getsize(os.path.join(root, name)) for name in files)
    return total


def train_on_rank(rank: int, world_size: int, options: TrainOptions) -> dict[str, Any]:
    """Train (resuming if a checkpoint exists) until ``max_iter``; returns a summary on rank 0."""
    torch.manual_seed(options.seed)
    model = _wrap(build_demo_model(DEMO_MODEL_CONFIG), options.parallel)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    milestones = [options.max_iter * 2 // 3]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    # ActionCheckpointer, as in STMixer's train_net.py: it also reads Caffe2 .pkl init weights.
    checkpointer = ActionCheckpointer(
        None,
        model,
        optimizer,
        scheduler,
        options.save_dir,
        save_to_disk=(rank == 0),  # the upstream idiom; every rank still writes its shards
        storage_options=options.storage_options,
        rank_states={"rng": RNGState()},
    )
    arguments: dict[str, Any] = {"iteration": 0, "person_pool": MemoryPool()}
    started = time.perf_counter()
    resumed_from = checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else ""
    loaded = checkpointer.resume_or_load(options.init_weights or None, resume=True)
    arguments.update(loaded)
    load_seconds = time.perf_counter() - started
    start_iter = int(arguments["iteration"])
    initialized = 0
    if not resumed_from and options.init_weights and loaded.report is not None:
        initialized = len(loaded.report.loaded)
    _progress(options, rank, "loaded", iteration=start_iter, checkpoint=resumed_from, seconds=load_seconds,
              world_size=world_size, bytes=_checkpoint_bytes(resumed_from), initialized_tensors=initialized)

    saves: list[dict[str, Any]] = []
    model.train()
    for iteration in range(start_iter, options.max_iter):
        (slow, fast), labels = batch_for_iteration(
            iteration, rank, world_size, options.global_batch_size, options.seed, config=DEMO_CLIP_CONFIG
        )
        loss = nn.functional.cross_entropy(model(slow, fast), labels)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        scheduler.step()
        done = iteration + 1
        arguments["iteration"] = done
        # A stand-in for AlphAction's long-term feature bank: per-clip features.
        arguments["person_pool"].update({f"movie_{done % 3}": {done: torch.full((4,), float(done))}})
        _progress(options, rank, "iteration", iteration=done, loss=loss.item())
        if done % options.checkpoint_period == 0 and done < options.max_iter:
            saves.append(_timed_save(checkpointer, f"model_{done:07d}", arguments))
            _progress(options, rank, "saved", **saves[-1])
    arguments.pop("person_pool")  # as upstream: the final checkpoint carries no pool
    saves.append(_timed_save(checkpointer, "model_final", arguments))
    _progress(options, rank, "saved", **saves[-1])
    if options.reference_path:
        _write_reference(model, rank, options.reference_path)
    return {"start_iter": start_iter, "resumed_from": resumed_from, "load_seconds": load_seconds, "saves": saves}


def _timed_save(checkpointer: Checkpointer, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    location = checkpointer.save(name, **arguments)
    seconds = time.perf_counter() - started
    return {"name": name, "location": location, "seconds": seconds, "bytes": _checkpoint_bytes(location)}


def _write_reference(model: nn.Module, rank: int, path: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # collective under FSDP2
    if rank == 0:
        torch.save({key: value.detach().clone() for key, value in full.items() if isinstance(value, torch.Tensor)}, path)


def options_as_dict(options: TrainOptions) -> dict[str, Any]:
    return asdict(options)
