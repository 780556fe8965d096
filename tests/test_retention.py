"""Retention policies, post-commit cleanup of crash leftovers, and what resume picks from a damaged run dir."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stmixer_dist_ckpt import Checkpointer, IncompleteCheckpointError
from stmixer_dist_ckpt.retention import (
    CheckpointInfo,
    KeepAll,
    KeepAny,
    KeepEvery,
    KeepLast,
    RetentionPolicy,
    clean_up_after_commit,
    make_policy,
)
from stmixer_dist_ckpt.storage import StorageLocation, resolve_location

from .s3_server import S3Bucket

LOG = logging.getLogger("test_retention")


def infos(*names: str) -> list[CheckpointInfo]:
    return [CheckpointInfo.from_manifest(name, _FakeManifest(float(i))) for i, name in enumerate(names)]  # type: ignore[arg-type]


class _FakeManifest:
    def __init__(self, created_unix: float) -> None:
        self.created_unix = created_unix


# ------------------------------------------------------------------ policies
def test_policies_choose_what_to_keep() -> None:
    checkpoints = infos("model_0001000", "model_0001500", "model_0002000", "model_0002500", "best")
    assert KeepAll().select_kept(checkpoints) == {c.name for c in checkpoints}
    assert KeepLast(2).select_kept(checkpoints) == {"model_0002500", "best"}
    assert KeepEvery(1000).select_kept(checkpoints) == {"model_0001000", "model_0002000", "best"}  # "best": no step
    assert KeepAny(KeepLast(1), KeepEvery(2000)).select_kept(checkpoints) == {"best", "model_0002000"}
    assert checkpoints[0].step == 1000 and checkpoints[-1].step is None
    for policy in (KeepAll(), KeepLast(1), KeepEvery(5), KeepAny(KeepAll())):
        assert isinstance(policy, RetentionPolicy)


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: KeepLast(0), "n >= 1"),
        (lambda: KeepLast(True), "n >= 1"),
        (lambda: KeepEvery(0), "n_steps >= 1"),
        (lambda: KeepAny(), "at least one"),
        (lambda: make_policy(2, KeepLast(3)), "either keep_last=2 or retention=KeepLast"),
        (lambda: Checkpointer(nn.Linear(1, 1), keep_last=0), "n >= 1"),
    ],
)
def test_bad_policies_are_refused_at_construction(make: Any, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        make()
    with pytest.raises(TypeError, match="RetentionPolicy"):
        make_policy(None, 3)  # type: ignore[arg-type]


# ------------------------------------------------------------------ with a Checkpointer
def save(save_dir: str, name: str, value: float, **kwargs: Any) -> None:
    model = nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.fill_(value)
    Checkpointer(model, save_dir=save_dir, save_to_disk=True, **kwargs).save(name, iteration=int(value))


def resume(save_dir: str, **kwargs: Any) -> int:
    return int(Checkpointer(nn.Linear(4, 4), save_dir=save_dir, **kwargs).load()["iteration"])


def test_keep_last_keeps_the_newest_and_every_final(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save(str(run), "model_final", 0.0, keep_last=2)  # an earlier run's final weights
    for step in range(1, 6):
        save(str(run), f"model_{step:07d}", float(step), keep_last=2)
    assert sorted(os.listdir(run)) == ["last_checkpoint", "model_0000004", "model_0000005", "model_final"]
    assert resume(str(run)) == 5


def test_the_tagged_checkpoint_survives_even_if_the_policy_drops_it(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    for step in (1, 2, 3):
        save(run, f"model_{step:07d}", float(step))
    Checkpointer(nn.Linear(4, 4), save_dir=run).tag_last_checkpoint("model_0000001")  # e.g. rolled back by hand
    report = clean_up_after_commit(
        resolve_location(run), committed="model_0000003", token="99999999999999-0", policy=KeepLast(1), logger=LOG
    )
    assert [url.rsplit("/", 1)[-1] for url in report.removed] == ["manifest.json", "model_0000002"]
    assert sorted(os.listdir(run)) == ["last_checkpoint", "model_0000001", "model_0000003"]


def test_deletion_failures_are_logged_not_raised_and_never_leave_a_half_committed_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run = str(tmp_path / "run")
    save(run, "model_0000001", 1.0)
    original = StorageLocation.remove

    def flaky_remove(self: StorageLocation, *, recursive: bool = False) -> None:
        if recursive and self.name == "model_0000001":
            raise PermissionError(13, "denied", self.path)
        original(self, recursive=recursive)

    monkeypatch.setattr(StorageLocation, "remove", flaky_remove)
    with caplog.at_level(logging.WARNING):
        save(run, "model_0000002", 2.0, keep_last=1)  # succeeds although the old one cannot be removed
    assert "could not remove" in caplog.text and "model_0000001" in caplog.text
    # Manifest went first: what is left is an uncommitted directory, which resume never picks...
    assert not (tmp_path / "run" / "model_0000001" / "manifest.json").exists()
    assert resume(run) == 2
    monkeypatch.undo()
    save(run, "model_0000003", 3.0, keep_last=1)  # ...and the next save removes it
    assert sorted(os.listdir(run)) == ["last_checkpoint", "model_0000003"]


def test_a_failing_policy_is_logged_and_deletes_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def select_kept(self, checkpoints: Any) -> set[str]:
            raise RuntimeError("policy bug")

    run = str(tmp_path / "run")
    save(run, "model_0000001", 1.0)
    with caplog.at_level(logging.ERROR):
        save(run, "model_0000002", 2.0, retention=Broken())
    assert "retention policy" in caplog.text and "policy bug" in caplog.text
    assert sorted(os.listdir(run)) == ["last_checkpoint", "model_0000001", "model_0000002"]


def test_crash_leftovers_are_removed_and_foreign_or_newer_things_are_not(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save(str(run), "model_0000001", 1.0)
    old, new = "20000101000000-0a", "29990101000000-0b"  # before / after any real save
    (run / "model_0000002" / f"data-{old}").mkdir(parents=True)  # crashed save, new name
    (run / "model_0000002" / f"data-{old}" / "__0_0.distcp").write_bytes(b"partial")
    (run / "model_0000001" / f"data-{old}").mkdir()  # crashed overwrite beside live data
    (run / "model_0000001" / ".manifest.json.tmp-1f").write_bytes(b"{")  # killed atomic write
    (run / ".last_checkpoint.tmp-2e").write_bytes(b"model_")
    (run / "model_0000003" / f"data-{new}").mkdir(parents=True)  # newer than this save: maybe a live writer
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events").write_bytes(b"e")
    (run / "tensorboard" / f"data-{old}").mkdir()  # not ours: the directory holds other files
    (run / "model_0000009.pth").write_bytes(b"legacy")
    save(str(run), "model_0000004", 4.0)
    assert sorted(os.listdir(run)) == [
        "last_checkpoint", "model_0000001", "model_0000003", "model_0000004", "model_0000009.pth", "tensorboard"
    ]
    assert len(os.listdir(run / "model_0000001")) == 2  # manifest + its own data
    assert os.listdir(run / "model_0000003") == [f"data-{new}"]
    assert sorted(os.listdir(run / "tensorboard")) == [f"data-{old}", "events"]


# ------------------------------------------------------------------ resume picks a committed one
def test_resume_skips_an_uncommitted_or_missing_tag_target_for_the_newest_commit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = str(tmp_path / "run")
    save(run, "zz_older", 1.0)
    time.sleep(0.01)
    save(run, "aa_newer", 2.0)  # newest by commit time, not by name
    (tmp_path / "run" / "model_broken" / "data-20000101000000-0a").mkdir(parents=True)
    (tmp_path / "run" / "last_checkpoint").write_text("model_broken")
    with caplog.at_level(logging.WARNING):
        assert resume(run) == 2
    assert "model_broken" in caplog.text and "aa_newer" in caplog.text
    (tmp_path / "run" / "last_checkpoint").write_text("model_gone")
    assert resume(run) == 2


def test_resume_with_nothing_committed_says_how_to_start_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "model_0000001" / "data-20000101000000-0a").mkdir(parents=True)
    (run / "last_checkpoint").write_text("model_0000001")
    with pytest.raises(IncompleteCheckpointError, match=r"delete .*last_checkpoint to start from scratch"):
        resume(str(run))


@pytest.mark.s3
def test_keep_last_on_s3(s3_bucket: S3Bucket) -> None:
    run, options = f"{s3_bucket.url}/run", s3_bucket.storage_options
    for step in range(1, 4):
        save(run, f"model_{step:07d}", float(step), keep_last=1, storage_options=options)
    assert resolve_location(run, options).listdir() == ["last_checkpoint", "model_0000003"]
    assert resume(run, storage_options=options) == 3
