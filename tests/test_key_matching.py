"""Matching a legacy state dict onto model keys (seed_semantics §5, §9, §10.6)."""

from __future__ import annotations

import itertools
import logging
import pickle
import re

import pytest
import torch

from stmixer_dist_ckpt.errors import IncompatibleCheckpointError
from stmixer_dist_ckpt.legacy.key_matching import LoadReport, match_state_dict


def shapes(*keys: str, shape: tuple[int, ...] = (2,)) -> dict[str, torch.Size]:
    return {key: torch.Size(shape) for key in keys}


def tensors(*keys: str, shape: tuple[int, ...] = (2,)) -> dict[str, torch.Tensor]:
    return {key: torch.full(shape, float(i)) for i, key in enumerate(keys)}


def _expand(line: str) -> set[str]:
    """Undo the report's ``a.{x,y}.b`` folding."""
    parts = [
        part[1:-1].split(",") if part.startswith("{") else [part] for part in re.split(r"\.(?![^{]*\})", line)
    ]
    return {".".join(combo) for combo in itertools.product(*parts)}


def test_suffix_matches_only_on_dot_boundary() -> None:
    state, report = match_state_dict(
        shapes("roi_heads.sem_mask_fcn1.bias", "roi_heads.mask_fcn1.bias"), tensors("mask_fcn1.bias")
    )
    assert report.loaded == {"roi_heads.mask_fcn1.bias": "mask_fcn1.bias"}
    assert report.missing == ["roi_heads.sem_mask_fcn1.bias"]
    assert list(state) == ["roi_heads.mask_fcn1.bias"]


def test_no_match_without_dot_boundary_is_missing_and_unexpected() -> None:
    _, report = match_state_dict(shapes("sem_mask_fcn1.bias"), tensors("mask_fcn1.bias"))
    assert report.missing == ["sem_mask_fcn1.bias"]
    assert report.unexpected == ["mask_fcn1.bias"]
    assert not report.is_clean


def test_module_prefix_is_stripped_only_as_prefix() -> None:
    loaded = tensors("module.submodule.weight", "module.a.submodule.w")
    state, report = match_state_dict(shapes("submodule.weight", "a.submodule.w"), loaded)
    assert report.loaded == {"submodule.weight": "submodule.weight", "a.submodule.w": "a.submodule.w"}
    assert report.stripped_prefix == "module."
    torch.testing.assert_close(state["a.submodule.w"], loaded["module.a.submodule.w"])
    assert report.is_clean


def test_module_prefix_kept_unless_every_key_has_it() -> None:
    _, report = match_state_dict(shapes("x.weight", "y.weight"), tensors("module.x.weight", "y.weight"))
    assert report.stripped_prefix == ""
    assert report.loaded == {"y.weight": "y.weight"}
    assert report.missing == ["x.weight"] and report.unexpected == ["module.x.weight"]


def test_plain_checkpoint_into_ddp_wrapped_model_keys() -> None:
    _, report = match_state_dict(shapes("module.backbone.conv.weight"), tensors("backbone.conv.weight"))
    assert report.loaded == {"module.backbone.conv.weight": "backbone.conv.weight"}


def test_longest_suffix_wins_and_exact_beats_suffix() -> None:
    model = shapes("backbone.layer1.conv.weight", "layer1.conv.bias")
    loaded = tensors("conv.weight", "layer1.conv.weight", "conv.bias", "layer1.conv.bias")
    _, report = match_state_dict(model, loaded)
    assert report.loaded == {
        "backbone.layer1.conv.weight": "layer1.conv.weight",
        "layer1.conv.bias": "layer1.conv.bias",
    }
    assert sorted(report.unexpected) == ["conv.bias", "conv.weight"]


def test_one_checkpoint_key_for_two_model_keys_is_an_error_naming_all() -> None:
    model = shapes("backbone.layer3.22.conv1.weight", "backbone.layer1.0.conv1.weight", "backbone.fc.weight")
    with pytest.raises(IncompatibleCheckpointError) as info:
        match_state_dict(model, tensors("conv1.weight", "fc.weight"))
    message = str(info.value)
    assert "'conv1.weight'" in message
    assert "'backbone.layer1.0.conv1.weight'" in message and "'backbone.layer3.22.conv1.weight'" in message


def test_ambiguity_counts_an_exact_match_too() -> None:
    with pytest.raises(
        IncompatibleCheckpointError,
        match=r"'conv1\.weight' matches model keys 'conv1\.weight', 'stem\.conv1\.weight'",
    ):
        match_state_dict(shapes("conv1.weight", "stem.conv1.weight"), tensors("conv1.weight"))


def test_shape_mismatch_is_skipped_and_reported() -> None:
    model = {"roi_heads.cls.weight": torch.Size([80, 8]), "backbone.conv.weight": (4, 3)}
    loaded = {"roi_heads.cls.weight": torch.zeros(400, 8), "backbone.conv.weight": torch.ones(4, 3)}
    state, report = match_state_dict(model, loaded)
    assert list(state) == ["backbone.conv.weight"]
    assert report.wrong_shape == {"roi_heads.cls.weight": ((400, 8), (80, 8))}
    assert report.missing == [] and report.unexpected == []
    assert not report.is_clean
    assert "roi_heads.cls.weight: (400, 8) vs (80, 8)" in report.format()


def test_skip_head_skips_model_and_checkpoint_head_keys() -> None:
    model = shapes("backbone.conv.weight", "roi_heads.cls.weight", "roi_heads.new_layer.weight")
    loaded = tensors(
        "module.backbone.conv.weight", "module.roi_heads.cls.weight", "module.roi_heads.old.bias"
    )
    state, report = match_state_dict(model, loaded, head_prefixes=("roi_heads.", "stm_head."), skip_head=True)
    assert list(state) == ["backbone.conv.weight"]
    assert report.head_skipped == ["roi_heads.cls.weight", "roi_heads.new_layer.weight", "roi_heads.old.bias"]
    assert report.missing == [] and report.unexpected == []
    assert report.is_clean


def test_skip_head_tests_the_checkpoint_key_too() -> None:
    # A DDP-wrapped model's key does not start with the prefix, but its match does.
    model = shapes("module.roi_heads.cls.weight", "module.backbone.w")
    _, report = match_state_dict(
        model, tensors("roi_heads.cls.weight", "backbone.w"), head_prefixes=("roi_heads.",), skip_head=True
    )
    assert report.head_skipped == ["module.roi_heads.cls.weight"]
    assert report.loaded == {"module.backbone.w": "backbone.w"}


def test_head_prefixes_without_skip_head_load_the_head() -> None:
    _, report = match_state_dict(
        shapes("roi_heads.cls.weight"), tensors("roi_heads.cls.weight"), head_prefixes=("roi_heads.",)
    )
    assert report.loaded == {"roi_heads.cls.weight": "roi_heads.cls.weight"}
    assert report.head_skipped == []


def test_skip_head_without_prefixes_is_rejected() -> None:
    with pytest.raises(ValueError, match="head_prefixes"):
        match_state_dict(shapes("a.w"), tensors("a.w"), skip_head=True)


def test_empty_checkpoint_is_a_clear_error() -> None:
    with pytest.raises(IncompatibleCheckpointError, match="state dict is empty"):
        match_state_dict(shapes("a.w"), {})


def test_non_tensor_value_is_an_error_naming_the_key() -> None:
    with pytest.raises(IncompatibleCheckpointError, match=r"'a\.w' holds a list"):
        match_state_dict(shapes("a.w"), {"a.w": [1.0, 2.0]})  # type: ignore[dict-item]


def test_output_follows_model_order_and_keeps_tensors() -> None:
    loaded = tensors("b.w", "a.w")
    state, report = match_state_dict(shapes("a.w", "b.w"), loaded)
    assert list(state) == ["a.w", "b.w"] and list(report.loaded) == ["a.w", "b.w"]
    assert state["b.w"] is loaded["b.w"]


def test_many_keys_scale_linearly() -> None:
    # Upstream built an N x M score tensor: 40k x 40k here would be 1.6e9 cells.
    keys = [f"backbone.s{i % 5}.pathway0_res{i}.branch2.{c}.weight" for i in range(10_000) for c in "abcd"]
    state, report = match_state_dict(
        dict.fromkeys(keys, torch.Size([1])), {f"module.{k}": torch.zeros(1) for k in keys}
    )
    assert len(state) == len(keys) and report.is_clean


def test_report_groups_keys_by_module_prefix() -> None:
    missing = [f"backbone.s2.pathway0_res0.branch2.{conv}.weight" for conv in "abc"] + [
        f"backbone.s2.pathway0_res0.branch2.{conv}_bn.{stat}"
        for conv in "abc"
        for stat in ("weight", "bias", "running_mean", "running_var")
    ]
    report = LoadReport(
        missing=missing, unexpected=["backbone.head.projection.weight", "backbone.head.projection.bias"]
    )
    text = report.format()
    assert "  backbone.s2.pathway0_res0.branch2.{a,b,c}.weight" in text
    assert (
        "  backbone.s2.pathway0_res0.branch2.{a_bn,b_bn,c_bn}.{bias,running_mean,running_var,weight}" in text
    )
    assert "  backbone.head.projection.{bias,weight}" in text
    assert "Missing from the checkpoint, left at their current values (15):" in text
    assert str(report) == text


def test_report_folding_is_exact_and_natural_ordered() -> None:
    keys = [f"layer{i}.{j}.conv.weight" for i in (1, 2, 10) for j in range(3)] + [
        "layer2.0.conv.bias",
        "fc.weight",
    ]
    lines = [line.strip() for line in LoadReport(missing=keys).format().splitlines()[2:]]
    assert set().union(*(_expand(line) for line in lines)) == set(keys)
    assert lines[0] == "fc.weight"
    natural = LoadReport(unexpected=["s.res10.w", "s.res2.w", "s.res1.w"]).format().splitlines()[-1]
    assert natural == "  s.{res1,res2,res10}.w"


def test_report_survives_pickle_for_broadcast() -> None:
    # The checkpointer broadcasts rank 0's report to every rank with pickle.
    _, report = match_state_dict({"a.w": (2,), "b.w": (3,)}, {"a.w": torch.zeros(2), "b.w": torch.zeros(4)})
    assert pickle.loads(pickle.dumps(report)) == report


def test_log_levels(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test_key_matching")
    _, clean = match_state_dict(shapes("backbone.conv.weight"), tensors("conv.weight"))
    _, dirty = match_state_dict(shapes("a.w"), tensors("b.w"))
    with caplog.at_level(logging.DEBUG, logger="test_key_matching"):
        clean.log(logger)
        dirty.log(logger)
    levels = [(record.levelno, record.getMessage().splitlines()[0]) for record in caplog.records]
    assert levels[0] == (logging.INFO, "Loaded 1 model key from the checkpoint.")
    assert "backbone.conv.weight <- conv.weight" in caplog.records[1].getMessage()
    assert caplog.records[1].levelno == logging.DEBUG
    assert any(level == logging.WARNING for level, _ in levels)
