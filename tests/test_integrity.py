"""Integrity: damaged checkpoints are detected, named, and never loaded silently.

One 2-rank checkpoint is saved per module and copied for each case; each case
damages the copy the way disks, copies and object stores do, then checks
that ``verify_checkpoint``, ``stmixer-ckpt verify`` and ``load`` all notice.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from stmixer_dist_ckpt import Checkpointer, CorruptCheckpointError
from stmixer_dist_ckpt.cli import main
from stmixer_dist_ckpt.integrity import Problem, VerifyMode, verify_checkpoint

from ._ranks import run_ranks
from .s3_server import S3Bucket, s3_filesystem

MARK = 1234.5678  # every weight of the marked layer; its bytes are easy to find in a shard


def marked_net(value: float = MARK) -> nn.Module:
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(value)
    return model


def _save(rank: int, world: int, save_dir: str) -> None:
    Checkpointer(marked_net(), save_dir=save_dir, save_to_disk=True).save("model_0000001", iteration=1)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    outcomes = run_ranks(_save, 2, root, str(root / "run"))
    assert all(o.returned for o in outcomes), [o.error for o in outcomes]
    return root / "run"


@pytest.fixture
def run_dir(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(pristine, copy)
    return copy


def data_dir(run: Path) -> Path:
    return next((run / "model_0000001").glob("data-*"))


def flip_marked_byte(path: Path) -> None:
    """Flip one bit inside the stored weights (not in a header): a silent-corruption bit flip."""
    blob = bytearray(path.read_bytes())
    offset = blob.find(struct.pack("<f", MARK) * 8)
    assert offset >= 0, f"no marked weights in {path.name}"
    blob[offset + 17] ^= 0x04
    path.write_bytes(bytes(blob))


def truncate(path: Path, keep: int | None = None) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 100 if keep is None else keep])


def grow(path: Path) -> None:
    """Append ten bytes (creates the file if missing)."""
    with path.open("ab") as handle:
        handle.write(b"\0" * 10)


def flip_first_byte(path: Path) -> None:
    blob = path.read_bytes()
    path.write_bytes(bytes([blob[0] ^ 1]) + blob[1:])


def unlink_and_flip(data: Path) -> None:
    (data / "__0_0.distcp").unlink()
    flip_marked_byte(data / "__1_0.distcp")


# name -> (damage to the data dir, expected {file: problem}); every case must be caught in full mode.
CASES: dict[str, tuple[Callable[[Path], None], dict[str, Problem]]] = {
    "truncated": (lambda d: truncate(d / "__1_0.distcp"), {"__1_0.distcp": Problem.TRUNCATED}),
    "emptied": (lambda d: truncate(d / "__0_0.distcp", 0), {"__0_0.distcp": Problem.TRUNCATED}),
    "grown": (lambda d: grow(d / "__0_0.distcp"), {"__0_0.distcp": Problem.GROWN}),
    "bit-flip-in-weights": (lambda d: flip_marked_byte(d / "__1_0.distcp"), {"__1_0.distcp": Problem.CHECKSUM}),
    "bit-flip-in-metadata": (lambda d: flip_first_byte(d / ".metadata"), {".metadata": Problem.CHECKSUM}),
    "missing-shard": (lambda d: (d / "__0_0.distcp").unlink(), {"__0_0.distcp": Problem.MISSING}),
    "extra-shard": (lambda d: grow(d / "__2_0.distcp"), {"__2_0.distcp": Problem.EXTRA}),
    "missing-and-flipped": (unlink_and_flip, {"__0_0.distcp": Problem.MISSING, "__1_0.distcp": Problem.CHECKSUM}),
    "data-dir-deleted": (shutil.rmtree, {n: Problem.MISSING for n in (".metadata", "__0_0.distcp", "__1_0.distcp")}),
}


def test_pristine_checkpoint_verifies(pristine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = verify_checkpoint(str(pristine / "model_0000001"))
    assert report.ok and report.files_checked == 3 and report.bytes_read > 0
    assert main(["verify", str(pristine)]) == 0  # a run directory: follows the tag
    assert main(["verify", "--size-only", str(pristine / "model_0000001")]) == 0
    assert ": OK" in capsys.readouterr().out


@pytest.mark.parametrize("case", list(CASES))
def test_damage_is_detected_and_named(run_dir: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    damage, expected = CASES[case]
    damage(data_dir(run_dir))
    report = verify_checkpoint(str(run_dir / "model_0000001"))
    assert {p.name: p.problem for p in report.problems} == expected
    assert main(["verify", str(run_dir / "model_0000001")]) == 1
    printed = capsys.readouterr().out
    assert all(name in printed for name in expected)
    size_only = verify_checkpoint(str(run_dir / "model_0000001"), mode=VerifyMode.SIZE)
    expected_by_size = {n: p for n, p in expected.items() if p is not Problem.CHECKSUM}  # flips need the hash
    assert {p.name: p.problem for p in size_only.problems} == expected_by_size
    with pytest.raises(CorruptCheckpointError, match=next(iter(expected))):
        Checkpointer(marked_net(0.0), save_dir=str(run_dir)).load()  # verify is on by default


def test_a_flipped_weight_loads_silently_only_with_verify_off(run_dir: Path) -> None:
    flip_marked_byte(data_dir(run_dir) / "__1_0.distcp")
    with pytest.raises(CorruptCheckpointError, match=r"__1_0\.distcp: checksum mismatch"):
        Checkpointer(marked_net(0.0), save_dir=str(run_dir)).load(verify=True)
    Checkpointer(marked_net(0.0), save_dir=str(run_dir)).load(verify="size")  # sizes match: not caught
    model = marked_net(0.0)
    Checkpointer(model, save_dir=str(run_dir)).load(verify=False)
    values = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (values != MARK).sum() == 1, "the documented risk of verify=False: one weight is silently wrong"
    with pytest.raises(ValueError, match="verify must be"):
        Checkpointer(marked_net(0.0), save_dir=str(run_dir)).load(verify="fast")


def test_unreadable_manifest_and_uncommitted_checkpoint_exit_1_missing_path_exits_2(run_dir: Path, tmp_path: Path) -> None:
    (run_dir / "model_0000001" / "manifest.json").write_text("{not json")
    assert main(["verify", str(run_dir / "model_0000001")]) == 1
    (run_dir / "model_0000001" / "manifest.json").unlink()
    assert main(["verify", str(run_dir / "model_0000001")]) == 1  # never committed
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    assert main(["verify", str(data_dir(run_dir))]) == 2  # plain DCP directory: nothing to check against


def _load_damaged(rank: int, world: int, save_dir: str) -> str:
    try:
        Checkpointer(marked_net(0.0), save_dir=save_dir).load()
    except CorruptCheckpointError as exc:
        return str(exc)
    raise AssertionError("load must refuse a damaged checkpoint on every rank")


@pytest.mark.dist
def test_every_rank_refuses_a_damaged_checkpoint_with_the_same_message(run_dir: Path, tmp_path: Path) -> None:
    flip_marked_byte(data_dir(run_dir) / "__1_0.distcp")
    (data_dir(run_dir) / ".metadata").unlink()
    outcomes = run_ranks(_load_damaged, 2, tmp_path, str(run_dir))
    assert all(o.returned for o in outcomes), [o.error for o in outcomes]
    assert outcomes[0].value == outcomes[1].value  # files were split over ranks; the report is gathered
    assert "__1_0.distcp: checksum mismatch" in outcomes[0].value and ".metadata: missing" in outcomes[0].value


@pytest.mark.s3
def test_bit_flip_on_s3_is_detected(pristine: Path, s3_bucket: S3Bucket) -> None:
    fs = s3_filesystem(s3_bucket.storage_options)
    fs.put(str(pristine), f"{s3_bucket.name}/run", recursive=True)
    checkpoint = f"{s3_bucket.url}/run/model_0000001"
    options = s3_bucket.storage_options
    assert verify_checkpoint(checkpoint, options).ok
    key = next(k for k in fs.find(f"{s3_bucket.name}/run") if k.endswith("__1_0.distcp"))
    blob = bytearray(fs.cat_file(key))
    blob[len(blob) // 2] ^= 0x10
    fs.pipe_file(key, bytes(blob))
    report = verify_checkpoint(checkpoint, options)
    assert [(p.name, p.problem) for p in report.problems] == [("__1_0.distcp", Problem.CHECKSUM)]
    assert main(["verify", checkpoint, "--storage-options", json.dumps(options)]) == 1
    with pytest.raises(CorruptCheckpointError):
        Checkpointer(marked_net(0.0), save_dir=f"{s3_bucket.url}/run", storage_options=options).load()
