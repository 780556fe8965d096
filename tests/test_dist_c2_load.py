"""Caffe2 ``.pkl`` weights read on rank 0 only and delivered to 1, 2 and 4 DDP/FSDP2 ranks.

The ``.pkl`` is built here from the demo model's state dict by inverting
STMixer's rename rules, so it carries the real SlowFast-R50 blob names
(``res4_5_branch2c_bn_riv``, ``t_res2_2_branch2c_bn_subsample_w``,
``nonlocal_conv3_1_theta_w``, ...) with the demo model's shapes, plus what real
files carry besides weights: ``lr``, ``model_iter``, ``*_momentum`` and a
400-class ``pred_w``/``pred_b``.

"No rank other than 0 opened the file" is checked two ways, because each alone
has a gap. (1) Every rank installs a ``sys.addaudithook`` hook before loading
and records each ``open`` event naming the file; CPython raises that event
from ``open``, ``io.open``, ``os.open`` and every ``FileIO``, which is how
fsspec's local filesystem and our readers open files, so any Python-level read
shows up. Rank 0's record must be non-empty, which proves the hook works. (2)
A second load reads from ``memory://``: fsspec's memory filesystem lives inside
one process, and only rank 0 puts the file there, so another rank could not
read it even by a path the hook misses; its weights can only have come over
the process group.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from stmixer_dist_ckpt import ActionCheckpointer, LoadReport, LoadResult, MemoryPool
from stmixer_dist_ckpt.action_checkpointer import C2LoadReport
from stmixer_dist_ckpt.demo import DemoModelConfig, build_demo_model
from stmixer_dist_ckpt.legacy.c2_names import convert_c2_name

from ._dist import run_distributed

# --------------------------------------------------------- synthetic .pkl
_BN = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}
_PARAM = {"weight": "w", "bias": "b"}
SEED = 7


def c2_blob_name(model_key: str, depth: tuple[int, ...]) -> str | None:
    """The Caffe2 blob a SlowFast checkpoint stores ``model_key`` under (``None``: not stored)."""
    if not model_key.startswith("backbone.") or model_key.endswith(".num_batches_tracked"):
        return None
    key = model_key.removeprefix("backbone.")

    def t(pathway: str) -> str:
        return "t_" if pathway == "1" else ""

    if m := re.fullmatch(r"s1\.pathway([01])_stem\.conv\.weight", key):
        return f"{t(m[1])}conv1_w"
    if m := re.fullmatch(r"s1\.pathway([01])_stem\.bn\.(\w+)", key):
        return f"{t(m[1])}res_conv1_bn_{_BN[m[2]]}"
    if m := re.fullmatch(r"s(\d)_fuse\.(conv_f2s|bn)\.(\w+)", key):
        stage = int(m[1])  # Caffe2 names the fusion after the fast pathway's last block of the stage
        base = (
            "t_pool1_subsample"
            if stage == 1
            else f"t_res{stage}_{depth[stage - 2] - 1}_branch2c_bn_subsample"
        )
        return f"{base}_w" if m[2] == "conv_f2s" else f"{base}_bn_{_BN[m[3]]}"
    if m := re.fullmatch(r"s(\d)\.pathway([01])_res(\d+)\.branch1\.weight", key):
        return f"{t(m[2])}res{m[1]}_{m[3]}_branch1_w"
    if m := re.fullmatch(r"s(\d)\.pathway([01])_res(\d+)\.branch1_bn\.(\w+)", key):
        return f"{t(m[2])}res{m[1]}_{m[3]}_branch1_bn_{_BN[m[4]]}"
    if m := re.fullmatch(r"s(\d)\.pathway([01])_res(\d+)\.branch2\.([abc])\.weight", key):
        return f"{t(m[2])}res{m[1]}_{m[3]}_branch2{m[4]}_w"
    if m := re.fullmatch(r"s(\d)\.pathway([01])_res(\d+)\.branch2\.([abc])_bn\.(\w+)", key):
        return f"{t(m[2])}res{m[1]}_{m[3]}_branch2{m[4]}_bn_{_BN[m[5]]}"
    if m := re.fullmatch(r"s(\d)\.pathway0_nonlocal(\d+)\.conv_(theta|phi|g|out)\.(weight|bias)", key):
        return f"nonlocal_conv{m[1]}_{m[2]}_{m[3]}_{_PARAM[m[4]]}"
    if m := re.fullmatch(r"s(\d)\.pathway0_nonlocal(\d+)\.bn\.(\w+)", key):
        return f"nonlocal_conv{m[1]}_{m[2]}_bn_{_BN[m[3]]}"
    raise AssertionError(f"no Caffe2 name known for {model_key}")


def c2_names_for(config: DemoModelConfig) -> dict[str, str]:
    """Model key -> blob name for every backbone tensor a Caffe2 file holds."""
    names: dict[str, str] = {}
    for key in build_demo_model(config).state_dict():
        blob = c2_blob_name(key, config.depth)
        if blob is not None:
            names[key] = blob
    return names


def make_c2_blobs(config: DemoModelConfig, seed: int = SEED, *, head: bool = True) -> dict[str, Any]:
    """Blob dict as the Caffe2 video trainer saved it: weights, momentum, ``lr``, ``model_iter``."""
    rng = np.random.default_rng(seed)
    shapes = {k: tuple(v.shape) for k, v in build_demo_model(config).state_dict().items()}
    blobs: dict[str, Any] = {}
    for key, blob in c2_names_for(config).items():
        value = rng.standard_normal(shapes[key]).astype(np.float32)
        blobs[blob] = np.abs(value) + 0.5 if blob.endswith("_riv") else value
        if not blob.endswith(("_rm", "_riv")):
            blobs[f"{blob}_momentum"] = np.zeros(shapes[key], np.float32)
    if head:
        dim = sum(build_demo_model(config).backbone.dims_out)
        blobs["pred_w"] = rng.standard_normal((400, dim)).astype(np.float32)
        blobs["pred_b"] = rng.standard_normal(400).astype(np.float32)
    blobs["lr"] = np.array(0.01, np.float32)
    blobs["model_iter"] = 196000
    return blobs


def report_of(result: LoadResult) -> LoadReport:
    assert isinstance(result.report, LoadReport)
    return result.report


def c2_report_of(result: LoadResult) -> C2LoadReport:
    assert isinstance(result.report, C2LoadReport)
    return result.report


def expected_weights(config: DemoModelConfig, blobs: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(blobs[blob]) for key, blob in c2_names_for(config).items()}


def c2_pickle_bytes(blobs: dict[str, Any], *, wrap: bool = True) -> bytes:
    return pickle.dumps({"blobs": blobs} if wrap else blobs, protocol=2)  # protocol 2: Python 2's highest


class _I3DStem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, 4, (1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(4)


class _Predictor(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(4, num_classes)


class _ActionHead(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.predictor = _Predictor(num_classes)


class _RoiHeads(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.action = _ActionHead(num_classes)


class AlphActionStyle(nn.Module):
    """An I3D stem plus an ``roi_heads`` classifier that names its own Caffe2 blobs, as AlphAction did."""

    def __init__(self, num_classes: int = 80) -> None:
        super().__init__()
        self.backbone = _I3DStem()
        self.roi_heads = _RoiHeads(num_classes)

    def c2_weight_mapping(self) -> dict[str, str]:
        mapping = {"backbone.conv1.weight": "conv1_w"}
        mapping.update({f"backbone.bn1.{name}": f"res_conv1_bn_{blob}" for name, blob in _BN.items()})
        mapping.update({f"roi_heads.action.predictor.cls_score.{n}": f"pred_{b}" for n, b in _PARAM.items()})
        return mapping


def alphaction_blobs(seed: int = SEED) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    blobs = {"conv1_w": rng.standard_normal((4, 3, 1, 3, 3)).astype(np.float32)}
    blobs.update({f"res_conv1_bn_{b}": rng.random(4).astype(np.float32) + 0.5 for b in _BN.values()})
    blobs["pred_w"] = rng.standard_normal((400, 4)).astype(np.float32)  # Kinetics-400 head
    blobs["pred_b"] = rng.standard_normal(400).astype(np.float32)
    return blobs


def test_synthetic_names_are_real_slowfast_r50_blobs() -> None:
    config = DemoModelConfig()
    names = c2_names_for(config)
    for key, blob in names.items():
        assert convert_c2_name(blob) == key, f"{blob} does not convert back to {key}"
    real = {
        "conv1_w", "t_conv1_w", "res_conv1_bn_riv", "res2_0_branch1_w", "res2_0_branch2a_bn_rm",
        "res3_3_branch2c_bn_s", "res4_5_branch2c_w", "res5_2_branch2c_bn_riv", "t_res2_0_branch2a_w",
        "t_pool1_subsample_w", "t_pool1_subsample_bn_rm", "t_res2_2_branch2c_bn_subsample_w",
        "t_res4_5_branch2c_bn_subsample_bn_riv", "nonlocal_conv3_1_theta_w", "nonlocal_conv3_1_bn_s",
    }  # fmt: skip
    assert real <= set(names.values())
    assert len(names) == len(set(names.values()))


# ------------------------------------------------------------- rank bodies
def _wrap(model: nn.Module, parallel: str) -> nn.Module:
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    return model


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # type: ignore[return-value]


def _load_c2(
    rank: int, world: int, pkl_path: str, depth: tuple[int, ...], check_memory: bool
) -> dict[str, Any]:
    watched = os.path.basename(pkl_path)
    opened: list[str] = []

    def audit(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes)) and watched in os.fsdecode(args[0]):
            opened.append(os.fsdecode(args[0]))

    config = DemoModelConfig(depth=depth)  # type: ignore[arg-type]
    blobs = make_c2_blobs(config)  # regenerated from the seed: expected values without touching the file
    expected = expected_weights(config, blobs)
    sys.addaudithook(audit)
    sources = [("local", pkl_path)]
    if check_memory:
        import fsspec

        if rank == 0:  # the file exists in rank 0's process only
            fsspec.filesystem("memory").pipe("/c2/weights.pkl", c2_pickle_bytes(blobs))
            fsspec.filesystem("memory").pipe("/c2/alphaction.pkl", c2_pickle_bytes(alphaction_blobs()))
        sources.append(("memory", "memory://c2/weights.pkl"))
    outcome: dict[str, Any] = {"opened": opened, "checks": {}}
    for label, url in sources:
        for parallel in ("ddp", "fsdp2") if label == "local" else ("ddp",):
            torch.manual_seed(100 + rank)  # every rank starts from other values than the file's
            model = _wrap(build_demo_model(config), parallel)
            before = _full_state(model)
            extras = ActionCheckpointer(None, model).load(url)
            full = _full_state(model)
            report = c2_report_of(extras)
            check = {
                "extras": dict(extras),
                "wrong": [k for k, v in expected.items() if not torch.equal(full[k], v)],
                "head_kept": all(torch.equal(full[k], before[k]) for k in full if k.startswith("stm_head.")),
                "counters_kept": all(torch.equal(full[k], before[k]) for k in full if k.endswith("tracked")),
                "missing": report.missing,
                "unexpected": report.unexpected,
                "expected_missing": len(report.expected_missing),
                "sharded": [
                    k
                    for k, p in model.named_parameters()
                    if isinstance(p, DTensor) and p.to_local().numel() < p.numel()
                ],
            }
            outcome["checks"][f"{label}-{parallel}"] = check
    transfer = ActionCheckpointer({"MODEL": {"WEIGHT": pkl_path}}, _wrap(build_demo_model(config), "ddp"))
    extras = transfer.load(pkl_path, model_weight_only=True)
    outcome["transfer"] = (extras["iteration"], extras["person_pool"] == MemoryPool())
    if check_memory:  # AlphAction-style model under DDP: the map is found through .module
        torch.manual_seed(100 + rank)
        inner = AlphActionStyle()
        extras = ActionCheckpointer(None, _wrap(inner, "ddp")).load(
            "memory://c2/alphaction.pkl", no_head=True
        )
        outcome["alphaction"] = (
            torch.equal(inner.backbone.conv1.weight, torch.from_numpy(alphaction_blobs()["conv1_w"])),
            report_of(extras).head_skipped,
        )
        # A legacy .pth (DDP-saved keys, upstream extras) takes the same rank-0-only path.
        torch.manual_seed(5)
        source = AlphActionStyle()
        if rank == 0:
            buffer = io.BytesIO()
            state = {f"module.{k}": v for k, v in source.state_dict().items()}
            torch.save({"model": state, "iteration": 42}, buffer)
            fsspec.filesystem("memory").pipe("/c2/model_0000042.pth", buffer.getvalue())
        torch.manual_seed(100 + rank)
        target = AlphActionStyle()
        extras = ActionCheckpointer(None, _wrap(target, "ddp")).load("memory://c2/model_0000042.pth")
        outcome["legacy_pth"] = (
            dict(extras),
            all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items()),
        )
    return outcome


@pytest.mark.dist
@pytest.mark.parametrize(
    ("world", "depth", "check_memory"),
    [
        pytest.param(1, (3, 4, 6, 3), False, id="ws1"),
        pytest.param(2, (3, 4, 6, 3), True, id="ws2"),
        pytest.param(4, (2, 2, 2, 2), False, id="ws4", marks=pytest.mark.xdist_group("ws4")),
    ],
)
def test_c2_pkl_read_on_rank0_reaches_every_rank(
    tmp_path: Path, world: int, depth: tuple[int, ...], check_memory: bool
) -> None:
    config = DemoModelConfig(depth=depth)  # type: ignore[arg-type]
    path = tmp_path / "SLOWFAST_8x8_R50_synthetic.pkl"
    path.write_bytes(c2_pickle_bytes(make_c2_blobs(config)))
    outcomes = run_distributed(_load_c2, world, tmp_path, str(path), depth, check_memory)

    assert outcomes[0]["opened"], "rank 0 opened nothing: the audit hook is not seeing opens"
    for rank, outcome in enumerate(outcomes):
        if rank:
            assert outcome["opened"] == [], f"rank {rank} opened {outcome['opened']}"
        assert outcome["transfer"] == (0, True)
        for label, check in outcome["checks"].items():
            where = f"rank {rank} {label}"
            assert check["extras"] == {}, where
            assert check["wrong"] == [], f"{where}: values differ from the blobs for {check['wrong'][:5]}"
            assert check["head_kept"] and check["counters_kept"], where
            assert sorted(check["missing"]) == sorted(
                f"stm_head.{m}.{p}" for m in ("fc1", "cls") for p in ("weight", "bias")
            ), where
            assert sorted(check["unexpected"]) == [
                "backbone.head.projection.bias",
                "backbone.head.projection.weight",
            ]
            assert check["expected_missing"] > 50, where  # one per BatchNorm, none counted as missing
            if label.endswith("fsdp2") and world > 1:
                assert check["sharded"], f"{where}: no parameter is sharded, so FSDP2 was not exercised"
        if check_memory:
            conv_ok, head_skipped = outcome["alphaction"]
            assert conv_ok, f"rank {rank}: AlphAction weights not delivered"
            assert head_skipped == [
                "roi_heads.action.predictor.cls_score.bias",
                "roi_heads.action.predictor.cls_score.weight",
            ]
            assert outcome["legacy_pth"] == ({"iteration": 42}, True), (
                f"rank {rank}: legacy .pth not delivered"
            )
