"""``ActionCheckpointer`` in one process: cfg handling, ``.pkl`` weights, legacy files, conversion."""

from __future__ import annotations

import copy
import logging
import pickle
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from yacs.config import CfgNode

from stmixer_dist_ckpt import ActionCheckpointer, C2WeightMap, Checkpointer, MemoryPool
from stmixer_dist_ckpt.c2_conversion import convert_c2_to_sharded
from stmixer_dist_ckpt.demo import DemoModelConfig, build_demo_model
from stmixer_dist_ckpt.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    IncompatibleCheckpointError,
)

from .test_dist_c2_load import (
    AlphActionStyle,
    alphaction_blobs,
    c2_pickle_bytes,
    c2_report_of,
    expected_weights,
    make_c2_blobs,
    report_of,
)
from .test_legacy_file import Net, Wrapper, fake_alphaction

CONFIG = DemoModelConfig()
SMALL = DemoModelConfig(depth=(2, 2, 2, 2))  # fewer blocks, the same real blob names
HEAD = sorted(f"stm_head.{m}.{p}" for m in ("fc1", "cls") for p in ("weight", "bias"))


class Untouchable:
    """A config whose fields raise when read: proves ActionCheckpointer reads none."""

    def __getattr__(self, name: str) -> Any:
        if name.isupper():
            raise AssertionError(f"cfg.{name} was read")
        raise AttributeError(name)


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def blobs() -> dict[str, Any]:
    return make_c2_blobs(CONFIG)


@pytest.fixture
def pkl(tmp_path: Path, blobs: dict[str, Any]) -> str:
    return _write(tmp_path / "SLOWFAST_8x8_R50.pkl", c2_pickle_bytes(blobs))


# ------------------------------------------------------------------- cfg
def _yacs() -> CfgNode:
    cfg = CfgNode()
    cfg.MODEL = CfgNode({"WEIGHT": "x.pkl"})
    return cfg


@pytest.mark.parametrize(
    "make_cfg",
    [
        _yacs,
        lambda: {"MODEL": {"WEIGHT": "x.pkl"}},
        lambda: types.SimpleNamespace(OUTPUT_DIR="."),
        lambda: None,
    ],
    ids=["yacs", "dict", "attributes", "none"],
)
def test_cfg_is_copied_and_never_read(make_cfg: Any, pkl: str) -> None:
    cfg = make_cfg()
    ckpt = ActionCheckpointer(cfg, build_demo_model(CONFIG))
    assert ckpt.cfg == cfg
    if cfg is not None:
        assert ckpt.cfg is not cfg  # later edits by the caller do not leak in
    ActionCheckpointer(Untouchable(), build_demo_model(CONFIG)).load(pkl)


def test_cfg_that_cannot_be_copied_is_kept() -> None:
    cfg = types.SimpleNamespace(lock=__import__("threading").Lock())
    assert ActionCheckpointer(cfg, nn.Linear(1, 1)).cfg is cfg


def test_base_keyword_options_pass_through() -> None:
    ckpt = ActionCheckpointer(None, nn.Linear(1, 1), head_prefixes=("head.",), storage_options={"a": 1})
    assert ckpt.head_prefixes == ("head.",) and ckpt.storage_options == {"a": 1}


def test_save_and_resume_keep_the_base_behaviour(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    ActionCheckpointer(_yacs(), model, save_dir=str(tmp_path), save_to_disk=True).save(
        "model_0000002", iteration=2
    )
    restored = nn.Linear(2, 2)
    extras = ActionCheckpointer(_yacs(), restored, save_dir=str(tmp_path)).load()
    assert extras == {"iteration": 2} and torch.equal(restored.weight, model.weight)
    with pytest.raises(ValueError, match="verify must be"):
        ActionCheckpointer(None, restored).load(str(tmp_path / "x.pkl"), verify="everything")


# ------------------------------------------------------------ .pkl loads
@pytest.mark.parametrize("wrap", [True, False], ids=["blobs", "flat"])
def test_pkl_loads_into_demo_model(tmp_path: Path, blobs: dict[str, Any], wrap: bool) -> None:
    path = _write(tmp_path / "w.pkl", c2_pickle_bytes(blobs, wrap=wrap))
    model = build_demo_model(CONFIG)
    before = copy.deepcopy(model.state_dict())
    extras = ActionCheckpointer(_yacs(), model).load(path)

    assert extras == {}
    state = model.state_dict()
    for key, value in expected_weights(CONFIG, blobs).items():
        assert torch.equal(state[key], value), key
    untouched = [k for k in state if k.startswith("stm_head.") or k.endswith("num_batches_tracked")]
    assert all(torch.equal(state[k], before[k]) for k in untouched)
    report = c2_report_of(extras)
    assert sorted(report.missing) == HEAD
    assert report.unexpected == ["backbone.head.projection.weight", "backbone.head.projection.bias"]
    assert len(report.expected_missing) == sum(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    assert "BatchNorm num_batches_tracked counters (expected)" in report.format()


def test_model_weight_only_on_pkl(pkl: str) -> None:
    extras = ActionCheckpointer(None, build_demo_model(CONFIG)).load(pkl, model_weight_only=True)
    assert extras == {"iteration": 0, "person_pool": MemoryPool()}


def test_strict_c2_load_ignores_counters_but_not_the_head(tmp_path: Path) -> None:
    path = _write(tmp_path / "nohead.pkl", c2_pickle_bytes(make_c2_blobs(CONFIG, head=False)))
    report = report_of(
        ActionCheckpointer(None, build_demo_model(CONFIG)).load(path, no_head=True, strict=True)
    )
    assert report.is_clean and report.head_skipped == HEAD
    with pytest.raises(IncompatibleCheckpointError, match=r"stm_head\.\{cls,fc1\}"):
        ActionCheckpointer(None, build_demo_model(CONFIG)).load(path, strict=True)


def test_pkl_suffix_is_case_insensitive_and_zip_pkl_loads_as_pth(
    tmp_path: Path, pkl: str, caplog: pytest.LogCaptureFixture
) -> None:
    upper = tmp_path / "W.PKL"
    upper.write_bytes(Path(pkl).read_bytes())
    assert report_of(ActionCheckpointer(None, build_demo_model(CONFIG)).load(str(upper))).loaded

    source = nn.Linear(2, 2)
    torch.save({"model": source.state_dict(), "iteration": 5}, tmp_path / "zoo.pkl")
    target = nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING):
        extras = ActionCheckpointer(None, target).load(str(tmp_path / "zoo.pkl"))
    assert extras == {"iteration": 5} and torch.equal(target.weight, source.weight)
    assert "torch.save archive despite its .pkl suffix" in caplog.text


def test_pkl_errors_name_the_file_and_blob(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match=r"missing\.pkl"):
        ActionCheckpointer(None, nn.Linear(1, 1)).load(str(tmp_path / "missing.pkl"))
    bad = _write(tmp_path / "bad.pkl", c2_pickle_bytes({"conv1_w": np.float32(1.0)}))
    with pytest.raises(CheckpointError, match=r"bad\.pkl: blob 'conv1_w' holds a float32"):
        ActionCheckpointer(None, nn.Linear(1, 1)).load(bad)


# ------------------------------------------------------- weight-map modes
def test_model_weight_map_is_used_automatically_also_under_module(tmp_path: Path) -> None:
    blobs = alphaction_blobs()
    path = _write(tmp_path / "i3d.pkl", c2_pickle_bytes(blobs))
    inner = AlphActionStyle()
    report = c2_report_of(ActionCheckpointer(None, Wrapper(inner)).load(path))  # the map lives on .module
    assert torch.equal(inner.backbone.conv1.weight, torch.from_numpy(blobs["conv1_w"]))
    assert torch.equal(
        inner.state_dict()["backbone.bn1.running_var"], torch.from_numpy(blobs["res_conv1_bn_riv"])
    )
    assert set(report.wrong_shape) == {
        f"module.roi_heads.action.predictor.cls_score.{p}" for p in ("weight", "bias")
    }
    assert report.expected_missing == ["module.backbone.bn1.num_batches_tracked"]


def test_no_head_skips_alphaction_roi_heads(tmp_path: Path) -> None:
    path = _write(tmp_path / "i3d.pkl", c2_pickle_bytes(alphaction_blobs()))
    model = AlphActionStyle()
    head = model.roi_heads.action.predictor.cls_score
    before = head.weight.detach().clone()
    report = report_of(ActionCheckpointer(None, model, c2_weight_map="model").load(path, no_head=True))
    assert report.head_skipped == [f"roi_heads.action.predictor.cls_score.{p}" for p in ("bias", "weight")]
    assert not report.wrong_shape and torch.equal(head.weight, before)


def test_rules_mode_ignores_the_model_map_and_explicit_map_wins(tmp_path: Path) -> None:
    path = _write(tmp_path / "i3d.pkl", c2_pickle_bytes(alphaction_blobs()))
    report = report_of(
        ActionCheckpointer(None, AlphActionStyle(), c2_weight_map=C2WeightMap.RULES).load(path)
    )
    assert not report.loaded and "backbone.s1.pathway0_stem.conv.weight" in report.unexpected
    model = AlphActionStyle()
    explicit = ActionCheckpointer(None, model, c2_weight_map={"backbone.conv1.weight": "conv1_w"})
    assert list(report_of(explicit.load(path)).loaded) == ["backbone.conv1.weight"]


def test_bad_weight_map_options_fail_at_construction() -> None:
    with pytest.raises(ValueError, match=r"c2_weight_map='model'.*ActionDetector has none"):
        ActionCheckpointer(None, build_demo_model(CONFIG), c2_weight_map="model")
    with pytest.raises(ValueError, match=r"'auto', 'rules', 'model'"):
        ActionCheckpointer(None, nn.Linear(1, 1), c2_weight_map="regex")
    with pytest.raises(ValueError, match=r"str -> str"):
        ActionCheckpointer(None, nn.Linear(1, 1), c2_weight_map={"w": 3})  # type: ignore[dict-item]


# ------------------------------------------------- legacy single files
def test_upstream_pth_with_module_prefix_and_memory_pool(tmp_path: Path) -> None:
    saved_net = Net()
    saved = Wrapper(saved_net)
    optimizer = torch.optim.SGD(saved.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[5, 8])
    for param in saved.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    scheduler.step()
    path = tmp_path / "model_0011524.pth"
    with fake_alphaction() as legacy_pool_class:
        pool = legacy_pool_class()
        pool.cache["movie_a"][902] = torch.arange(3.0)
        torch.save(
            {
                "model": saved.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "iteration": 11524,
                "person_pool": pool,
            },
            path,
        )

    model = Net()
    new_optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    new_scheduler = torch.optim.lr_scheduler.MultiStepLR(new_optimizer, milestones=[5, 8])
    extras = ActionCheckpointer(_yacs(), model, new_optimizer, new_scheduler).load(str(path))

    assert extras["iteration"] == 11524 and isinstance(extras["person_pool"], MemoryPool)
    assert torch.equal(extras["person_pool"]["movie_a", 902], torch.arange(3.0))
    assert report_of(extras).is_clean and report_of(extras).stripped_prefix == "module."
    assert torch.equal(model.submodule.weight, saved_net.submodule.weight)
    momentum = new_optimizer.state[model.submodule.weight]["momentum_buffer"]
    assert torch.equal(momentum, optimizer.state[saved_net.submodule.weight]["momentum_buffer"])
    assert new_scheduler.last_epoch == 1


def test_bare_state_dict_and_videomae_module_key(tmp_path: Path) -> None:
    source = Net()
    torch.save(source.state_dict(), tmp_path / "bare.pth")
    target = Net()
    assert ActionCheckpointer(None, target).load(str(tmp_path / "bare.pth")) == {}
    assert torch.equal(target.conv.weight, source.conv.weight)

    torch.save({"module": source.state_dict(), "global_steps": 800}, tmp_path / "vmae.pth")
    backbone = Net()
    detector = nn.ModuleDict({"backbone": backbone, "stm_head": nn.Linear(2, 3)})
    report = report_of(ActionCheckpointer(None, detector).load(str(tmp_path / "vmae.pth")))
    assert torch.equal(backbone.submodule.weight, source.submodule.weight)
    assert sorted(report.missing) == ["stm_head.bias", "stm_head.weight"] and not report.unexpected


# ---------------------------------------------------------- conversion
def test_convert_c2_to_sharded_loads_strictly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blobs = make_c2_blobs(SMALL, head=False)
    src = _write(tmp_path / "w.pkl", c2_pickle_bytes(blobs))
    result = convert_c2_to_sharded(src, str(tmp_path / "run" / "c2_init"), progress=True)
    assert "reading w.pkl" in capsys.readouterr().err  # the tqdm bar
    assert result.added_num_batches_tracked == sum(
        isinstance(m, nn.BatchNorm3d) for m in build_demo_model(SMALL).modules()
    )

    model = build_demo_model(SMALL)
    # Sharded checkpoints load strictly by default: the added counters make that pass.
    report = report_of(Checkpointer(model).load(result.checkpoint, no_head=True))
    assert report.is_clean
    for key, value in expected_weights(SMALL, blobs).items():
        assert torch.equal(model.state_dict()[key], value), key

    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        convert_c2_to_sharded(src, result.checkpoint)
    again = convert_c2_to_sharded(src, result.checkpoint, overwrite=True, num_batches_tracked=None)
    entries = sorted(p.name for p in Path(again.checkpoint).iterdir())
    assert len(entries) == 2 and entries[0].startswith("data-") and entries[1] == "manifest.json"
    with pytest.raises(IncompatibleCheckpointError, match="num_batches_tracked"):
        Checkpointer(build_demo_model(SMALL)).load(again.checkpoint, no_head=True)


def test_convert_with_weight_map_and_bad_sources(tmp_path: Path) -> None:
    src = _write(tmp_path / "i3d.pkl", c2_pickle_bytes(alphaction_blobs()))
    mapping = AlphActionStyle().c2_weight_mapping()
    result = convert_c2_to_sharded(src, str(tmp_path / "i3d"), weight_map=mapping)
    model = AlphActionStyle()
    assert report_of(Checkpointer(model).load(result.checkpoint, no_head=True)).is_clean
    assert torch.equal(model.backbone.conv1.weight, torch.from_numpy(alphaction_blobs()["conv1_w"]))

    with pytest.raises(CheckpointNotFoundError, match=r"nope\.pkl"):
        convert_c2_to_sharded(str(tmp_path / "nope.pkl"), str(tmp_path / "out"))
    torch.save({"model": {}}, tmp_path / "zip.pkl")
    with pytest.raises(CheckpointError, match=r"torch\.save zip archive"):
        convert_c2_to_sharded(str(tmp_path / "zip.pkl"), str(tmp_path / "out2"))
    (tmp_path / "file").write_bytes(pickle.dumps(1))
    with pytest.raises(CheckpointExistsError, match="is a file"):
        convert_c2_to_sharded(src, str(tmp_path / "file"))


def test_cli_convert_dispatches_pkl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stmixer_dist_ckpt import cli
    from stmixer_dist_ckpt.commands import _convert_c2, convert

    if not any(kind.convert is _convert_c2.convert for kind in convert.SOURCE_KINDS):
        kind = convert.SourceKind(
            _convert_c2.NAME, _convert_c2.DESCRIPTION, _convert_c2.matches, _convert_c2.convert
        )
        monkeypatch.setattr(convert, "SOURCE_KINDS", [*convert.SOURCE_KINDS, kind])
    src = _write(tmp_path / "i3d.pkl", c2_pickle_bytes(alphaction_blobs()))
    assert cli.main(["convert", src, str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "manifest.json").exists()
    assert cli.main(["convert", src, str(tmp_path / "out")]) == 2  # exists, no --overwrite
    assert cli.main(["convert", src, str(tmp_path / "out"), "--overwrite", "--no-progress"]) == 0
    assert cli.main(["convert", src, str(tmp_path / "out2"), "--dtype", "bf16"]) == 2
