"""Safe loading: real malicious payloads in every stored format, and paths that try to leave save_dir.

Each payload (see ``tests/_payloads.py``) creates a marker file when unpickled
by plain pickle; ``test_payloads_are_live`` proves it. Every other test plants
one in a real file written by this library (or by upstream's format), loads it
through the public API or the CLI with nothing mocked, and checks that the load
is refused with a message naming the file, the class and the way to allow it,
and that the marker never appears.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
import sys
import types
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from stmixer_dist_ckpt import (
    ActionCheckpointer,
    Checkpointer,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    MemoryPool,
    UnsafeCheckpointError,
    consolidate,
    convert_to_sharded,
    inspect_checkpoint,
    register_safe_class,
)
from stmixer_dist_ckpt import safe_pickle as safe_pickle_module
from stmixer_dist_ckpt.c2_conversion import convert_c2_to_sharded
from stmixer_dist_ckpt.cli import main as cli_main
from stmixer_dist_ckpt.consolidate import read_checkpoint_entries
from stmixer_dist_ckpt.errors import StorageError
from stmixer_dist_ckpt.layout import TAG_FILE, resolve_tag, validate_checkpoint_name
from stmixer_dist_ckpt.legacy.c2_pickle import load_c2_state_dict
from stmixer_dist_ckpt.legacy.legacy_file import load_legacy_checkpoint
from stmixer_dist_ckpt.safe_pickle import safe_pickle_load, safe_torch_load
from stmixer_dist_ckpt.storage import resolve_location

from . import _payloads
from ._payloads import PAYLOAD_KINDS, Payload, data_dir_of, exists, torch_bytes

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

KINDS = sorted(PAYLOAD_KINDS)
CKPT = "model_0000001"


# --------------------------------------------------------------------------- models and fixtures
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(3, 4)
        self.stm_head = nn.Linear(4, 2)


def _tiny(fill: float | None = None) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = _Tiny()
    if fill is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(fill)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    return model, optimizer, scheduler


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class RunStats:
    """A user class stored as an extra: refused until registered."""

    def __init__(self, best: float) -> None:
        self.best = best

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunStats) and other.best == self.best

    __hash__ = None  # type: ignore[assignment]


class RunStatsV2(RunStats):
    """Where ``RunStats`` "moved" to: registered under the old pickled name."""


class EvilScheduler:
    """A scheduler whose state dict carries a payload (as a poisoned checkpoint would)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": 1, "hook": Payload(self.marker)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class PerRankState:
    def __init__(self, value: Any) -> None:
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with one committed checkpoint (model, optimizer, scheduler, extras)."""
    run = tmp_path_factory.mktemp("pristine") / "run"
    model, optimizer, scheduler = _tiny(fill=1.0)
    pool = MemoryPool()
    pool["movie", 902] = torch.arange(3.0)
    Checkpointer(model, optimizer, scheduler, str(run), save_to_disk=True).save(CKPT, iteration=1, person_pool=pool)
    return run


@pytest.fixture(scope="module")
def other_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another team's run, outside every save_dir under test: weights 7.0 and a poisoned extra."""
    run = tmp_path_factory.mktemp("other") / "run"
    model, _, _ = _tiny(fill=7.0)
    marker = run.parent / "other-marker"
    Checkpointer(model, save_dir=str(run), save_to_disk=True).save("model_evil", stats=Payload(marker))
    return run


@pytest.fixture
def run(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(pristine, copy)
    return copy


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "MARKER-payload-ran"
    yield path
    assert not exists(path), "a payload ran"


def _payload(kind: str, marker: Path) -> tuple[Payload, str]:
    cls, global_name = PAYLOAD_KINDS[kind]
    return cls(marker), global_name


def _assert_refusal(exc: BaseException, file_part: str, global_name: str) -> None:
    text = str(exc)
    assert isinstance(exc, UnsafeCheckpointError) and isinstance(exc, CheckpointError)
    assert file_part in text, text
    assert repr(global_name) in text, text
    assert "register_safe_class" in text and "allow_unsafe_pickle=True" in text, text


def _cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str]:
    code = cli_main([str(part) for part in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# --------------------------------------------------------------------------- the payloads are real
@pytest.mark.parametrize("kind", KINDS)
def test_payloads_are_live(kind: str, tmp_path: Path) -> None:
    control = tmp_path / "control"
    payload, _ = _payload(kind, control)
    pickle.loads(pickle.dumps({"blobs": {"x": payload}}, protocol=2))
    assert control.exists()
    control.unlink()
    torch.load(io.BytesIO(torch_bytes({"iteration": payload})), weights_only=False)
    assert control.exists()


# --------------------------------------------------------------------------- DCP .metadata
def _load_path(run: Path, out: Path) -> Any:
    return Checkpointer(_tiny()[0]).load(str(run / CKPT))


def _load_resume(run: Path, out: Path) -> Any:
    return Checkpointer(_tiny()[0], save_dir=str(run)).load()


def _load_action(run: Path, out: Path) -> Any:
    return ActionCheckpointer(None, _tiny()[0], save_dir=str(run)).load()


def _consolidate(run: Path, out: Path) -> Any:
    return consolidate(str(run / CKPT), str(out / "single.pth"))


def _inspect(run: Path, out: Path) -> Any:
    return inspect_checkpoint(str(run))


def _read_entries(run: Path, out: Path) -> Any:
    return read_checkpoint_entries(str(run / CKPT), "model")


SHARDED_LOADERS: dict[str, Callable[[Path, Path], Any]] = {
    "Checkpointer.load(path)": _load_path,
    "Checkpointer.load() via tag": _load_resume,
    "ActionCheckpointer.load()": _load_action,
    "consolidate": _consolidate,
    "inspect_checkpoint": _inspect,
    "read_checkpoint_entries": _read_entries,
}


@pytest.mark.parametrize("where", ["planner_data", "storage_meta"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loader", sorted(SHARDED_LOADERS))
def test_hand_edited_dcp_metadata_is_refused(
    run: Path, tmp_path: Path, marker: Path, loader: str, kind: str, where: str
) -> None:
    metadata = _payloads.read_metadata_trusted(run / CKPT)
    payload, global_name = _payload(kind, marker)
    if where == "planner_data":
        metadata.planner_data["model.backbone.weight"] = payload
    else:
        metadata.storage_meta.modules = [payload]
    _payloads.write_metadata(run / CKPT, pickle.dumps(metadata))

    with pytest.raises(UnsafeCheckpointError) as info:
        SHARDED_LOADERS[loader](run, tmp_path)
    _assert_refusal(info.value, ".metadata", global_name)
    assert not (tmp_path / "single.pth").exists()


def test_hand_edited_metadata_of_a_plain_dcp_directory_is_refused(tmp_path: Path, marker: Path) -> None:
    import torch.distributed.checkpoint as dcp

    plain = tmp_path / "plain"
    dcp.save({"model": _tiny()[0].state_dict()}, checkpoint_id=str(plain), no_dist=True)
    metadata = _payloads.read_metadata_trusted(plain)
    metadata.planner_data["model.backbone.weight"] = Payload(marker)
    (plain / ".metadata").write_bytes(pickle.dumps(metadata))
    for load in (
        lambda: Checkpointer(_tiny()[0]).load(str(plain)),
        lambda: consolidate(str(plain), str(tmp_path / "out.pth")),
        lambda: inspect_checkpoint(str(plain)),
    ):
        with pytest.raises(UnsafeCheckpointError) as info:
            load()
        _assert_refusal(info.value, f"{plain}/.metadata", f"{Payload.__module__}.plant_marker")


@pytest.mark.parametrize("name_kind", ["absolute", "dotdot", "subdir", "pathlib"])
def test_metadata_naming_data_files_outside_the_checkpoint_is_refused(
    run: Path, other_run: Path, tmp_path: Path, name_kind: str
) -> None:
    """DCP joins ``relative_path`` to the directory: an edited one would load another run's tensors."""
    other_data = data_dir_of(other_run / "model_evil")
    metadata = _payloads.read_metadata_trusted(run / CKPT)
    other_metadata = _payloads.read_metadata_trusted(other_run / "model_evil")
    for index, info in metadata.storage_data.items():
        if index.fqn.startswith("model."):
            theirs = other_metadata.storage_data[index]
            target = other_data / theirs.relative_path
            info.relative_path = {
                "absolute": str(target),
                "dotdot": os.path.relpath(target, data_dir_of(run / CKPT)),
                "subdir": f"sub/{theirs.relative_path}",
                "pathlib": Path(target),
            }[name_kind]
            info.offset, info.length = theirs.offset, theirs.length
    _payloads.write_metadata(run / CKPT, pickle.dumps(metadata))

    model = _tiny(fill=0.0)[0]
    before = _weights(model)
    for load in (
        lambda: Checkpointer(model).load(str(run / CKPT)),
        lambda: consolidate(str(run / CKPT), str(tmp_path / "out.pth")),
        lambda: inspect_checkpoint(str(run / CKPT)),
    ):
        with pytest.raises(CorruptCheckpointError, match="refusing to read outside it"):
            load()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- BUILD on shared objects
def test_pickle_that_modifies_an_allowed_class_is_refused(run: Path) -> None:
    """Allow-listed names may be instantiated, never rewritten for the whole process."""
    metadata = _payloads.read_metadata_trusted(run / CKPT)
    raw = _payloads.tamper_prefix("stmixer_dist_ckpt.memory_pool", "MemoryPool", "_tampered")
    _payloads.write_metadata(run / CKPT, raw + pickle.dumps(metadata, protocol=2)[2:])
    try:
        assert pickle.loads((data_dir_of(run / CKPT) / ".metadata").read_bytes()) is not None
        assert MemoryPool._tampered is str  # type: ignore[attr-defined]  # control: plain pickle obeys it
        del MemoryPool._tampered  # type: ignore[attr-defined]

        with pytest.raises(UnsafeCheckpointError, match="refusing to set attributes on 'MemoryPool'"):
            Checkpointer(_tiny()[0]).load(str(run / CKPT))
        assert not hasattr(MemoryPool, "_tampered")

        pth = _payloads.tamper_torch_file(
            torch_bytes({"model": {"w": torch.ones(2)}}), "stmixer_dist_ckpt.memory_pool", "MemoryPool", "_tampered"
        )
        with pytest.raises(UnsafeCheckpointError, match=r"x\.pth: refusing to set attributes"):
            safe_torch_load(pth, source="x.pth")
        assert not hasattr(MemoryPool, "_tampered")
    finally:
        if hasattr(MemoryPool, "_tampered"):
            del MemoryPool._tampered  # type: ignore[attr-defined]


def test_pickle_that_modifies_an_enum_member_or_registered_class_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    member = _MEM_FORMAT_ENCODING(0)
    raw = (
        b"\x80\x02ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\nK\x00\x85R"
        b"N}X\x07\x00\x00\x00_value_K\x07s\x86b."
    )
    try:
        with pytest.raises(UnsafeCheckpointError, match="refusing to set attributes"):
            safe_pickle_load(raw, source="enum.pkl")
        assert member.value == 0
    finally:
        member._value_ = 0  # had it been changed, every later .metadata read would fail

    monkeypatch.setattr(safe_pickle_module, "_user_allowed", {})
    register_safe_class(_payloads.Victim)
    raw = _payloads.tamper_prefix(_payloads.Victim.__module__, "Victim", "hijacked") + b"N."
    with pytest.raises(UnsafeCheckpointError, match="refusing to set attributes on 'Victim'"):
        safe_pickle_load(raw, source="victim.pkl")
    assert not hasattr(_payloads.Victim, "hijacked")


def test_malformed_pickles_are_unpickling_errors_not_crashes() -> None:
    for raw in (b"not a pickle", b"\x80\x02(", b"\x80\x02h\x05."):
        with pytest.raises((pickle.UnpicklingError, EOFError)):  # what every caller catches
            safe_pickle_load(raw, source="junk.pkl")


# --------------------------------------------------------------------------- non-tensor DCP items
@pytest.mark.parametrize("kind", KINDS)
def test_poisoned_extra_is_refused(run: Path, tmp_path: Path, marker: Path, kind: str) -> None:
    payload, global_name = _payload(kind, marker)
    model = _tiny()[0]
    Checkpointer(model, save_dir=str(run), save_to_disk=True).save("model_0000002", iteration=2, stats=payload)
    where = f"{run}/model_0000002 [extra.stats]"

    with pytest.raises(UnsafeCheckpointError) as info:
        Checkpointer(model, save_dir=str(run)).load()
    _assert_refusal(info.value, where, global_name)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint_entries(str(run / "model_0000002"), "extra")
    _assert_refusal(info.value, where, global_name)
    with pytest.raises(UnsafeCheckpointError) as info:
        consolidate(str(run), str(tmp_path / "keep.pth"), unsafe_extras="keep")
    _assert_refusal(info.value, where, global_name)
    with pytest.raises(UnsafeCheckpointError, match=rf"\[extra\.stats\] holds {global_name}"):
        consolidate(str(run), str(tmp_path / "error.pth"), unsafe_extras="error")

    # The default leaves the object out without deserializing it; inspect shows why it is hidden.
    summary = consolidate(str(run), str(tmp_path / "drop.pth"))
    assert any(what.startswith("extra.stats") for what in summary.dropped)
    assert "stats" not in torch.load(tmp_path / "drop.pth", weights_only=True)
    entry = next(e for e in inspect_checkpoint(str(run)).entries if e.key == "extra.stats")
    assert entry.preview is not None and entry.preview.startswith("<not shown: ")
    assert f"needs {global_name}" in entry.preview, entry.preview  # the class, not a cut-off sentence


def test_poisoned_bytes_item_of_a_plain_dcp_directory_is_refused(tmp_path: Path, marker: Path) -> None:
    """An item stored by DCP itself (not pre-serialized by us) goes through the planner's load_bytes."""
    import torch.distributed.checkpoint as dcp

    plain = tmp_path / "plain"
    state = {"model": _tiny()[0].state_dict(), "extra": {"stats": Payload(marker)}}
    dcp.save(state, checkpoint_id=str(plain), no_dist=True)
    with pytest.raises(UnsafeCheckpointError) as info:
        Checkpointer(_tiny()[0]).load(str(plain))
    _assert_refusal(info.value, "[extra.stats]", f"{Payload.__module__}.plant_marker")


def test_poisoned_scheduler_state_is_refused(tmp_path: Path, marker: Path) -> None:
    model, optimizer, scheduler = _tiny()
    Checkpointer(model, optimizer, EvilScheduler(marker), str(tmp_path / "run"), save_to_disk=True).save(CKPT)
    with pytest.raises(UnsafeCheckpointError) as info:
        Checkpointer(model, optimizer, scheduler, str(tmp_path / "run")).load()
    _assert_refusal(info.value, "[scheduler]", f"{Payload.__module__}.plant_marker")


def test_poisoned_rank_state_is_refused(tmp_path: Path, marker: Path) -> None:
    model = _tiny()[0]
    evil = {"rng": PerRankState(Payload(marker))}
    Checkpointer(model, save_dir=str(tmp_path / "run"), save_to_disk=True, rank_states=evil).save(CKPT)
    with pytest.raises(UnsafeCheckpointError) as info:
        Checkpointer(model, save_dir=str(tmp_path / "run"), rank_states={"rng": PerRankState(0)}).load()
    _assert_refusal(info.value, "[rank_state.", f"{Payload.__module__}.plant_marker")


# --------------------------------------------------------------------------- single files
def _legacy_pth(path: Path, payload: Any) -> Path:
    model, optimizer, scheduler = _tiny()
    upstream = {
        "model": {f"module.{k}": v for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "iteration": 11524,
        "person_pool": payload,
    }
    torch.save(upstream, path)
    return path


def _bare_state_dict_pth(path: Path, payload: Any) -> Path:
    state = _tiny()[0].state_dict()
    state._metadata[""]["hook"] = payload  # type: ignore[attr-defined]  # rides in OrderedDict's __dict__
    torch.save(state, path)
    return path


def _consolidated_pth(path: Path, payload: Any, pristine: Path) -> Path:
    consolidate(str(pristine / CKPT), str(path))
    single = torch.load(path, weights_only=True)
    single["iteration"] = payload
    torch.save(single, path)
    return path


SINGLE_FILE_LOADERS: dict[str, Callable[[Path, Path], Any]] = {
    "Checkpointer.load": lambda f, out: Checkpointer(_tiny()[0]).load(str(f)),
    "ActionCheckpointer.load": lambda f, out: ActionCheckpointer(None, _tiny()[0]).load(str(f)),
    "load_legacy_checkpoint": lambda f, out: load_legacy_checkpoint(str(f), source=str(f)),
    "convert_to_sharded": lambda f, out: convert_to_sharded(str(f), str(out / "sharded")),
    "inspect_checkpoint": lambda f, out: inspect_checkpoint(str(f)),
}


@pytest.mark.parametrize("loader", sorted(SINGLE_FILE_LOADERS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", ["legacy", "bare_state_dict", "consolidated"])
def test_poisoned_pth_is_refused(
    pristine: Path, tmp_path: Path, marker: Path, fmt: str, kind: str, loader: str
) -> None:
    payload, global_name = _payload(kind, marker)
    path = tmp_path / "model_0011524.pth"
    if fmt == "legacy":
        _legacy_pth(path, payload)
    elif fmt == "bare_state_dict":
        _bare_state_dict_pth(path, payload)
    else:
        _consolidated_pth(path, payload, pristine)
    with pytest.raises(UnsafeCheckpointError) as info:
        SINGLE_FILE_LOADERS[loader](path, tmp_path)
    _assert_refusal(info.value, str(path), global_name)
    assert not (tmp_path / "sharded").exists()


def _c2_pkl(path: Path, payload: Any, *, nested: bool = True) -> Path:
    blobs = {"res_conv1_bn_s": np.ones(4, np.float32), "res_conv1_bn_b": payload}
    path.write_bytes(pickle.dumps({"blobs": blobs} if nested else blobs, protocol=2))
    return path


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("nested", [True, False], ids=["blobs", "flat"])
def test_poisoned_caffe2_pkl_is_refused(tmp_path: Path, marker: Path, kind: str, nested: bool) -> None:
    payload, global_name = _payload(kind, marker)
    path = _c2_pkl(tmp_path / "SLOWFAST_8x8_R50.pkl", payload, nested=nested)
    for load in (
        lambda: ActionCheckpointer(None, _tiny()[0]).load(str(path)),
        lambda: load_c2_state_dict(str(path), source=str(path)),
        lambda: convert_c2_to_sharded(str(path), str(tmp_path / "sharded")),
    ):
        with pytest.raises(UnsafeCheckpointError) as info:
            load()
        _assert_refusal(info.value, str(path), global_name)
    assert not (tmp_path / "sharded").exists()


def test_caffe2_pkl_refuses_even_with_allow_unsafe_pickle(tmp_path: Path, marker: Path) -> None:
    """``.pkl`` weights hold only arrays, so they never need the opt-in and never get it."""
    path = _c2_pkl(tmp_path / "w.pkl", Payload(marker))
    with pytest.raises(UnsafeCheckpointError):
        ActionCheckpointer(None, _tiny()[0], allow_unsafe_pickle=True).load(str(path))


# --------------------------------------------------------------------------- the last_checkpoint tag
OUTSIDE_TAGS = ["../../etc/passwd", "/etc", "/etc/", "../other/model_evil", "other-run-absolute"]


@pytest.mark.parametrize("content", OUTSIDE_TAGS)
def test_tag_pointing_outside_save_dir_never_leaves_it(
    run: Path, other_run: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A path elsewhere is reduced to its basename inside save_dir; here none exists, so the
    newest committed checkpoint of save_dir itself is resumed (with a warning)."""
    if content == "other-run-absolute":
        content = str(other_run / "model_evil")  # a real, committed checkpoint with a payload
    (run / TAG_FILE).write_text(content)
    location = resolve_location(str(run))
    target = resolve_tag(location, content)
    assert target.url.startswith(str(run) + "/") and "/" not in target.url[len(str(run)) + 1 :]

    model = _tiny(fill=0.0)[0]
    with caplog.at_level(logging.WARNING, logger="stmixer_dist_ckpt"):
        extras = Checkpointer(model, save_dir=str(run)).load()
    assert extras["iteration"] == 1  # the pristine checkpoint inside run, not the other run's
    assert all(torch.all(v == 1.0) for v in model.state_dict().values())
    assert "not inside" in caplog.text or "not usable" in caplog.text
    assert not exists(other_run.parent / "other-marker")


@pytest.mark.parametrize("content", ["s3://other-bucket/x", "file:///etc", "memory://bucket/run"])
def test_tag_holding_a_url_elsewhere_is_refused(run: Path, content: str) -> None:
    (run / TAG_FILE).write_text(content)
    with pytest.raises(CheckpointNotFoundError, match="tags may only name checkpoints inside their own save_dir"):
        Checkpointer(_tiny()[0], save_dir=str(run)).load()
    with pytest.raises(CheckpointNotFoundError):
        Checkpointer(_tiny()[0], save_dir=str(run)).get_checkpoint_file()


@pytest.mark.parametrize("content", ["..", ".", "last_checkpoint", ".hidden", "a\\..\\..\\etc", "*"])
def test_tag_holding_a_non_name_is_refused(run: Path, content: str) -> None:
    (run / TAG_FILE).write_text(content)
    with pytest.raises((ValueError, CheckpointError)):
        Checkpointer(_tiny()[0], save_dir=str(run)).load()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("memory://bucket/run/model_1", "memory://bucket/run/model_1"),
        ("memory://bucket/run/../../etc/model_2", "memory://bucket/run/model_2"),
        ("/abs/elsewhere/model_3.pth", "memory://bucket/run/model_3.pth"),
        ("s3://other-bucket/x", None),
        ("memory://other-bucket/run/model_1", None),
        ("memory://bucket/run2/model_1", None),
        ("memory://bucket/runner", None),
    ],
)
def test_tag_of_an_object_store_save_dir_stays_in_its_bucket_prefix(content: str, expected: str | None) -> None:
    save_dir = resolve_location("memory://bucket/run")
    if expected is None:
        with pytest.raises(CheckpointNotFoundError):
            resolve_tag(save_dir, content)
    else:
        assert resolve_tag(save_dir, content).url == expected


# --------------------------------------------------------------------------- the manifest
@pytest.mark.parametrize("data_dir", ["../x", "..", "/etc", "other-absolute", "a/../../b", "..\\x", ""])
def test_manifest_naming_a_data_dir_elsewhere_is_refused(run: Path, other_run: Path, data_dir: str) -> None:
    if data_dir == "other-absolute":
        data_dir = str(data_dir_of(other_run / "model_evil"))
    _payloads.edit_manifest(run / CKPT, data_dir=data_dir)
    model = _tiny(fill=0.0)[0]
    for load in (
        lambda: Checkpointer(model).load(str(run / CKPT)),
        lambda: Checkpointer(model, save_dir=str(run)).load(),
        lambda: inspect_checkpoint(str(run / CKPT)),
        lambda: consolidate(str(run / CKPT), str(run.parent / "out.pth")),
    ):
        with pytest.raises((CorruptCheckpointError, StorageError), match="plain"):
            load()
    assert all(torch.all(v == 0.0) for v in model.state_dict().values())


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", ".."])
def test_manifest_naming_a_file_elsewhere_is_refused(run: Path, name: str) -> None:
    manifest = (run / CKPT / "manifest.json").read_text()
    import json

    raw = json.loads(manifest)
    raw["files"][name] = {"size": 1, "checksum": "xxh3_64:0"}
    (run / CKPT / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(CorruptCheckpointError, match="must be a plain file name"):
        Checkpointer(_tiny()[0]).load(str(run / CKPT))


# --------------------------------------------------------------------------- names given to save
@pytest.mark.parametrize(
    "name", ["../escape", "/tmp/escape", "a/b", "..", ".", "a\\b", ".hidden", "last_checkpoint", "model_*", ""]
)
def test_save_refuses_names_that_are_not_plain(tmp_path: Path, name: str) -> None:
    run = tmp_path / "deep" / "run"
    with pytest.raises(ValueError):
        validate_checkpoint_name(name)
    with pytest.raises(ValueError):
        Checkpointer(_tiny()[0], save_dir=str(run), save_to_disk=True).save(name)
    written = [p for p in tmp_path.rglob("*") if p not in (tmp_path / "deep", run)]
    assert all(run in p.parents for p in written), written  # nothing beside or above save_dir


@pytest.mark.parametrize("part", ["..", ".", "", "a/b", "../x", "/etc", "a\\b"])
def test_storage_join_refuses_path_components(tmp_path: Path, part: str) -> None:
    with pytest.raises(StorageError, match="plain name"):
        resolve_location(str(tmp_path)).join(part)


# --------------------------------------------------------------------------- what must keep working
_ALPHACTION = ("alphaction", "alphaction.structures", "alphaction.structures.memory_pool")


@pytest.fixture
def alphaction_pool_class(monkeypatch: pytest.MonkeyPatch) -> type:
    """A stand-in for AlphAction's ``MemoryPool``, pickled under its real module and name."""

    class LegacyMemoryPool:
        def __init__(self) -> None:
            self.cache: defaultdict[Any, dict[Any, Any]] = defaultdict(dict)

    LegacyMemoryPool.__module__ = _ALPHACTION[-1]
    LegacyMemoryPool.__name__ = LegacyMemoryPool.__qualname__ = "MemoryPool"
    modules = [types.ModuleType(name) for name in _ALPHACTION]
    modules[2].MemoryPool = LegacyMemoryPool  # type: ignore[attr-defined]
    for name, module in zip(_ALPHACTION, modules, strict=True):
        monkeypatch.setitem(sys.modules, name, module)
    return LegacyMemoryPool


def test_legacy_pth_with_alphaction_memory_pool_keeps_loading(
    tmp_path: Path, alphaction_pool_class: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = alphaction_pool_class()
    pool.cache["movie_a"][902] = torch.arange(3.0)
    path = _legacy_pth(tmp_path / "model_0011524.pth", pool)
    for name in _ALPHACTION:
        monkeypatch.delitem(sys.modules, name)  # AlphAction is not installed where we load
    assert b"alphaction.structures.memory_pool" in path.read_bytes()

    model, optimizer, scheduler = _tiny(fill=0.0)
    extras = Checkpointer(model, optimizer, scheduler).load(str(path))
    assert extras["iteration"] == 11524
    assert isinstance(extras["person_pool"], MemoryPool)
    torch.testing.assert_close(extras["person_pool"]["movie_a", 902], torch.arange(3.0))
    assert isinstance(load_legacy_checkpoint(str(path), source="x")["person_pool"], MemoryPool)
    assert any(e.key.startswith("person_pool") for e in inspect_checkpoint(str(path)).entries)


def test_memory_pool_extra_round_trips_through_sharded_checkpoints(run: Path) -> None:
    extras = Checkpointer(_tiny()[0], save_dir=str(run)).load()
    assert isinstance(extras["person_pool"], MemoryPool)
    torch.testing.assert_close(extras["person_pool"]["movie", 902], torch.arange(3.0))


def test_user_class_extra_round_trips_once_registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safe_pickle_module, "_user_allowed", {})  # the registry is process-wide
    model = _tiny()[0]
    Checkpointer(model, save_dir=str(tmp_path), save_to_disk=True).save(CKPT, stats=RunStats(0.5))

    with pytest.raises(UnsafeCheckpointError) as info:
        Checkpointer(model, save_dir=str(tmp_path)).load()
    _assert_refusal(info.value, "[extra.stats]", f"{RunStats.__module__}.RunStats")

    register_safe_class(RunStats)
    assert Checkpointer(model, save_dir=str(tmp_path)).load()["stats"] == RunStats(0.5)


def test_moved_user_class_loads_when_registered_under_its_old_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(safe_pickle_module, "_user_allowed", {})
    model = _tiny()[0]
    Checkpointer(model, save_dir=str(tmp_path), save_to_disk=True).save(CKPT, stats=RunStats(2.0))
    register_safe_class(RunStatsV2, name=f"{RunStats.__module__}.RunStats")
    loaded = Checkpointer(model, save_dir=str(tmp_path)).load()["stats"]
    assert type(loaded) is RunStatsV2 and loaded.best == 2.0


def test_allow_unsafe_pickle_loads_a_trusted_file(tmp_path: Path) -> None:
    model = _tiny()[0]
    Checkpointer(model, save_dir=str(tmp_path / "run"), save_to_disk=True).save(CKPT, stats=RunStats(1.5))
    trusted = Checkpointer(model, save_dir=str(tmp_path / "run"), allow_unsafe_pickle=True).load()
    assert trusted["stats"] == RunStats(1.5)

    path = _legacy_pth(tmp_path / "trusted.pth", RunStats(3.0))
    with pytest.raises(UnsafeCheckpointError):
        Checkpointer(model).load(str(path))
    assert Checkpointer(model, allow_unsafe_pickle=True).load(str(path))["person_pool"] == RunStats(3.0)


def test_allow_unsafe_pickle_really_is_unrestricted(tmp_path: Path) -> None:
    """The opt-in runs whatever the file holds; this is why it is only for files you trust fully."""
    ran = tmp_path / "opt-in-ran"
    path = _legacy_pth(tmp_path / "evil.pth", Payload(ran))
    Checkpointer(_tiny()[0], allow_unsafe_pickle=True).load(str(path))
    assert ran.exists()


def test_clean_checkpoints_load_with_safe_loading_on(run: Path, tmp_path: Path) -> None:
    model, optimizer, scheduler = _tiny(fill=0.0)
    extras = Checkpointer(model, optimizer, scheduler, str(run)).load()
    assert extras["iteration"] == 1 and all(torch.all(v == 1.0) for v in model.state_dict().values())
    consolidate(str(run), str(tmp_path / "single.pth"), unsafe_extras="keep")
    assert Checkpointer(_tiny()[0]).load(str(tmp_path / "single.pth"))["iteration"] == 1


# --------------------------------------------------------------------------- the command line
def _poisoned_run(run: Path, marker: Path) -> Path:
    metadata = _payloads.read_metadata_trusted(run / CKPT)
    metadata.planner_data["model.backbone.weight"] = Payload(marker)
    _payloads.write_metadata(run / CKPT, pickle.dumps(metadata))
    return run


CLI_CASES: dict[str, tuple[list[str], int]] = {
    # case: (argv with {run}, {pth}, {pkl}, {single}, {out} placeholders, expected exit code)
    "inspect .metadata": (["inspect", "{run}"], 2),
    "inspect legacy .pth": (["inspect", "{pth}"], 2),
    "inspect consolidated .pth": (["inspect", "{single}"], 2),
    "inspect .pkl": (["inspect", "{pkl}"], 2),
    "consolidate .metadata": (["consolidate", "{run}", "{out}/x.pth"], 2),
    "consolidate .metadata --unsafe-extras keep": (["consolidate", "{run}", "{out}/x.pth", "--unsafe-extras", "keep"], 2),
    "convert sharded .metadata": (["convert", "{run}", "{out}/x.pth"], 2),
    "convert legacy .pth": (["convert", "{pth}", "{out}/sharded"], 2),
    "convert consolidated .pth": (["convert", "{single}", "{out}/sharded"], 2),
    "convert .pkl": (["convert", "{pkl}", "{out}/sharded"], 2),
    # verify never unpickles: it compares bytes with the manifest, which the attacker rewrote too.
    "verify .metadata (manifest rewritten)": (["verify", "{run}"], 0),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_refuses_payloads(
    case: str, run: Path, pristine: Path, tmp_path: Path, marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, expected = CLI_CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    paths = {
        "run": str(_poisoned_run(run, marker)),
        "pth": str(_legacy_pth(tmp_path / "legacy.pth", Payload(marker))),
        "single": str(_consolidated_pth(tmp_path / "single.pth", Payload(marker), pristine)),
        "pkl": str(_c2_pkl(tmp_path / "weights.pkl", Payload(marker))),
        "out": str(out),
    }
    code, text = _cli(capsys, *(part.format(**paths) for part in argv))
    assert code == expected, text
    if expected == 2:
        assert "refusing to unpickle" in text and f"{Payload.__module__}.plant_marker" in text, text
    assert list(out.iterdir()) == []


def test_cli_inspect_shows_a_poisoned_extra_as_refused(
    run: Path, marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Checkpointer(_tiny()[0], save_dir=str(run), save_to_disk=True).save("model_0000002", stats=Payload(marker))
    code, text = _cli(capsys, "inspect", run)
    assert code == 0 and "extra.stats" in text and "not shown" in text, text
    code, text = _cli(capsys, "consolidate", run, run.parent / "x.pth", "--unsafe-extras", "error")
    assert code == 2 and "extra.stats" in text, text


def test_cli_verify_reports_an_edited_metadata_as_damaged(
    run: Path, marker: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metadata = _payloads.read_metadata_trusted(run / CKPT)
    metadata.planner_data["model.backbone.weight"] = Payload(marker)
    (data_dir_of(run / CKPT) / ".metadata").write_bytes(pickle.dumps(metadata))  # manifest left as it was
    code, text = _cli(capsys, "verify", run / CKPT)
    assert code == 1 and ".metadata" in text, text
    with pytest.raises(CorruptCheckpointError):
        Checkpointer(_tiny()[0]).load(str(run / CKPT))  # verify=True (default) stops it before unpickling


@pytest.mark.parametrize("command", ["inspect", "verify", "consolidate"])
def test_cli_does_not_follow_a_tag_out_of_save_dir(
    command: str, run: Path, other_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run / TAG_FILE).write_text(str(other_run / "model_evil"))
    argv: list[str | Path] = [command, run]
    if command == "consolidate":
        argv.append(run.parent / "x.pth")
    code, text = _cli(capsys, *argv)
    assert code == 2 and f"no checkpoint at {run}/model_evil" in text, text
    assert not exists(other_run.parent / "other-marker")


@pytest.mark.parametrize("command", ["inspect", "verify", "consolidate"])
def test_cli_refuses_a_manifest_naming_another_data_dir(
    command: str, run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _payloads.edit_manifest(run / CKPT, data_dir="../../x")
    argv: list[str | Path] = [command, run / CKPT]
    if command == "consolidate":
        argv.append(run.parent / "x.pth")
    code, text = _cli(capsys, *argv)
    assert code in (1, 2) and "plain directory name" in text, text


def test_cli_allow_unsafe_pickle_shows_a_trusted_user_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _legacy_pth(tmp_path / "trusted.pth", RunStats(4.0))
    code, text = _cli(capsys, "inspect", path)
    assert code == 2 and f"{RunStats.__module__}.RunStats" in text
    code, text = _cli(capsys, "inspect", path, "--allow-unsafe-pickle")
    assert code == 0 and "person_pool" in text, text
