"""Multi-rank round trips, resharding and resume equivalence on gloo ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from stmixer_dist_ckpt import Checkpointer, MemoryPool, RNGState, register_safe_class
from stmixer_dist_ckpt.errors import DistributedCheckpointError

from ._dist import run_distributed
from ._models import RunStats, assert_states_equal, build, full_state, train_steps

pytestmark = pytest.mark.dist


# ---------------------------------------------------------------- rank bodies
def _save_body(rank: int, world: int, save_dir: str, parallel: str, steps: int) -> dict[str, Any]:
    model, optimizer, scheduler = build(parallel)
    train_steps(model, optimizer, scheduler, 0, steps)
    pool = MemoryPool()
    pool["movie", 902] = torch.arange(3.0)
    ckpt = Checkpointer(model, optimizer, scheduler, save_dir, save_to_disk=(rank == 0))
    ckpt.save(
        f"model_{steps:07d}",
        iteration=steps,
        person_pool=pool,
        stats=RunStats(0.5, [1.0, 0.7]),
        note="hello",
    )
    return full_state(model, optimizer)


def _load_body(rank: int, world: int, save_dir: str, parallel: str) -> dict[str, Any]:
    register_safe_class(RunStats)
    model, optimizer, scheduler = build(parallel, seed=123)  # different init: load must overwrite it
    extras = Checkpointer(model, optimizer, scheduler, save_dir).load()
    assert extras["iteration"] == 4
    assert extras["note"] == "hello"
    assert extras["stats"] == RunStats(0.5, [1.0, 0.7])
    assert torch.equal(extras["person_pool"]["movie", 902], torch.arange(3.0))
    assert scheduler.last_epoch == 4
    state = full_state(model, optimizer)
    state["rank"] = rank
    return state


@pytest.mark.parametrize(
    ("save_ws", "save_par", "load_ws", "load_par"),
    [
        pytest.param(1, "single", 1, "single", id="ws1-roundtrip"),
        pytest.param(2, "ddp", 2, "ddp", id="ws2-ddp-roundtrip"),
        pytest.param(4, "fsdp2", 2, "ddp", id="fsdp2x4-to-ddp2", marks=pytest.mark.xdist_group("ws4")),
        pytest.param(2, "ddp", 1, "single", id="ddp2-to-single"),
        pytest.param(1, "single", 3, "fsdp2", id="single-to-fsdp2x3"),
        pytest.param(2, "fsdp2", 4, "ddp", id="fsdp2x2-to-ddp4", marks=pytest.mark.xdist_group("ws4")),
        pytest.param(2, "ddp", 2, "fsdp2", id="ddp2-to-fsdp2x2"),
    ],
)
def test_round_trip_and_resharding(tmp_path: Path, save_ws: int, save_par: str, load_ws: int, load_par: str) -> None:
    save_dir = str(tmp_path / "run")
    if save_ws == 1:
        saved = [_save_body(0, 1, save_dir, save_par, 4)]
    else:
        saved = run_distributed(_save_body, save_ws, tmp_path, save_dir, save_par, 4)
    if load_ws == 1:
        loaded = [_load_body(0, 1, save_dir, load_par)]
    else:
        loaded = run_distributed(_load_body, load_ws, tmp_path, save_dir, load_par)
    for state in loaded:  # asserted for every rank: no rank may have skipped work
        assert_states_equal(state, saved[0])


def _resume_body(rank: int, world: int, save_dir: str, phase: str) -> dict[str, Any]:
    model, optimizer, scheduler = build("ddp")
    rng = RNGState()
    ckpt = Checkpointer(model, optimizer, scheduler, save_dir, save_to_disk=True, rank_states={"rng": rng})
    if phase == "reference":
        train_steps(model, optimizer, scheduler, 0, 5)
        torch.manual_seed(77 + rank)
        noise = torch.rand(2)
        train_steps(model, optimizer, scheduler, 5, 3)
    elif phase == "first":
        train_steps(model, optimizer, scheduler, 0, 5)
        torch.manual_seed(77 + rank)  # per-rank RNG stream, saved per rank
        ckpt.save("model_0000005", iteration=5)
        return {}
    else:
        extras = ckpt.load()
        assert extras["iteration"] == 5
        noise = torch.rand(2)  # continues rank's own stream: same as the reference
        train_steps(model, optimizer, scheduler, 5, 3)
    state = full_state(model, optimizer)
    state["noise"] = noise
    return state


def test_resume_is_bitwise_equal_to_uninterrupted_training(tmp_path: Path) -> None:
    save_dir = str(tmp_path / "run")
    reference = run_distributed(_resume_body, 2, tmp_path, save_dir, "reference")
    run_distributed(_resume_body, 2, tmp_path, save_dir, "first")
    resumed = run_distributed(_resume_body, 2, tmp_path, save_dir, "second")
    for rank in range(2):
        assert_states_equal(resumed[rank], reference[rank], exact=True)
        assert torch.equal(resumed[rank]["noise"], reference[rank]["noise"]), f"rank {rank} RNG stream not restored"
    assert not torch.equal(resumed[0]["noise"], resumed[1]["noise"])


def _rank_state_other_world(rank: int, world: int, save_dir: str) -> list[str]:
    import logging

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("stmixer_dist_ckpt").addHandler(Collect())
    model, optimizer, scheduler = build("ddp")
    rng = RNGState()
    before = torch.get_rng_state()
    Checkpointer(model, optimizer, scheduler, save_dir, rank_states={"rng": rng}).load()
    assert torch.equal(torch.get_rng_state(), before), "per-rank state from another world size must not be applied"
    from stmixer_dist_ckpt.errors import IncompatibleCheckpointError

    try:
        Checkpointer(model, optimizer, scheduler, save_dir, rank_states={"rng": rng}, rank_state_policy="error").load()
    except IncompatibleCheckpointError as exc:
        assert "per-rank state of 2 rank(s)" in str(exc)
    else:
        raise AssertionError("rank_state_policy='error' must raise on another world size")
    return [r for r in records if "per-rank state" in r]


@pytest.mark.xdist_group("ws4")
def test_rank_state_on_another_world_size_is_skipped_with_a_warning(tmp_path: Path) -> None:
    save_dir = str(tmp_path / "run")
    run_distributed(_resume_body, 2, tmp_path, save_dir, "first")
    warnings = run_distributed(_rank_state_other_world, 3, tmp_path, save_dir)
    for rank_warnings in warnings:
        assert any("keeping every rank's current per-rank state" in w for w in rank_warnings)


def _failing_save(rank: int, world: int, save_dir: str) -> str:
    model, optimizer, scheduler = build("ddp")
    ckpt = Checkpointer(model, optimizer, scheduler, save_dir, save_to_disk=True)
    ckpt.save("model_0000001", iteration=1)
    extra: dict[str, Any] = {"iteration": 2}
    if rank == 0:
        extra["bad"] = lambda: None  # cannot be pickled: rank 0 fails while capturing state
    try:
        ckpt.save("model_0000002", **extra)
    except DistributedCheckpointError as exc:
        assert 0 in exc.failures and 1 not in exc.failures
        return str(exc).splitlines()[0]
    raise AssertionError("save must raise on every rank")


def test_one_rank_failing_makes_every_rank_raise_and_keeps_the_tag(tmp_path: Path) -> None:
    save_dir = tmp_path / "run"
    messages = run_distributed(_failing_save, 2, tmp_path, str(save_dir))
    assert messages[0] == messages[1]
    assert "rank(s) 0" in messages[0]
    assert (save_dir / "last_checkpoint").read_text() == "model_0000001"


def _legacy_rank0_only(rank: int, world: int, save_dir: str) -> list[str]:
    model, optimizer, scheduler = build("ddp")
    train_steps(model, optimizer, scheduler, 0, 2)
    # The upstream training script: only rank 0 "saves to disk"; no rank may hang.
    Checkpointer(model, optimizer, scheduler, save_dir, save_to_disk=dist.get_rank() == 0).save("model_0000002")
    nothing = Checkpointer(model, optimizer, scheduler, save_dir, save_to_disk=None).save("model_0000003")
    assert nothing is None
    empty_dir = Checkpointer(model, optimizer, scheduler, "", save_to_disk=True).save("model_0000004")
    assert empty_dir is None
    return sorted(p.name for p in Path(save_dir).iterdir())


def test_legacy_save_to_disk_rank0_writes_every_rank_shards(tmp_path: Path) -> None:
    save_dir = tmp_path / "run"
    listing = run_distributed(_legacy_rank0_only, 2, tmp_path, str(save_dir))
    assert listing[0] == ["last_checkpoint", "model_0000002"]
    manifest = (save_dir / "model_0000002" / "manifest.json").read_text()
    assert '"world_size": 2' in manifest and '"layout": "ddp"' in manifest
    data_dirs = list((save_dir / "model_0000002").glob("data-*"))
    assert len(data_dirs) == 1
    assert sorted(p.name for p in data_dirs[0].iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
