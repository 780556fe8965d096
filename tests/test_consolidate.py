"""Consolidation, partial reads and single-file -> sharded conversion.

Multi-rank checkpoints come from real gloo ranks (FSDP2 for world sizes 2 and 4,
so every parameter is split into per-rank chunks, some of them empty because
the tensor has fewer rows than there are ranks). Each world size spawns once;
every check on its checkpoint runs in the test process afterwards.
"""

from __future__ import annotations

import gc
import io
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from stmixer_dist_ckpt import Checkpointer, CheckpointExistsError, MemoryPool
from stmixer_dist_ckpt.consolidate import consolidate, read_checkpoint_entries
from stmixer_dist_ckpt.errors import (
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    UnsafeCheckpointError,
)
from stmixer_dist_ckpt.inspect_checkpoint import inspect_checkpoint
from stmixer_dist_ckpt.single_to_sharded import convert_to_sharded
from tests._dist import run_distributed

ROOT = Path(__file__).resolve().parents[1]

# Checkpointer.save without a process group: DCP says it assumes a single process, which is the point.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


class _Net(nn.Module):
    """Small, but with what consolidation must get right: tensors with fewer rows than ranks,
    an integer buffer, a 0-d buffer, and a parameter that only some optimizer groups hold."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.proj = nn.Linear(6, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)  # bias of 3 elements: on 4 ranks one shard is empty
        self.gate = nn.Parameter(torch.full((1,), 0.5))  # 1 element
        self.temperature: torch.Tensor
        self.register_buffer("temperature", torch.tensor(2.0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.proj(self.embed(tokens)))
        logits: torch.Tensor = self.head(hidden * self.gate)
        return logits / self.temperature


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """Two parameter groups with their own lr, as STMixer builds them."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    groups: list[dict[str, Any]] = [{"params": decay}, {"params": rest, "lr": 0.01}]
    return torch.optim.AdamW(groups, lr=0.05)


def _train(model: nn.Module, steps: int = 2) -> tuple[torch.optim.Optimizer, Any]:
    """A few AdamW steps with a scheduler, so moments, step counts and lr all differ from fresh."""
    optimizer = _optimizer(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        tokens = torch.randint(0, 10, (12,), generator=generator)
        model(tokens).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return optimizer, scheduler


def _save_rank(rank: int, world_size: int, save_dir: str) -> dict[str, Any] | None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    torch.manual_seed(0)
    model = _Net()
    if world_size > 1:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    optimizer, scheduler = _train(model)
    pool = MemoryPool()
    pool["movie", 902] = [1.0, 2.0]
    Checkpointer(model, optimizer, scheduler, save_dir, rank == 0).save("model_0000002", iteration=2, person_pool=pool)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=full)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=full)
    if rank != 0:
        return None
    return {"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict()}


def _check_checkpoint(tmp_path: Path, world_size: int, reference: dict[str, Any]) -> None:
    checkpoint = str(tmp_path / "run" / "model_0000002")
    out = str(tmp_path / "model.pth")
    summary = consolidate(checkpoint, out, progress=False)
    assert summary.saved_world_size == world_size
    assert any("person_pool" in what for what in summary.dropped)

    loaded = torch.load(out, weights_only=True)
    assert list(loaded) == ["model", "optimizer", "scheduler", "iteration"]  # the legacy Checkpointer layout
    assert loaded["iteration"] == 2 and loaded["scheduler"] == reference["scheduler"]
    assert loaded["model"].keys() == reference["model"].keys()
    for key, value in reference["model"].items():
        assert torch.equal(loaded["model"][key], value), key

    # The optimizer gets its moments back through the plain PyTorch API.
    fresh = _Net()
    fresh.load_state_dict(loaded["model"])
    optimizer = _optimizer(fresh)
    assert sorted(loaded["optimizer"]["state"]) == list(range(len(list(fresh.parameters()))))
    optimizer.load_state_dict(loaded["optimizer"])
    by_name = dict(fresh.named_parameters())
    saved_state = reference["optimizer"]["state"]
    for name, param in by_name.items():
        for moment in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[param][moment], saved_state[name][moment]), (name, moment)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in reference["optimizer"]["param_groups"]]

    # The legacy single-file path of Checkpointer reads it too; `keep` restores the memory pool.
    kept = str(tmp_path / "kept.pth")
    assert consolidate(checkpoint, kept, unsafe_extras="keep", progress=False).needs_safe_loader
    model = _Net()
    optimizer = _optimizer(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)  # built before load, as in training
    extras = Checkpointer(model, optimizer, scheduler).load(kept, strict=True)
    assert scheduler.state_dict() == reference["scheduler"]
    assert extras["iteration"] == 2 and extras["person_pool"]["movie", 902] == [1.0, 2.0]
    with pytest.raises(pickle.UnpicklingError, match="MemoryPool"):
        torch.load(kept, weights_only=True)

    # Partial reads touch only what was asked for.
    assert read_checkpoint_entries(checkpoint, "extra.iteration") == {"extra": {"iteration": 2}}
    head = read_checkpoint_entries(checkpoint, "model.head")["model"]
    assert sorted(head) == ["head.bias", "head.weight"]
    assert torch.equal(head["head.bias"], reference["model"]["head.bias"])
    info = inspect_checkpoint(checkpoint)
    assert info.world_size == world_size and info.layout == ("single" if world_size == 1 else "fsdp2")
    chunks = {entry.key: entry.chunks for entry in info.entries}
    assert chunks["model.proj.weight"] == world_size

    # safetensors, with dtype conversion of float tensors only.
    st_path = str(tmp_path / "model.safetensors")
    consolidate(checkpoint, st_path, format="safetensors", dtype="bf16", progress=False)
    tensors = load_file(st_path)
    assert tensors["norm.num_batches_tracked"].dtype == torch.int64
    for key, value in reference["model"].items():
        expected = value.to(torch.bfloat16) if value.is_floating_point() else value
        assert torch.equal(tensors[key], expected), key


@pytest.mark.dist
@pytest.mark.parametrize(
    "world_size",
    [pytest.param(1, id="ws1"), pytest.param(2, id="ws2"), pytest.param(4, id="ws4", marks=pytest.mark.xdist_group("ws4"))],
)
def test_consolidate_round_trip(tmp_path: Path, world_size: int) -> None:
    if world_size == 1:  # no process group at all: the single-process path of a training script
        reference = _save_rank(0, 1, str(tmp_path / "run"))
    else:
        reference = run_distributed(_save_rank, world_size, tmp_path, str(tmp_path / "run"))[0]
    assert reference is not None
    _check_checkpoint(tmp_path, world_size, reference)


def _tiny_checkpoint(save_dir: Path) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = _Net()
    optimizer, scheduler = _train(model)
    Checkpointer(model, optimizer, scheduler, str(save_dir), True).save("model_0000002", iteration=2)
    return model, optimizer


def test_single_file_to_sharded_and_back(tmp_path: Path) -> None:
    model, optimizer = _tiny_checkpoint(tmp_path / "run")
    single = str(tmp_path / "model.pth")
    consolidate(str(tmp_path / "run"), single, progress=False)  # a save_dir means its tagged checkpoint

    with pytest.raises(IncompatibleCheckpointError, match="model_only"):
        convert_to_sharded(single, str(tmp_path / "back" / "model_0000002"))
    with pytest.raises(IncompatibleCheckpointError, match="optimizer="):  # its groups are not in model order
        convert_to_sharded(single, str(tmp_path / "back" / "model_0000002"), model=_Net())
    template = _Net()
    back = convert_to_sharded(
        single, str(tmp_path / "back" / "model_0000002"), model=template, optimizer=_optimizer(template), overwrite=True
    )
    with pytest.raises(CheckpointExistsError):
        convert_to_sharded(single, back, model_only=True)

    restored = _Net()
    restored_optimizer = _optimizer(restored)
    scheduler = torch.optim.lr_scheduler.StepLR(restored_optimizer, step_size=1, gamma=0.5)
    extras = Checkpointer(restored, restored_optimizer, scheduler).load(back)
    assert extras["iteration"] == 2
    for (name, param), restored_param in zip(model.named_parameters(), restored.parameters(), strict=True):
        assert torch.equal(param, restored_param), name
        assert torch.equal(optimizer.state[param]["exp_avg"], restored_optimizer.state[restored_param]["exp_avg"]), name

    again = str(tmp_path / "again.pth")
    consolidate(back, again, progress=False)
    first, second = torch.load(single, weights_only=True), torch.load(again, weights_only=True)
    assert first.keys() == second.keys() and first["optimizer"]["param_groups"] == second["optimizer"]["param_groups"]
    for key in first["model"]:
        assert torch.equal(first["model"][key], second["model"][key])

    # A DDP-saved legacy file: the "module." prefix is stripped; a bare state dict works too.
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "iteration": 7}, legacy)
    sharded = convert_to_sharded(str(legacy), str(tmp_path / "legacy" / "model_0000007"))
    assert read_checkpoint_entries(sharded, "extra") == {"extra": {"iteration": 7}}
    assert sorted(read_checkpoint_entries(sharded)["model"]) == sorted(model.state_dict())


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.out = nn.Linear(4, 5, bias=False)
        self.out.weight = self.embed.weight  # tied, as language-model heads are
        self.transposed = nn.Parameter(torch.randn(3, 4).t())  # non-contiguous


def test_safetensors_with_tied_and_non_contiguous_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Tied()
    assert not model.transposed.is_contiguous()
    Checkpointer(model, save_dir=str(tmp_path / "run"), save_to_disk=True).save("model_0000001")
    path = str(tmp_path / "tied.safetensors")
    summary = consolidate(str(tmp_path / "run" / "model_0000001"), path, progress=False)  # format from the call
    assert summary.format == "torch"
    consolidate(str(tmp_path / "run" / "model_0000001"), path, format="safetensors", progress=False, overwrite=True)
    tensors = load_file(path)
    assert torch.equal(tensors["embed.weight"], tensors["out.weight"])
    assert torch.equal(tensors["transposed"], model.transposed.detach())
    restored = _Tied()
    restored.load_state_dict(tensors, strict=True)
    assert restored.out.weight is restored.embed.weight and torch.equal(restored.embed.weight, model.embed.weight)
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_failures_are_reported_before_writing(tmp_path: Path) -> None:
    _tiny_checkpoint(tmp_path / "run")
    checkpoint = tmp_path / "run" / "model_0000002"
    out = tmp_path / "out.pth"
    consolidate(str(checkpoint), str(out), progress=False)
    with pytest.raises(CheckpointExistsError):
        consolidate(str(checkpoint), str(out), progress=False)
    with pytest.raises(ValueError, match="floating-point"):
        consolidate(str(checkpoint), str(out), dtype=torch.int8, overwrite=True)
    with pytest.raises(IncompatibleCheckpointError, match="nothing under"):
        read_checkpoint_entries(str(checkpoint), "model.nope")

    pooled = tmp_path / "pooled"
    model = _Net()
    Checkpointer(model, save_dir=str(pooled), save_to_disk=True).save("model_0000001", person_pool=MemoryPool())
    with pytest.raises(UnsafeCheckpointError, match="person_pool"):
        consolidate(str(pooled), str(tmp_path / "strict.pth"), unsafe_extras="error", progress=False)
    assert not (tmp_path / "strict.pth").exists()

    data_dir = next(checkpoint.glob("data-*"))
    shard = next(data_dir.glob("*.distcp"))
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    with pytest.raises(CorruptCheckpointError):
        consolidate(str(checkpoint), str(tmp_path / "broken.pth"), progress=False)
    assert not (tmp_path / "broken.pth").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".broken.pth")]


@pytest.mark.parametrize("output_format", ["torch", "safetensors"])
def test_failure_while_writing_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output_format: Literal["torch", "safetensors"]
) -> None:
    from stmixer_dist_ckpt._dcp_items import DcpItemReader

    _tiny_checkpoint(tmp_path / "run")
    original = DcpItemReader.read_tensor
    calls = []

    def fail_midway(self: DcpItemReader, item: Any, buffer: Any = None) -> torch.Tensor:
        calls.append(item.key)
        if len(calls) > 3:
            raise CorruptCheckpointError("bad chunk")
        return original(self, item, buffer)

    monkeypatch.setattr(DcpItemReader, "read_tensor", fail_midway)
    with pytest.raises(CorruptCheckpointError, match="bad chunk"):
        consolidate(str(tmp_path / "run"), str(tmp_path / "out.bin"), format=output_format, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # neither the file nor its temp


def test_output_matches_torch_save_byte_layout(tmp_path: Path) -> None:
    """The streamed file is the archive torch.save writes: same records, same pickle, loadable with mmap."""
    import zipfile

    model = _Net()
    Checkpointer(model, save_dir=str(tmp_path / "run"), save_to_disk=True).save("model_0000001")
    out = tmp_path / "model.pth"
    consolidate(str(tmp_path / "run"), str(out), model_only=True, progress=False)
    reference = io.BytesIO()
    torch.save({"model": dict(model.state_dict())}, reference)
    ours, theirs = zipfile.ZipFile(out), zipfile.ZipFile(reference)
    assert ours.testzip() is None  # every record's CRC is right
    pickles = [name for name in ours.namelist() if name.endswith("/data.pkl")]
    assert ours.read(pickles[0]) == theirs.read("archive/data.pkl")
    assert [n.split("/", 1)[1] for n in ours.namelist()] == [n.split("/", 1)[1] for n in theirs.namelist()]
    mapped = torch.load(out, weights_only=True, mmap=True)
    for key, value in model.state_dict().items():
        assert torch.equal(mapped["model"][key], value)


_MEMORY_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from stmixer_dist_ckpt.consolidate import consolidate

    def rss_kib(field):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

    baseline = rss_kib("VmRSS")
    try:  # reset the high-water mark so import-time peaks do not count
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        peak_source = "VmHWM"
    except OSError:
        peak_source = "ru_maxrss"
    summary = consolidate(sys.argv[1], sys.argv[2], progress=False)
    peak = rss_kib("VmHWM") if peak_source == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_above_baseline": (peak - baseline) * 1024, "bytes": summary.tensor_bytes}))
    """
)


def test_peak_memory_stays_near_the_largest_tensor(tmp_path: Path) -> None:
    import json

    tensors = {f"layer{i}.weight": torch.full((800, 4096), float(i)) for i in range(16)}  # 16 x 12.5 MiB = 200 MiB
    holder = nn.Module()
    for name, value in tensors.items():
        holder.register_buffer(name.replace(".", "_"), value)
    Checkpointer(holder, save_dir=str(tmp_path / "run"), save_to_disk=True).save("model_0000001")
    del holder, tensors
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(tmp_path / "run"), str(tmp_path / "out.pth")],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    total = measured["bytes"]
    assert total == 16 * 800 * 4096 * 4
    # The bound is 15% of the checkpoint; the design keeps about one tensor (6%) plus buffers.
    assert measured["peak_above_baseline"] < 0.15 * total, measured


def test_fsspec_source_and_destination_with_progress(capsys: pytest.CaptureFixture[str]) -> None:
    """Reads and writes through fsspec (here memory://), and the progress bar when asked for."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    root = f"memory://consolidate-{os.getpid()}"
    try:
        model = _Net()
        Checkpointer(model, save_dir=f"{root}/run", save_to_disk=True).save("model_0000001", iteration=1)
        summary = consolidate(f"{root}/run", f"{root}/out.pth", progress=True)
        assert summary.destination == f"{root}/out.pth"
        assert "consolidate -> out.pth" in capsys.readouterr().err
        with fsspec.open(f"{root}/out.pth", "rb") as handle:
            loaded = torch.load(io.BytesIO(handle.read()), weights_only=True)
        assert loaded["iteration"] == 1
        for key, value in model.state_dict().items():
            assert torch.equal(loaded["model"][key], value)
        assert read_checkpoint_entries(f"{root}/run", "model.head.bias")["model"]["head.bias"].shape == (3,)
    finally:
        MemoryFileSystem().rm(root, recursive=True)


@pytest.mark.s3
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_s3_source_and_destination_and_no_partial_object(s3_bucket: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from stmixer_dist_ckpt._dcp_items import DcpItemReader
    from stmixer_dist_ckpt.errors import StorageError
    from tests.s3_server import s3_filesystem

    options = s3_bucket.storage_options
    run = f"{s3_bucket.url}/run"
    model = _Net()
    Checkpointer(model, save_dir=run, save_to_disk=True, storage_options=options).save("model_0000001", iteration=3)
    consolidate(run, f"{s3_bucket.url}/final.pth", storage_options=options, progress=False)
    filesystem = s3_filesystem(options)
    loaded = torch.load(io.BytesIO(filesystem.cat_file(f"{s3_bucket.name}/final.pth")), weights_only=True)
    assert loaded["iteration"] == 3
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value)

    original = DcpItemReader.read_tensor
    calls = []

    def fail_midway(self: DcpItemReader, item: Any, buffer: Any = None) -> torch.Tensor:
        calls.append(item.key)
        if len(calls) > 3:
            raise OSError("connection reset")
        return original(self, item, buffer)

    monkeypatch.setattr(DcpItemReader, "read_tensor", fail_midway)
    with pytest.raises(StorageError, match="connection reset"):
        consolidate(run, f"{s3_bucket.url}/broken.pth", storage_options=options, progress=False)
    assert not filesystem.exists(f"{s3_bucket.name}/broken.pth")  # the upload was discarded, not completed
    gc.collect()  # the discarded upload must not try to flush its dropped buffer when collected
