"""Async save correctness: snapshot consistency, ordering, failures, kills. No timing assertions."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from stmixer_dist_ckpt import Checkpointer, CheckpointError, DistributedCheckpointError
from stmixer_dist_ckpt.snapshot import SnapshotModifiedError

from ._dist import run_distributed
from ._models import build, full_state, train_steps


def _fresh_load(save_dir: str, parallel: str = "single") -> tuple[dict[str, Any], dict[str, Any]]:
    model, optimizer, scheduler = build(parallel, seed=99)
    extras = Checkpointer(model, optimizer, scheduler, save_dir).load()
    return full_state(model, optimizer), dict(extras)


def _delay_staging(seconds: float, patch: Callable[[Any, str, Any], None] = setattr) -> None:
    """Hold every snapshot copy back, so the code under test runs while the save still reads live tensors.

    ``patch`` is ``monkeypatch.setattr`` in the test process; spawned ranks use plain ``setattr``.
    """
    import stmixer_dist_ckpt.snapshot as snapshot_module

    original_stage = snapshot_module.Snapshot.stage

    def slow_stage(self: Any) -> None:
        time.sleep(seconds)
        original_stage(self)

    patch(snapshot_module.Snapshot, "stage", slow_stage)


def test_training_right_after_save_does_not_change_what_is_written(tmp_path: Path) -> None:
    model, optimizer, scheduler = build("single")
    train_steps(model, optimizer, scheduler, 0, 3)
    expected = full_state(model, optimizer)
    ckpt = Checkpointer(model, optimizer, scheduler, str(tmp_path), save_to_disk=True, async_save=True)
    ckpt.save("model_0000003", iteration=3)
    train_steps(model, optimizer, scheduler, 3, 2)  # optimizer.step() right away
    ckpt.wait()
    saved, extras = _fresh_load(str(tmp_path))
    assert extras["iteration"] == 3
    assert torch.equal(saved["model"]["odd.weight"], expected["model"]["odd.weight"])
    assert torch.equal(saved["model"]["norm.running_mean"], expected["model"]["norm.running_mean"])
    for fqn, entry in expected["optimizer"].items():
        assert torch.equal(saved["optimizer"][fqn]["exp_avg"], entry["exp_avg"])
    assert not torch.equal(full_state(model, optimizer)["model"]["odd.weight"], expected["model"]["odd.weight"])


def test_back_to_back_saves_commit_in_order(tmp_path: Path) -> None:
    model, optimizer, scheduler = build("single")
    ckpt = Checkpointer(model, optimizer, scheduler, str(tmp_path), save_to_disk=True, async_save=True)
    states = []
    for step in range(1, 5):
        train_steps(model, optimizer, scheduler, step - 1, 1)
        states.append(full_state(model, optimizer))
        ckpt.save(f"model_{step:07d}", iteration=step)
    ckpt.wait()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004"
    for step in range(1, 5):
        fresh, fresh_opt, fresh_sched = build("single", seed=5)
        extras = Checkpointer(fresh, fresh_opt, fresh_sched).load(str(tmp_path / f"model_{step:07d}"))
        assert extras["iteration"] == step
        assert torch.equal(full_state(fresh, fresh_opt)["model"]["odd.weight"], states[step - 1]["model"]["odd.weight"])


def test_in_place_change_outside_the_optimizer_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer, scheduler = build("single")
    ckpt = Checkpointer(model, optimizer, scheduler, str(tmp_path), save_to_disk=True, async_save=True)
    ckpt.save("model_0000001", iteration=1)
    ckpt.wait()
    _delay_staging(0.5, monkeypatch.setattr)  # keep the copy pending while the test modifies a parameter
    ckpt.save("model_0000002", iteration=2)
    with torch.no_grad():
        model.odd.weight.add_(1.0)  # not through the optimizer, no wait_for_snapshot()
    with pytest.raises(SnapshotModifiedError, match=r"odd\.weight"):
        ckpt.wait()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001"
    assert not (tmp_path / "model_0000002" / "manifest.json").exists()

    ckpt.save("model_0000003", iteration=3)
    ckpt.wait_for_snapshot()  # the documented way to modify directly
    with torch.no_grad():
        model.odd.weight.add_(1.0)
    ckpt.wait()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003"


def test_no_staging_bytes_growth_across_saves(tmp_path: Path) -> None:
    model, optimizer, scheduler = build("single")
    ckpt = Checkpointer(model, optimizer, scheduler, str(tmp_path), save_to_disk=True, async_save=True)
    sizes = []
    for step in range(4):
        train_steps(model, optimizer, scheduler, step, 1)
        ckpt.save("model_latest", iteration=step)
        ckpt.wait()
        assert ckpt._async is not None
        sizes.append(ckpt._async.staging_bytes)
    assert sizes[0] > 0 and len(set(sizes)) == 1


# ------------------------------------------------------------------ multi-rank
def _async_ddp(rank: int, world: int, save_dir: str) -> dict[str, Any]:
    model, optimizer, scheduler = build("ddp")
    ckpt = Checkpointer(model, optimizer, scheduler, save_dir, save_to_disk=rank == 0, async_save=True)
    train_steps(model, optimizer, scheduler, 0, 2)
    expected = full_state(model, optimizer)
    ckpt.save("model_0000002", iteration=2)
    train_steps(model, optimizer, scheduler, 2, 3)  # training continues; collectives on the default group
    ckpt.save("model_0000005", iteration=5)  # waits for the first one
    ckpt.wait()
    return expected


def _async_load(rank: int, world: int, save_dir: str) -> dict[str, Any]:
    model, optimizer, scheduler = build("ddp", seed=7)
    extras = Checkpointer(model, optimizer, scheduler, save_dir).load(os.path.join(save_dir, "model_0000002"))
    assert extras["iteration"] == 2
    return full_state(model, optimizer)


def test_async_ddp_round_trip_while_training_continues(tmp_path: Path) -> None:
    from ._models import assert_states_equal

    save_dir = str(tmp_path / "run")
    expected = run_distributed(_async_ddp, 2, tmp_path, save_dir)
    loaded = run_distributed(_async_load, 2, tmp_path, save_dir)
    for state in loaded:
        assert_states_equal(state, expected[0])
    assert (tmp_path / "run" / "last_checkpoint").read_text() == "model_0000005"


def _background_failure(rank: int, world: int, save_dir: str) -> str:
    from stmixer_dist_ckpt._faults import ENV_VAR

    model, optimizer, scheduler = build("ddp")
    ckpt = Checkpointer(model, optimizer, scheduler, save_dir, save_to_disk=True, async_save=True)
    os.environ[ENV_VAR] = "save.before_commit@0:raise"  # rank 0's manifest write fails, in the background
    ckpt.save("model_0000001", iteration=1)
    train_steps(model, optimizer, scheduler, 0, 1)
    try:
        ckpt.save("model_0000002", iteration=2)  # the next call raises the background failure
    except DistributedCheckpointError as exc:
        assert "injected fault at save.before_commit" in str(exc)
        return "raised"
    return "not raised"


def test_background_failure_is_raised_on_the_next_call_on_every_rank(tmp_path: Path) -> None:
    outcome = run_distributed(_background_failure, 2, tmp_path, str(tmp_path / "run"))
    assert outcome == ["raised", "raised"]
    assert not (tmp_path / "run" / "last_checkpoint").exists()


def _killed_mid_write(rank: int, world: int, save_dir: str) -> None:
    import stmixer_dist_ckpt._dcp as dcp_module

    model, optimizer, scheduler = build("ddp")
    ckpt = Checkpointer(model, optimizer, scheduler, save_dir, save_to_disk=True, async_save=True)
    train_steps(model, optimizer, scheduler, 0, 1)
    ckpt.save("model_0000001", iteration=1)
    ckpt.wait()
    original_write = dcp_module._DigestingStream.write

    def stalling_write(self: Any, data: Any) -> int:
        written = original_write(self, data)
        time.sleep(30)  # the background writer is now mid-file
        return written

    dcp_module._DigestingStream.write = stalling_write  # type: ignore[method-assign]
    train_steps(model, optimizer, scheduler, 1, 1)
    ckpt.save("model_0000002", iteration=2)
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)  # preempted while the async write is in flight


def test_kill_during_async_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    save_dir = str(tmp_path / "run")
    with pytest.raises(AssertionError, match="no result"):
        run_distributed(_killed_mid_write, 2, tmp_path, save_dir, timeout=60)
    assert (tmp_path / "run" / "last_checkpoint").read_text() == "model_0000001"
    _, extras = _fresh_load(save_dir)
    assert extras["iteration"] == 1


def test_load_right_after_an_async_save_reads_the_new_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer, scheduler = build("single")
    ckpt = Checkpointer(model, optimizer, scheduler, str(tmp_path), save_to_disk=True, async_save=True)
    ckpt.save("model_0000001", iteration=1)
    ckpt.wait()
    _delay_staging(0.5, monkeypatch.setattr)
    train_steps(model, optimizer, scheduler, 0, 2)
    expected = full_state(model, optimizer)
    ckpt.save("model_0000002", iteration=2)
    extras = ckpt.load()  # from the tag: must wait for the save in flight, not read model_0000001
    assert extras["iteration"] == 2
    assert torch.equal(full_state(model, optimizer)["model"]["odd.weight"], expected["model"]["odd.weight"])


def _async_fsdp2_train_through_save(rank: int, world: int, save_dir: str) -> dict[str, Any]:
    _delay_staging(0.5)  # the forward, backward and step below all start before the copy
    model, optimizer, scheduler = build("fsdp2")
    # BatchNorm statistics are per rank under FSDP2 (each sees its own half batch); eval mode keeps
    # them equal, so every rank's expected state is the one the checkpoint must hold.
    model.eval()
    ckpt = Checkpointer(model, optimizer, scheduler, save_dir, save_to_disk=rank == 0, async_save=True)
    train_steps(model, optimizer, scheduler, 0, 2)
    expected = full_state(model, optimizer)
    ckpt.save("model_0000002", iteration=2)
    train_steps(model, optimizer, scheduler, 2, 2)  # FSDP2 all-gathers and reshards during the pending copy
    ckpt.wait()
    assert not torch.equal(full_state(model, optimizer)["model"]["odd.weight"], expected["model"]["odd.weight"])
    return expected


def _load_on_ddp(rank: int, world: int, save_dir: str) -> dict[str, Any]:
    model, optimizer, scheduler = build("ddp", seed=7)
    extras = Checkpointer(model, optimizer, scheduler, save_dir).load()
    assert extras["iteration"] == 2
    return full_state(model, optimizer)


def test_async_fsdp2_save_holds_the_state_of_save_time_and_reshards(tmp_path: Path) -> None:
    from ._models import assert_states_equal

    save_dir = str(tmp_path / "run")
    expected = run_distributed(_async_fsdp2_train_through_save, 2, tmp_path, save_dir)
    assert_states_equal(expected[1], expected[0])
    for state in run_distributed(_load_on_ddp, 2, tmp_path, save_dir):
        # the scheduler moved the lr after save(); the checkpoint holds the lr of save time
        assert_states_equal(state, expected[0])


_EXIT_WITHOUT_WAIT = """
import sys, time, torch
import stmixer_dist_ckpt.snapshot as snapshot_module
from stmixer_dist_ckpt import Checkpointer
from stmixer_dist_ckpt._faults import ENV_VAR

original_stage = snapshot_module.Snapshot.stage
def slow_stage(self):
    time.sleep(1.0)  # still copying when the script ends
    original_stage(self)
snapshot_module.Snapshot.stage = slow_stage

model = torch.nn.Linear(4, 3)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
ckpt = Checkpointer(model, optimizer, save_dir=sys.argv[1], save_to_disk=True, async_save=True, keep_last=1)
if sys.argv[2] == "keep_last":
    ckpt.save("model_0000000", iteration=0)
    ckpt.wait()  # the save in flight at exit must retire this one (retention uses a thread pool)
if sys.argv[2] == "fail":
    import os
    os.environ[ENV_VAR] = "save.before_commit:raise"
torch.save(model.state_dict(), sys.argv[1] + ".expected.pt")
ckpt.save("model_0000001", iteration=1)
print("script done", flush=True)  # no wait(): the interpreter's exit must wait
"""


@pytest.mark.parametrize("outcome", ["ok", "keep_last", "fail"])
def test_interpreter_exit_waits_for_the_save_in_flight(tmp_path: Path, outcome: str) -> None:
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", _EXIT_WITHOUT_WAIT, str(run_dir), outcome],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "script done" in result.stdout
    if outcome in ("ok", "keep_last"):
        assert "failed" not in result.stderr, result.stderr
        assert (run_dir / "last_checkpoint").read_text() == "model_0000001"
        assert not (run_dir / "model_0000000").exists()  # retired by keep_last=1
        expected = torch.load(str(run_dir) + ".expected.pt", weights_only=True)
        model = torch.nn.Linear(4, 3)
        assert Checkpointer(model, save_dir=str(run_dir)).load()["iteration"] == 1
        assert torch.equal(model.weight, expected["weight"])
    else:
        # a failure nobody waited for is still reported, naming the checkpoint
        assert "model_0000001" in result.stderr and "injected fault at save.before_commit" in result.stderr
        assert not (run_dir / "last_checkpoint").exists()


def test_a_scheduler_setting_a_tensor_lr_right_after_save_does_not_spoil_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """maskrcnn-benchmark's loop steps the scheduler at the top of the iteration, right after the
    previous save; with a tensor lr it does so in place (``fill_``). The save must keep the lr of
    save time, not fail."""

    def build_tensor_lr() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.01))
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 0.5**it)

    model, optimizer, scheduler = build_tensor_lr()
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    ckpt = Checkpointer(model, optimizer, scheduler, str(tmp_path), save_to_disk=True, async_save=True)
    _delay_staging(0.5, monkeypatch.setattr)
    ckpt.save("model_0000001", iteration=1)
    lr_at_save = float(optimizer.param_groups[0]["lr"])
    scheduler.step()  # fill_ on the lr tensor while the copy is pending
    assert float(optimizer.param_groups[0]["lr"]) != lr_at_save
    ckpt.wait()
    model2, optimizer2, scheduler2 = build_tensor_lr()
    assert Checkpointer(model2, optimizer2, scheduler2, str(tmp_path)).load()["iteration"] == 1
    assert float(optimizer2.param_groups[0]["lr"]) == lr_at_save


def _fsdp2_in_place_change_before_the_copy(rank: int, world: int, save_dir: str) -> str:
    _delay_staging(0.5)
    model, optimizer, scheduler = build("fsdp2")
    train_steps(model, optimizer, scheduler, 0, 1)
    ckpt = Checkpointer(model, optimizer, scheduler, save_dir, save_to_disk=rank == 0, async_save=True)
    ckpt.save("model_0000001", iteration=1)
    with torch.no_grad():
        model.odd.weight.add_(1.0)  # on the DTensor parameter: its shard's version counter does not move
    with pytest.raises(DistributedCheckpointError) as info:
        ckpt.wait()
    return str(info.value)


def test_an_in_place_change_of_an_fsdp2_parameter_before_the_copy_fails_loudly(tmp_path: Path) -> None:
    save_dir = tmp_path / "run"
    for message in run_distributed(_fsdp2_in_place_change_before_the_copy, 2, tmp_path, str(save_dir)):
        assert "modified in place" in message and "odd.weight" in message
    assert not (save_dir / "last_checkpoint").exists()
    assert not (save_dir / "model_0000001" / "manifest.json").exists()


def test_a_cleanup_failure_after_the_commit_does_not_fail_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import stmixer_dist_ckpt.retention as retention

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(retention, "_scan", refuse)
    model, optimizer, scheduler = build("single")
    for async_save in (False, True):
        ckpt = Checkpointer(model, optimizer, scheduler, str(tmp_path), save_to_disk=True, async_save=async_save)
        name = f"model_000000{int(async_save)}"
        ckpt.save(name, iteration=1)
        ckpt.wait()
        assert (tmp_path / "last_checkpoint").read_text() == name
    assert "cleaning up" in caplog.text and "cannot schedule new futures" in caplog.text


def _destroy_the_group_during_an_async_save(rank: int, world: int, save_dir: str) -> str:
    import torch.distributed as dist

    _delay_staging(0.5)
    model, optimizer, scheduler = build("ddp")
    ckpt = Checkpointer(model, optimizer, scheduler, save_dir, save_to_disk=rank == 0, async_save=True)
    ckpt.save("model_0000001", iteration=1)
    ckpt.wait()
    ckpt.save("model_0000002", iteration=2)
    dist.destroy_process_group()  # the common end-of-script idiom, without wait() first
    with pytest.raises(CheckpointError, match="process group was destroyed") as info:
        ckpt.wait()
    return str(info.value)


def test_destroying_the_process_group_during_an_async_save_commits_nothing(tmp_path: Path) -> None:
    """Without its group every rank would take DCP's single-process path, believe it is rank 0
    and commit a checkpoint holding only its own shard."""
    save_dir = tmp_path / "run"
    for message in run_distributed(_destroy_the_group_during_an_async_save, 2, tmp_path, str(save_dir)):
        assert "model_0000002" in message and "wait()" in message
    assert (save_dir / "last_checkpoint").read_text() == "model_0000001"
    assert not (save_dir / "model_0000002" / "manifest.json").exists()
    _, extras = _fresh_load(str(save_dir))
    assert extras["iteration"] == 1
