"""Caffe2 blob-name conversion and blob-to-tensor rules (seed_semantics §6.3, §6.4, §10.7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stmixer_dist_ckpt.errors import CheckpointError, IncompatibleCheckpointError
from stmixer_dist_ckpt.legacy.c2_names import convert_c2_blobs, convert_c2_name, select_c2_blobs

# seed_semantics.md §6.4, produced by running STMixer's converter.
SEED_TABLE = [
    ("conv1_w", "backbone.s1.pathway0_stem.conv.weight"),
    ("res_conv1_bn_s", "backbone.s1.pathway0_stem.bn.weight"),
    ("res_conv1_bn_b", "backbone.s1.pathway0_stem.bn.bias"),
    ("res_conv1_bn_rm", "backbone.s1.pathway0_stem.bn.running_mean"),
    ("res_conv1_bn_riv", "backbone.s1.pathway0_stem.bn.running_var"),
    ("res2_0_branch1_w", "backbone.s2.pathway0_res0.branch1.weight"),
    ("res2_0_branch1_bn_s", "backbone.s2.pathway0_res0.branch1_bn.weight"),
    ("res2_0_branch2a_w", "backbone.s2.pathway0_res0.branch2.a.weight"),
    ("res2_0_branch2a_bn_rm", "backbone.s2.pathway0_res0.branch2.a_bn.running_mean"),
    ("res2_1_branch2b_w", "backbone.s2.pathway0_res1.branch2.b.weight"),
    ("res3_3_branch2c_bn_s", "backbone.s3.pathway0_res3.branch2.c_bn.weight"),
    ("res4_5_branch2c_w", "backbone.s4.pathway0_res5.branch2.c.weight"),
    ("res5_2_branch2c_bn_riv", "backbone.s5.pathway0_res2.branch2.c_bn.running_var"),
    ("t_conv1_w", "backbone.s1.pathway1_stem.conv.weight"),
    ("t_res_conv1_bn_s", "backbone.s1.pathway1_stem.bn.weight"),
    ("t_res2_0_branch2a_w", "backbone.s2.pathway1_res0.branch2.a.weight"),
    ("t_pool1_subsample_w", "backbone.s1_fuse.conv_f2s.weight"),
    ("t_pool1_subsample_bn_rm", "backbone.s1_fuse.bn.running_mean"),
    ("t_res2_2_branch2c_bn_subsample_w", "backbone.s2_fuse.conv_f2s.weight"),
    ("t_res4_5_branch2c_bn_subsample_bn_riv", "backbone.s4_fuse.bn.running_var"),
    ("nonlocal_conv3_1_theta_w", "backbone.s3.pathway0_nonlocal1.conv_theta.weight"),
    ("nonlocal_conv4_5_bn_s", "backbone.s4.pathway0_nonlocal5.bn.weight"),
    ("pred_w", "backbone.head.projection.weight"),
    ("conv1_w_momentum", "backbone.s1.pathway0_stem.conv.w_momentum"),
]

# Further pairs, worked out by hand from the §6.3 rules.
EXTRA_TABLE = [
    ("pred_b", "backbone.head.projection.bias"),
    ("t_res3_1_branch2b_bn_b", "backbone.s3.pathway1_res1.branch2.b_bn.bias"),
    ("t_res2_0_branch1_w", "backbone.s2.pathway1_res0.branch1.weight"),
    ("nonlocal_conv4_0_g_b", "backbone.s4.pathway0_nonlocal0.conv_g.bias"),
    ("nonlocal_conv4_0_phi_w", "backbone.s4.pathway0_nonlocal0.conv_phi.weight"),
    ("nonlocal_conv3_2_out_w", "backbone.s3.pathway0_nonlocal2.conv_out.weight"),
    ("nonlocal_conv3_2_bn_riv", "backbone.s3.pathway0_nonlocal2.bn.running_var"),
    ("conv1_xy_w", "backbone.s1.pathway0_stem.conv_xy.weight"),
    ("t_pool1_subsample_bn_s", "backbone.s1_fuse.bn.weight"),
    ("t_res3_3_branch2c_bn_subsample_b", "backbone.s3_fuse.conv_f2s.bias"),
    ("unknown_blob", "backbone.unknown_blob"),
]


@pytest.mark.parametrize(("blob", "expected"), SEED_TABLE + EXTRA_TABLE, ids=lambda value: value)
def test_convert_c2_name(blob: str, expected: str) -> None:
    assert convert_c2_name(blob) == expected


def test_seed_table_has_at_least_twenty_pairs() -> None:
    assert len(SEED_TABLE) >= 20


def _blobs() -> dict[str, object]:
    return {
        "conv1_w": np.arange(6, dtype=np.float32).reshape(2, 3, 1, 1, 1),
        "res_conv1_bn_s": np.ones(2, dtype=np.float32),
        "res_conv1_bn_riv": np.full(2, 0.5, dtype=np.float64),
        "conv1_w_momentum": np.zeros((2, 3, 1, 1, 1), dtype=np.float32),
        "lr": np.array(0.1, dtype=np.float32),
        "model_iter": 12345,
    }


def test_convert_blobs_skips_training_state_and_drops_momentum() -> None:
    state = convert_c2_blobs(_blobs(), source="k400.pkl")
    assert list(state) == [
        "backbone.s1.pathway0_stem.conv.weight",
        "backbone.s1.pathway0_stem.bn.weight",
        "backbone.s1.pathway0_stem.bn.running_var",
    ]
    assert not any("momentum" in key for key in state)
    torch.testing.assert_close(state["backbone.s1.pathway0_stem.conv.weight"].flatten(), torch.arange(6.0))
    assert state["backbone.s1.pathway0_stem.bn.running_var"].dtype == torch.float64


def test_convert_blobs_copies_so_tensors_own_writable_memory() -> None:
    array = np.ones(3, dtype=np.float32)
    array.setflags(write=False)
    state = convert_c2_blobs({"pred_b": array}, source="k400.pkl")
    tensor = state["backbone.head.projection.bias"]
    tensor.add_(1)  # would fail or warn on a read-only view
    assert array[0] == 1.0
    assert tensor[0] == 2.0


def test_convert_blobs_handles_big_endian_arrays() -> None:
    array = np.arange(3, dtype=">f4")
    state = convert_c2_blobs({"pred_b": array}, source="k400.pkl")
    torch.testing.assert_close(state["backbone.head.projection.bias"], torch.arange(3.0))


@pytest.mark.parametrize("value", [np.float32(1.0), 7, 0.5, "text"], ids=["np_scalar", "int", "float", "str"])
def test_non_array_value_names_blob_and_file(value: object) -> None:
    with pytest.raises(CheckpointError, match=r"k400\.pkl.*'res2_0_branch2a_w'.*not a numpy array"):
        convert_c2_blobs({"res2_0_branch2a_w": value}, source="k400.pkl")


def test_zero_dim_array_is_an_array() -> None:
    state = convert_c2_blobs({"pred_b": np.array(3.0, dtype=np.float32)}, source="x.pkl")
    assert state["backbone.head.projection.bias"].shape == ()


def test_object_array_error_names_blob() -> None:
    with pytest.raises(CheckpointError, match="'pred_w'"):
        convert_c2_blobs({"pred_w": np.array([object()], dtype=object)}, source="x.pkl")


def test_two_blobs_converting_to_one_key_is_an_error() -> None:
    # conv1_* and res_conv1_* both become s1.pathway0_stem.conv.*.
    blobs = {"conv1_w": np.ones(1), "res_conv1_w": np.ones(1)}
    with pytest.raises(IncompatibleCheckpointError, match=r"'conv1_w' and 'res_conv1_w'.*s1\.pathway0_stem"):
        convert_c2_blobs(blobs, source="x.pkl")


def test_non_string_blob_name_is_an_error() -> None:
    with pytest.raises(CheckpointError, match="must be strings"):
        convert_c2_blobs({b"conv1_w": np.ones(1)}, source="x.pkl")  # type: ignore[dict-item]


def test_select_with_weight_map_reads_only_mapped_blobs() -> None:
    weight_map = {
        "backbone.conv1.weight": "conv1_w",
        "backbone.bn1.running_var": "res_conv1_bn_riv",
        "roi_heads.action.predictor.cls_score.weight": "pred_w",
    }
    state, absent = select_c2_blobs(_blobs(), weight_map, source="i3d.pkl")
    assert list(state) == ["backbone.conv1.weight", "backbone.bn1.running_var"]
    assert absent == ["pred_w"]


def test_select_rejects_mapped_non_array() -> None:
    with pytest.raises(CheckpointError, match="'model_iter'"):
        select_c2_blobs(_blobs(), {"iteration": "model_iter"}, source="i3d.pkl")
