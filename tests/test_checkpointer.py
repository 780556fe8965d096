"""Single-process behaviour of Checkpointer: tag semantics, flags, bad input."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from stmixer_dist_ckpt import (
    Checkpointer,
    CheckpointNotFoundError,
    IncompatibleCheckpointError,
    IncompleteCheckpointError,
    MemoryPool,
)

from ._models import TinyDetector, assert_states_equal, build, full_state, train_steps


def _trained(save_dir: Path, steps: int = 4, **extra: object) -> tuple[Checkpointer, str]:
    model, optimizer, scheduler = build("single")
    train_steps(model, optimizer, scheduler, 0, steps)
    ckpt = Checkpointer(model, optimizer, scheduler, str(save_dir), save_to_disk=True)
    location = ckpt.save(f"model_{steps:07d}", iteration=steps, **extra)
    assert location is not None
    return ckpt, location


def test_tag_holds_the_name_relative_to_save_dir(tmp_path: Path) -> None:
    _trained(tmp_path / "run")
    assert (tmp_path / "run" / "last_checkpoint").read_text() == "model_0000004"


def test_moved_run_directory_still_resumes(tmp_path: Path) -> None:
    ckpt, _ = _trained(tmp_path / "run")
    expected = full_state(ckpt.model, ckpt.optimizer)  # type: ignore[arg-type]
    shutil.move(str(tmp_path / "run"), str(tmp_path / "moved"))
    model, optimizer, scheduler = build("single", seed=5)
    moved = Checkpointer(model, optimizer, scheduler, str(tmp_path / "moved"))
    assert moved.get_checkpoint_file() == str(tmp_path / "moved" / "model_0000004")
    assert moved.load()["iteration"] == 4
    assert torch.equal(full_state(model, optimizer)["model"]["odd.weight"], expected["model"]["odd.weight"])


@pytest.mark.parametrize("form", ["absolute", "cwd-relative", "absolute-gone"])
def test_legacy_tag_with_a_path_is_read(tmp_path: Path, form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    _trained(run)
    tag = run / "last_checkpoint"
    if form == "absolute":
        tag.write_text(str(run / "model_0000004"))
    elif form == "cwd-relative":
        monkeypatch.chdir(tmp_path)
        tag.write_text("./run/model_0000004")
    else:  # upstream wrote a full path; the run was moved since, so only the basename is usable
        tag.write_text("/old/cluster/output/model_0000004")
    model, optimizer, scheduler = build("single", seed=5)
    ckpt = Checkpointer(model, optimizer, scheduler, str(run))
    assert ckpt.get_checkpoint_file() == str(run / "model_0000004")
    assert ckpt.load()["iteration"] == 4


def test_tag_is_written_only_after_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    _trained(run, steps=4)
    from stmixer_dist_ckpt._faults import ENV_VAR

    monkeypatch.setenv(ENV_VAR, "save.before_commit:raise")  # the manifest write fails
    model, optimizer, scheduler = build("single")
    with pytest.raises(OSError, match=r"injected fault at save\.before_commit"):
        Checkpointer(model, optimizer, scheduler, str(run), save_to_disk=True).save("model_0000008", iteration=8)
    monkeypatch.delenv(ENV_VAR)
    assert (run / "last_checkpoint").read_text() == "model_0000004"
    with pytest.raises(IncompleteCheckpointError, match="incomplete checkpoint"):
        Checkpointer(model, optimizer, scheduler, str(run)).load(str(run / "model_0000008"))
    assert Checkpointer(model, optimizer, scheduler, str(run)).load()["iteration"] == 4


def test_explicit_f_wins_over_the_tag(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _trained(run, steps=4)
    _trained(run, steps=6)
    model, optimizer, scheduler = build("single")
    ckpt = Checkpointer(model, optimizer, scheduler, str(run))
    assert ckpt.load(str(run / "model_0000004"))["iteration"] == 4
    assert ckpt.load()["iteration"] == 6


def test_nothing_to_load_logs_and_returns_empty(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, optimizer, scheduler = build("single")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO):
        assert Checkpointer(model, optimizer, scheduler, str(tmp_path)).load() == {}
        assert Checkpointer(model, optimizer, scheduler, "").load(None) == {}
    assert "No checkpoint found" in caplog.text
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_missing_f_names_the_path(tmp_path: Path) -> None:
    model, _, _ = build("single")
    missing = tmp_path / "nope" / "model_0000001"
    with pytest.raises(CheckpointNotFoundError, match=str(missing)):
        Checkpointer(model).load(str(missing))


def test_save_dir_empty_or_save_to_disk_unset_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model, optimizer, scheduler = build("single")
    assert Checkpointer(model, optimizer, scheduler, "", save_to_disk=True).save("model_0000001") is None
    assert Checkpointer(model, optimizer, scheduler, str(tmp_path / "r")).save("model_0000001") is None
    assert os.listdir(tmp_path) == []


def test_model_weight_only_resets_iteration_and_pool(tmp_path: Path) -> None:
    pool = MemoryPool()
    pool["m", 1] = torch.ones(1)
    ckpt, location = _trained(tmp_path / "run", person_pool=pool, note="kept")
    model, optimizer, scheduler = build("single", seed=9)
    fresh_optimizer_state = optimizer.state_dict()
    extras = Checkpointer(model, optimizer, scheduler, str(tmp_path / "run")).load(location, model_weight_only=True)
    assert extras["iteration"] == 0
    assert isinstance(extras["person_pool"], MemoryPool) and len(extras["person_pool"]) == 0
    assert extras["note"] == "kept"
    assert optimizer.state_dict() == fresh_optimizer_state
    assert scheduler.last_epoch == 0
    assert torch.equal(model.state_dict()["odd.weight"], ckpt.model.state_dict()["odd.weight"])


def test_adjust_scheduler_keeps_new_milestones_and_restores_position(tmp_path: Path) -> None:
    _, location = _trained(tmp_path / "run", steps=4)  # saved: milestones (3, 6), last_epoch 4
    model = TinyDetector()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10, 20], gamma=0.5)
    Checkpointer(model, optimizer, scheduler).load(location, adjust_scheduler=True)
    assert sorted(scheduler.milestones) == [10, 20]
    assert scheduler.last_epoch == 4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # before the new first milestone
    restored = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[10, 20], gamma=0.5)
    Checkpointer(model, optimizer, restored).load(location)
    assert sorted(restored.milestones) == [3, 6]  # without adjust: the saved schedule comes back


def test_no_head_loads_backbone_of_an_81_class_checkpoint_into_4_classes(tmp_path: Path) -> None:
    big = TinyDetector(num_classes=81)
    Checkpointer(big, save_dir=str(tmp_path), save_to_disk=True).save("model_0000001")
    small = TinyDetector(num_classes=4)
    head_before = small.stm_head.weight.detach().clone()
    with pytest.raises(IncompatibleCheckpointError, match=r"stm_head\.weight"):
        Checkpointer(small, save_dir=str(tmp_path)).load()
    result = Checkpointer(small, save_dir=str(tmp_path)).load(no_head=True)
    assert torch.equal(small.odd.weight, big.odd.weight)
    assert torch.equal(small.stm_head.weight, head_before)
    assert sorted(result.report.head_skipped) == ["stm_head.bias", "stm_head.weight"]


def test_key_mismatch_lists_keys_and_non_strict_reports_them(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    Checkpointer(model, save_dir=str(tmp_path), save_to_disk=True).save("model_0000001")
    other = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 5), torch.nn.Linear(5, 1))
    with pytest.raises(IncompatibleCheckpointError) as info:
        Checkpointer(other, save_dir=str(tmp_path)).load()
    message = str(info.value)
    assert "2.{bias,weight}" in message and "1.weight: (2, 3) vs (5, 3)" in message
    result = Checkpointer(other, save_dir=str(tmp_path)).load(strict=False)
    assert sorted(result.report.missing) == ["2.bias", "2.weight"]
    assert set(result.report.wrong_shape) == {"1.bias", "1.weight"}
    assert torch.equal(other[0].weight, model[0].weight)


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "last_checkpoint"])
def test_bad_checkpoint_names_are_refused_before_writing(tmp_path: Path, name: str) -> None:
    model, _, _ = build("single")
    with pytest.raises(ValueError, match="checkpoint name"):
        Checkpointer(model, save_dir=str(tmp_path / "run"), save_to_disk=True).save(name)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_reserved_extra_names_are_refused(tmp_path: Path) -> None:
    model, _, _ = build("single")
    with pytest.raises(ValueError, match="reserved"):
        Checkpointer(model, save_dir=str(tmp_path), save_to_disk=True).save("model_0000001", optimizer={})


def test_unregistered_user_class_in_extras_is_refused_with_a_fix(tmp_path: Path) -> None:
    from stmixer_dist_ckpt import UnsafeCheckpointError

    from ._models import RunStats

    model, _, _ = build("single")
    Checkpointer(model, save_dir=str(tmp_path), save_to_disk=True).save("model_0000001", stats=RunStats(1.0, []))
    with pytest.raises(UnsafeCheckpointError, match="register_safe_class"):
        Checkpointer(model, save_dir=str(tmp_path)).load()
    trusted = Checkpointer(model, save_dir=str(tmp_path), allow_unsafe_pickle=True).load()
    assert trusted["stats"] == RunStats(1.0, [])


def test_overwriting_a_checkpoint_replaces_it_whole(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _trained(run, steps=4)
    model, optimizer, scheduler = build("single", seed=3)
    train_steps(model, optimizer, scheduler, 0, 2)
    Checkpointer(model, optimizer, scheduler, str(run), save_to_disk=True).save("model_0000004", iteration=99)
    data_dirs = [p.name for p in (run / "model_0000004").iterdir() if p.name.startswith("data-")]
    assert len(data_dirs) == 1
    fresh, fresh_opt, fresh_sched = build("single", seed=7)
    assert Checkpointer(fresh, fresh_opt, fresh_sched, str(run)).load()["iteration"] == 99
    assert torch.equal(fresh.odd.weight, model.odd.weight)


def test_legacy_file_whose_optimizer_groups_have_extra_keys_loads(tmp_path: Path) -> None:
    # Regression: a file saved while a scheduler existed has "initial_lr" in its param groups;
    # loading it into an optimizer without a scheduler raised KeyError('param_groups.0.initial_lr').
    model, optimizer, scheduler = build("single")
    train_steps(model, optimizer, scheduler, 0, 2)
    path = tmp_path / "legacy.pth"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": 2}, path)
    fresh = TinyDetector()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.05, weight_decay=0.01)
    extras = Checkpointer(fresh, fresh_optimizer).load(str(path))
    assert extras["iteration"] == 2
    assert fresh_optimizer.param_groups[0]["initial_lr"] == 0.05
    saved = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"], saved)


def test_load_given_the_run_directory_resumes_from_its_tag(tmp_path: Path) -> None:
    # Regression: load(run_dir) raised IncompleteCheckpointError ("save did not finish").
    _trained(tmp_path / "run", steps=4)
    _trained(tmp_path / "run", steps=6)
    model, optimizer, scheduler = build("single", seed=3)
    assert Checkpointer(model, optimizer, scheduler).load(str(tmp_path / "run"))["iteration"] == 6


def _trained_from_scratch(steps: int) -> dict[str, object]:
    model, optimizer, scheduler = build("single")
    train_steps(model, optimizer, scheduler, 0, steps)
    return full_state(model, optimizer)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_saving_before_the_first_step_does_not_change_training(tmp_path: Path, async_save: bool) -> None:
    # DCP's state capture runs an lr-0 step on a never-stepped optimizer, which moved
    # AdamW's step counter to 1 and so changed every later update (pytorch#164929).
    model, optimizer, scheduler = build("single")
    ckpt = Checkpointer(model, optimizer, scheduler, str(tmp_path), save_to_disk=True, async_save=async_save)
    ckpt.save("model_0000000", iteration=0)
    ckpt.wait()
    assert not optimizer.state, "the save materialized optimizer state"
    train_steps(model, optimizer, scheduler, 0, 3)
    assert_states_equal(full_state(model, optimizer), _trained_from_scratch(3))


def test_resuming_a_checkpoint_saved_before_the_first_step_trains_like_a_fresh_start(tmp_path: Path) -> None:
    model, optimizer, scheduler = build("single")
    Checkpointer(model, optimizer, scheduler, str(tmp_path), save_to_disk=True).save("model_0000000", iteration=0)

    resumed, resumed_optimizer, resumed_scheduler = build("single", seed=5)
    for group in resumed_optimizer.param_groups:
        group["lr"] = 123.0  # the saved param_groups must still be loaded
    train_steps(resumed, resumed_optimizer, resumed_scheduler, 0, 1)  # a started optimizer, to be reset
    assert Checkpointer(resumed, resumed_optimizer, resumed_scheduler, str(tmp_path)).load()["iteration"] == 0
    assert not resumed_optimizer.state
    train_steps(resumed, resumed_optimizer, resumed_scheduler, 0, 3)
    assert_states_equal(full_state(resumed, resumed_optimizer), _trained_from_scratch(3))
