"""Unit tests for the demo SlowFast model and its synthetic data stream.

The state-dict names are checked literally because STMixer's Caffe2 loader matches weights by
name: a test that only checked "the model runs" would pass on a model whose checkpoints nobody
else can load.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from stmixer_dist_ckpt.demo import (
    DemoModelConfig,
    SyntheticClipConfig,
    SyntheticClips,
    batch_for_iteration,
    build_demo_model,
    sample_indices,
    slow_from_fast,
)

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
R50_DEPTH = (3, 4, 6, 3)


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_demo_model().state_dict()


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{suffix}" for suffix in BN_SUFFIXES]


def test_stem_and_fuse_names_and_shapes(state_dict: dict[str, torch.Tensor]) -> None:
    expected_shapes = {
        "backbone.s1.pathway0_stem.conv.weight": (8, 3, 1, 7, 7),
        "backbone.s1.pathway1_stem.conv.weight": (2, 3, 5, 7, 7),
        "backbone.s1_fuse.conv_f2s.weight": (4, 2, 7, 1, 1),
        "backbone.s2_fuse.conv_f2s.weight": (16, 8, 7, 1, 1),
        "backbone.s4_fuse.conv_f2s.weight": (64, 32, 7, 1, 1),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state_dict[key].shape) == shape, key
    for prefix in ("backbone.s1.pathway0_stem.bn", "backbone.s1.pathway1_stem.bn"):
        assert all(k in state_dict for k in _bn(prefix))
    for k in range(1, 5):
        assert f"backbone.s{k}_fuse.conv_f2s.weight" in state_dict
        assert all(key in state_dict for key in _bn(f"backbone.s{k}_fuse.bn"))
    # SlowFast fuses only into s2..s5, so there is nothing after the last stage.
    assert not any(key.startswith("backbone.s5_fuse") for key in state_dict)


def test_first_block_of_s2_in_both_pathways(state_dict: dict[str, torch.Tensor]) -> None:
    expected_shapes = {
        # Slow input is 8 stem channels + 4 fused from the fast pathway.
        "backbone.s2.pathway0_res0.branch1.weight": (32, 12, 1, 1, 1),
        "backbone.s2.pathway0_res0.branch2.a.weight": (8, 12, 1, 1, 1),
        "backbone.s2.pathway0_res0.branch2.b.weight": (8, 8, 1, 3, 3),
        "backbone.s2.pathway0_res0.branch2.c.weight": (32, 8, 1, 1, 1),
        "backbone.s2.pathway1_res0.branch1.weight": (8, 2, 1, 1, 1),
        "backbone.s2.pathway1_res0.branch2.a.weight": (2, 2, 3, 1, 1),
        "backbone.s2.pathway1_res0.branch2.b.weight": (2, 2, 1, 3, 3),
        "backbone.s2.pathway1_res0.branch2.c.weight": (8, 2, 1, 1, 1),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state_dict[key].shape) == shape, key
    for pathway in (0, 1):
        block = f"backbone.s2.pathway{pathway}_res0"
        for bn in ("branch1_bn", "branch2.a_bn", "branch2.b_bn", "branch2.c_bn"):
            assert all(key in state_dict for key in _bn(f"{block}.{bn}")), bn


def test_temporal_kernels_follow_slowfast(state_dict: dict[str, torch.Tensor]) -> None:
    # Slow pathway: frame-wise in s2/s3, temporal 3 in s4/s5; fast pathway: 3 everywhere.
    for stage, slow_t in ((2, 1), (3, 1), (4, 3), (5, 3)):
        assert state_dict[f"backbone.s{stage}.pathway0_res0.branch2.a.weight"].shape[2] == slow_t
        assert state_dict[f"backbone.s{stage}.pathway1_res0.branch2.a.weight"].shape[2] == 3


def test_blocks_per_stage_and_branch1_only_on_res0(state_dict: dict[str, torch.Tensor]) -> None:
    block_re = re.compile(r"^backbone\.s(\d)\.pathway(\d)_res(\d+)\.")
    blocks = {tuple(int(g) for g in m.groups()) for key in state_dict if (m := block_re.match(key))}
    expected = {
        (s, p, i) for s, d in zip(range(2, 6), R50_DEPTH, strict=True) for p in (0, 1) for i in range(d)
    }
    assert blocks == expected
    for stage, pathway, i in expected:
        key = f"backbone.s{stage}.pathway{pathway}_res{i}.branch1.weight"
        assert (key in state_dict) == (i == 0), key
        assert f"backbone.s{stage}.pathway{pathway}_res{i}.branch2.c_bn.running_var" in state_dict
    assert "backbone.s3.pathway1_res3.branch2.c_bn.running_var" in state_dict


def test_default_nonlocal_block(state_dict: dict[str, torch.Tensor]) -> None:
    nonlocal_keys = [key for key in state_dict if "nonlocal" in key]
    prefix = "backbone.s3.pathway0_nonlocal1"
    expected = [f"{prefix}.conv_{n}.{p}" for n in ("theta", "phi", "g", "out") for p in ("weight", "bias")]
    assert sorted(nonlocal_keys) == sorted(expected + _bn(f"{prefix}.bn"))
    assert tuple(state_dict[f"{prefix}.conv_theta.weight"].shape) == (32, 64, 1, 1, 1)


def test_nonlocal_locations_are_configurable() -> None:
    config = DemoModelConfig(depth=(2, 2, 3, 2), nonlocal_locations=((0,), (), (1, 2), ()))
    keys = build_demo_model(config).state_dict()
    found = {key.split(".")[1] + "." + key.split(".")[2] for key in keys if "nonlocal" in key}
    assert found == {"s2.pathway0_nonlocal0", "s4.pathway0_nonlocal1", "s4.pathway0_nonlocal2"}
    none = DemoModelConfig(nonlocal_locations=((), (), (), ()))
    assert not any("nonlocal" in key for key in build_demo_model(none).state_dict())


def test_only_nonlocal_and_head_have_biases(state_dict: dict[str, torch.Tensor]) -> None:
    for key in state_dict:
        if key.endswith(".bias"):
            assert ".bn" in key or "_bn." in key or "nonlocal" in key or key.startswith("stm_head."), key


def test_head_names(state_dict: dict[str, torch.Tensor]) -> None:
    head = {key: tuple(v.shape) for key, v in state_dict.items() if key.startswith("stm_head.")}
    assert head == {
        "stm_head.fc1.weight": (128, 320),
        "stm_head.fc1.bias": (128,),
        "stm_head.cls.weight": (81, 128),
        "stm_head.cls.bias": (81,),
    }
    assert all(key.startswith(("backbone.", "stm_head.")) for key in state_dict)


@pytest.mark.parametrize("num_classes", [81, 4])
def test_forward_shape(num_classes: int) -> None:
    torch.manual_seed(0)
    model = build_demo_model(DemoModelConfig(num_classes=num_classes))
    (slow, fast), _ = batch_for_iteration(
        0, 0, 1, 2, seed=0, config=SyntheticClipConfig(num_classes=num_classes)
    )
    assert slow.shape == (2, 3, 2, 32, 32) and fast.shape == (2, 3, 8, 32, 32)
    logits = model(slow, fast)
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()


def test_forward_rejects_unpaired_clips() -> None:
    model = build_demo_model(DemoModelConfig(num_classes=4))
    fast = torch.randn(1, 3, 8, 32, 32)
    with pytest.raises(ValueError, match="alpha"):
        model(fast[:, :, :4], fast)
    with pytest.raises(ValueError, match="do not pair"):
        model(slow_from_fast(fast, 4)[0], fast)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 0},
        {"depth": (3, 4, 6)},
        {"width_per_group": 6, "beta_inv": 4},
        {"fusion_kernel_size": 6},
        {"nonlocal_locations": ((), (4,), (), ())},
        {"nonlocal_locations": ((), ())},
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="DemoModelConfig"):
        DemoModelConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_training_steps_lower_the_loss(optimizer_name: str) -> None:
    torch.manual_seed(0)
    model = build_demo_model(DemoModelConfig(num_classes=4))
    clips = SyntheticClipConfig(num_classes=4)
    if optimizer_name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # Held-out samples from another seed: a falling loss here means the label is learnable from
    # the clip, not that a single batch was memorised.
    (eval_slow, eval_fast), eval_labels = batch_for_iteration(0, 0, 1, 16, seed=1, config=clips)

    def eval_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model(eval_slow, eval_fast), eval_labels).item()

    before = eval_loss()
    for iteration in range(12):
        (slow, fast), labels = batch_for_iteration(iteration, 0, 1, 8, seed=0, config=clips)
        loss = F.cross_entropy(model(slow, fast), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert after < 0.75 * before, (before, after)


def test_batch_for_iteration_is_deterministic() -> None:
    clips = SyntheticClipConfig(num_classes=4)
    (slow_a, fast_a), labels_a = batch_for_iteration(5, 1, 2, 8, seed=3, config=clips)
    (slow_b, fast_b), labels_b = batch_for_iteration(5, 1, 2, 8, seed=3, config=clips)
    assert torch.equal(fast_a, fast_b) and torch.equal(slow_a, slow_b) and torch.equal(labels_a, labels_b)
    assert torch.equal(slow_a, fast_a[:, :, ::4])
    (_, fast_next), _ = batch_for_iteration(6, 1, 2, 8, seed=3, config=clips)
    (_, fast_seed), _ = batch_for_iteration(5, 1, 2, 8, seed=4, config=clips)
    assert not torch.equal(fast_a, fast_next) and not torch.equal(fast_a, fast_seed)


@pytest.mark.parametrize("world_size", [1, 2, 4], ids=["ws1", "ws2", "ws4"])
def test_rank_slices_union_is_the_global_batch(world_size: int) -> None:
    clips = SyntheticClipConfig(num_classes=4, height=16, width=16)
    (_, global_fast), global_labels = batch_for_iteration(3, 0, 1, 8, seed=0, config=clips)
    parts = [batch_for_iteration(3, rank, world_size, 8, seed=0, config=clips) for rank in range(world_size)]
    assert all(labels.shape == (8 // world_size,) for _, labels in parts)
    assert torch.equal(torch.cat([fast for (_, fast), _ in parts]), global_fast)
    assert torch.equal(torch.cat([labels for _, labels in parts]), global_labels)
    indices = [i for rank in range(world_size) for i in sample_indices(3, rank, world_size, 8)]
    assert indices == list(range(24, 32))


def test_dataset_matches_the_stream() -> None:
    clips = SyntheticClipConfig(num_classes=4, height=16, width=16)
    dataset = SyntheticClips(16, clips, seed=2)
    assert len(dataset) == 16
    (slow, fast), labels = batch_for_iteration(1, 0, 1, 8, seed=2, config=clips)
    (item_slow, item_fast), item_label = dataset[10]
    assert torch.equal(item_fast, fast[2]) and torch.equal(item_slow, slow[2]) and item_label == labels[2]
    assert set(labels.tolist()) <= set(range(4))
    with pytest.raises(IndexError):
        dataset[16]


@pytest.mark.parametrize(
    ("iteration", "rank", "world_size", "batch_size"),
    [(-1, 0, 1, 8), (0, 2, 2, 8), (0, 0, 0, 8), (0, 0, 3, 8)],
)
def test_sample_indices_rejects_bad_splits(
    iteration: int, rank: int, world_size: int, batch_size: int
) -> None:
    with pytest.raises(ValueError):
        sample_indices(iteration, rank, world_size, batch_size)
