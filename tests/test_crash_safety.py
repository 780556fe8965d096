"""Crash safety: kill a rank anywhere in a save, then load: the previous checkpoint or the new one, never a mix.

Each kill point runs a real 2-rank gloo save in which one rank SIGKILLs
itself at a named point (``STMIXER_CKPT_FAULT``, see
``stmixer_dist_ckpt._faults``); the surviving rank fails on its next
collective and is killed like torchrun would. Then, in this process:

* the tag must name a *committed* checkpoint whose files verify;
* a resume must load exactly the previous state (all weights 1.0,
  ``iteration == 1``) or exactly the new one (2.0, ``iteration == 2``);
* every committed checkpoint on storage must load as one of the two;
* the next save must succeed and leave no leftovers (data directories
  without a manifest naming them, uncommitted checkpoint directories,
  temp files of an interrupted atomic write).

Weights are constant per save and DCP spreads tensors over both ranks'
files, so a load mixing files from two saves shows up as two values.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stmixer_dist_ckpt import Checkpointer, DistributedCheckpointError
from stmixer_dist_ckpt._faults import ENV_VAR, hit
from stmixer_dist_ckpt.integrity import verify_checkpoint
from stmixer_dist_ckpt.layout import CheckpointKind, read_tag, resolve_checkpoint, resolve_tag
from stmixer_dist_ckpt.manifest import MANIFEST_FILE, read_manifest
from stmixer_dist_ckpt.storage import resolve_location

from ._ranks import run_ranks
from .s3_server import S3Bucket

pytestmark = pytest.mark.dist

#: Points every rank reaches; each is tried on rank 0 and on rank 1.
ALL_RANK_POINTS = ["save.begin", "save.before_write", "save.shard_write#1", "save.shard_write#3", "save.after_write"]
#: Points only rank 0 (the coordinator) reaches: DCP metadata, commit, tag, cleanup.
RANK0_POINTS = [
    "save.metadata_write#1",
    "save.before_commit",
    "storage.atomic_write#1",  # during the manifest write (temp file written, not yet renamed/PUT)
    "save.after_commit",
    "storage.atomic_write#2",  # during the tag update
    "save.after_tag",
    "cleanup.remove#1",  # overwrite: the replaced data dir; keep_last=1: the retired manifest
]
KILLS = [(point, rank) for point in ALL_RANK_POINTS for rank in (0, 1)] + [(point, 0) for point in RANK0_POINTS]
#: Only retention removes a second path (the retired checkpoint's directory, after its manifest).
RETENTION_KILLS = [("cleanup.remove#2", 0)]


# ------------------------------------------------------------------ the job
def net(value: float) -> nn.Module:
    """Six layers (12 tensors, spread by DCP over both ranks' files), every element ``value``."""
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(6)])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(value)
    return model


def save_body(rank: int, world: int, save_dir: str, options: dict[str, Any], name: str, value: float, keep: int | None) -> str:
    ckpt = Checkpointer(net(value), save_dir=save_dir, save_to_disk=True, storage_options=options, keep_last=keep)
    return str(ckpt.save(name, iteration=int(value)))


def save_here(save_dir: str, options: dict[str, Any], name: str, value: float, keep: int | None = None) -> None:
    Checkpointer(net(value), save_dir=save_dir, save_to_disk=True, storage_options=options, keep_last=keep).save(
        name, iteration=int(value)
    )


def loaded_value(save_dir: str, options: dict[str, Any], f: str | None = None) -> float:
    """Load (verify on) into a zeroed model; the single value every weight holds, or raise on a mix."""
    model = net(0.0)
    extras = Checkpointer(model, save_dir=save_dir, storage_options=options).load(f)
    values = torch.unique(torch.cat([p.detach().flatten() for p in model.parameters()])).tolist()
    if len(values) != 1 or extras.get("iteration") != int(values[0]):
        raise AssertionError(f"mixed state: weights {values}, iteration {extras.get('iteration')}")
    return float(values[0])


# ------------------------------------------------------------------ checks
def tag_problem(save_dir: str, options: dict[str, Any]) -> str | None:
    """Why the tag does not name an intact committed checkpoint, or ``None``."""
    root = resolve_location(save_dir, options)
    content = read_tag(root)
    if not content:
        return "no tag"
    resolved = resolve_checkpoint(resolve_tag(root, content))  # raises when missing or uncommitted
    if resolved.kind is not CheckpointKind.COMMITTED:
        return f"tag names a {resolved.kind.value} checkpoint"
    report = verify_checkpoint(resolved.location.url, options)
    return None if report.ok else report.describe()


def leftovers(save_dir: str, options: dict[str, Any]) -> list[str]:
    """Everything that is neither a committed checkpoint's live data nor the tag."""
    root = resolve_location(save_dir, options)
    found = [name for name in root.listdir() if name.startswith(".")]
    for name in root.listdir():
        location = root.join(name)
        if name.startswith(".") or not location.isdir():
            continue
        manifest = read_manifest(location)
        if manifest is None:
            found.append(f"{name}/ (uncommitted)")
            continue
        found += [f"{name}/{child}" for child in location.listdir() if child not in (MANIFEST_FILE, manifest.data_dir)]
    return found


@dataclass
class KillResult:
    point: str
    rank: int
    killed: bool
    loaded: float | None
    problem: str | None

    @property
    def consistent(self) -> bool:
        return self.problem is None


def try_kill(tmp: Path, save_dir: str, options: dict[str, Any], point: str, rank: int, *, overwrite: bool, keep: int | None) -> KillResult:
    save_here(save_dir, options, "model_0000001", 1.0, keep)
    new_name = "model_0000001" if overwrite else "model_0000002"
    outcomes = run_ranks(save_body, 2, tmp, save_dir, options, new_name, 2.0, keep, env={ENV_VAR: f"{point}@{rank}"})
    killed = outcomes[rank].killed
    problems: list[str] = []
    loaded: float | None = None
    try:
        if (why := tag_problem(save_dir, options)) is not None:
            problems.append(why)
        loaded = loaded_value(save_dir, options)
        root = resolve_location(save_dir, options)
        for name in root.listdir():
            if root.join(name).isdir() and read_manifest(root.join(name)) is not None:
                if loaded_value(save_dir, options, root.join(name).url) not in (1.0, 2.0):
                    problems.append(f"{name} loads neither state")
        save_here(save_dir, options, "model_0000003", 3.0, keep)
        if loaded_value(save_dir, options) != 3.0:
            problems.append("the next save did not become the resume point")
        if rest := leftovers(save_dir, options):
            problems.append(f"left over after the next save: {rest}")
    except Exception as exc:  # recorded: the table shows every failing point at once
        problems.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    if loaded not in (1.0, 2.0):
        problems.append(f"resume loaded {loaded}, neither the previous (1.0) nor the new (2.0) state")
    return KillResult(point, rank, killed, loaded, "; ".join(problems) or None)


def run_matrix(tmp: Path, root: str, options: dict[str, Any], label: str, *, overwrite: bool, keep: int | None) -> None:
    results = []
    for index, (point, rank) in enumerate(KILLS + (RETENTION_KILLS if keep else [])):
        save_dir = f"{root}/run {index} ü"  # spaces and non-ASCII on every storage
        results.append(try_kill(tmp, save_dir, options, point, rank, overwrite=overwrite, keep=keep))
    fired = sum(r.killed for r in results)
    lines = [f"{label}: {len(results)} kill points, {fired} fired, {sum(not r.consistent for r in results)} inconsistent"]
    lines += [
        f"  {r.point:<24} rank {r.rank}  killed={r.killed!s:<5} loaded={r.loaded}  {r.problem or 'ok'}" for r in results
    ]
    print("\n".join(lines))
    assert fired == len(results), "kill points never reached (the test would prove nothing):\n" + "\n".join(lines)
    assert all(r.consistent for r in results), "\n".join(lines)


@pytest.mark.parametrize(
    ("overwrite", "keep"),
    [pytest.param(False, 1, id="new-name-keep-last-1"), pytest.param(True, None, id="overwrite-same-name")],
)
def test_kill_points_local(tmp_path: Path, overwrite: bool, keep: int | None) -> None:
    run_matrix(tmp_path, str(tmp_path), {}, f"local {'overwrite' if overwrite else 'new name'}", overwrite=overwrite, keep=keep)


@pytest.mark.s3
def test_kill_points_s3_overwrite(tmp_path: Path, s3_bucket: S3Bucket) -> None:
    # Overwriting a name is the case that needs the commit marker on S3: there is no rename
    # to swap the old directory for the new one. (Retention's deletes run locally above.)
    run_matrix(tmp_path, s3_bucket.url, s3_bucket.storage_options, "s3 overwrite", overwrite=True, keep=None)


def test_fault_hook_is_inert_unless_armed_and_refuses_typos(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    hit("save.after_commit")  # not armed: nothing happens
    monkeypatch.setenv(ENV_VAR, "save.after_comit@0")
    with pytest.raises(ValueError, match=r"unknown fault point 'save\.after_comit'"):
        hit("save.begin")
    monkeypatch.setenv(ENV_VAR, "save.begin#2:raise")
    hit("save.begin")  # first time: not yet
    with pytest.raises(OSError, match=r"injected fault at save\.begin"):
        hit("save.begin")


# ------------------------------------------------------------- full disk
@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs, so writes fail with ENOSPC from the kernel, not from a mock."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"mounting a 1 MiB tmpfs needs root (CAP_SYS_ADMIN): {done.stderr.strip() or done.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def big_net(value: float) -> nn.Linear:
    model = nn.Linear(384, 384)  # ~590 kB: one checkpoint fits in 1 MiB, two do not
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(value)
    return model


def full_disk_body(rank: int, world: int, save_dir: str) -> str:
    ckpt = Checkpointer(big_net(2.0), save_dir=save_dir, save_to_disk=True)
    try:
        ckpt.save("model_0000002", iteration=2)
    except DistributedCheckpointError as exc:
        return str(exc)
    raise AssertionError("a save onto a full disk must raise")


def test_full_disk_fails_on_every_rank_and_keeps_the_previous_checkpoint(tmp_path: Path, tiny_disk: Path) -> None:
    save_dir = str(tiny_disk / "run")
    Checkpointer(big_net(1.0), save_dir=save_dir, save_to_disk=True).save("model_0000001", iteration=1)
    outcomes = run_ranks(full_disk_body, 2, tmp_path, save_dir)
    messages = [o.value for o in outcomes]
    assert all(o.returned for o in outcomes), [o.error for o in outcomes]
    assert messages[0] == messages[1]  # the same error, with every failed rank's traceback, on every rank
    assert "/model_0000002/data-" in messages[0] and "the previous checkpoint and the tag are unchanged" in messages[0]
    # ENOSPC surfaces as OSError, or as torch's zip writer noticing a short write.
    assert "No space left on device" in messages[0] or "unexpected pos" in messages[0], messages[0]
    assert (tiny_disk / "run" / "last_checkpoint").read_text() == "model_0000001"
    model = big_net(0.0)
    assert Checkpointer(model, save_dir=save_dir).load()["iteration"] == 1
    assert torch.equal(model.weight, torch.full_like(model.weight, 1.0))
    # The failed save's partial files were removed at once: the space is free again.
    assert sorted(os.listdir(tiny_disk / "run")) == ["last_checkpoint", "model_0000001"]
    Checkpointer(nn.Linear(4, 4), save_dir=save_dir, save_to_disk=True).save("small", iteration=3)
    assert verify_checkpoint(str(tiny_disk / "run" / "small")).ok
