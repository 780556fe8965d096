"""Loading upstream single-file ``.pth`` checkpoints (seed_semantics §4.2, §7, §10.8, §10.9)."""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import sys
import types
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from stmixer_dist_ckpt.errors import CheckpointError, CheckpointNotFoundError, UnsafeCheckpointError
from stmixer_dist_ckpt.legacy.key_matching import match_state_dict
from stmixer_dist_ckpt.legacy.legacy_file import is_torch_zip, load_legacy_checkpoint
from stmixer_dist_ckpt.memory_pool import MemoryPool

_ALPHACTION_MODULES = ("alphaction", "alphaction.structures", "alphaction.structures.memory_pool")


@contextlib.contextmanager
def fake_alphaction() -> Iterator[type]:
    """Install a stand-in ``alphaction.structures.memory_pool`` just long enough to pickle with it.

    pickle stores a class by module and name, so an object of this class is
    written exactly as AlphAction's own ``MemoryPool`` was.
    """
    previous = {name: sys.modules.get(name) for name in _ALPHACTION_MODULES}
    modules = [types.ModuleType(name) for name in _ALPHACTION_MODULES]

    class LegacyMemoryPool:
        def __init__(self) -> None:
            self.cache: defaultdict[Any, dict[Any, Any]] = defaultdict(dict)

    LegacyMemoryPool.__module__ = _ALPHACTION_MODULES[-1]
    LegacyMemoryPool.__name__ = LegacyMemoryPool.__qualname__ = "MemoryPool"
    modules[2].MemoryPool = LegacyMemoryPool  # type: ignore[attr-defined]
    modules[0].structures = modules[1]  # type: ignore[attr-defined]
    modules[1].memory_pool = modules[2]  # type: ignore[attr-defined]
    sys.modules.update(zip(_ALPHACTION_MODULES, modules, strict=True))
    try:
        yield LegacyMemoryPool
    finally:
        for name, module in previous.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 1)
        self.bn = nn.BatchNorm3d(4)
        self.submodule = nn.Linear(4, 2)


class Wrapper(nn.Module):
    """Gives state dict keys the ``module.`` prefix DDP adds."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


class Trusted:
    """A class a user might pickle into a checkpoint; not on the allow list."""

    def __init__(self, value: int) -> None:
        self.value = value


def _upstream_checkpoint(pool: Any) -> dict[str, Any]:
    """What STMixer's trainer saved every CHECKPOINT_PERIOD under DDP."""
    model = Wrapper(Net())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    # MultiStepLR keeps its milestones in a collections.Counter: one more global to allow.
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[5, 8])
    scheduler_state = {key: value for key, value in scheduler.__dict__.items() if key != "optimizer"}
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler_state,
        "iteration": 11524,
        "person_pool": pool,
    }


def test_upstream_checkpoint_with_alphaction_memory_pool(tmp_path: Path) -> None:
    path = tmp_path / "model_0011524.pth"
    with fake_alphaction() as legacy_pool_class:
        pool = legacy_pool_class()
        pool.cache["movie_a"][902] = torch.arange(3.0)
        pool.cache["movie_b"][905] = [1, 2]
        torch.save(_upstream_checkpoint(pool), path)
    assert "alphaction" not in sys.modules
    raw = path.read_bytes()
    assert b"alphaction.structures.memory_pool" in raw
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # why safe_torch_load exists (torch >= 2.6)

    checkpoint = load_legacy_checkpoint(path, source=str(path))

    assert set(checkpoint) == {"model", "optimizer", "scheduler", "iteration", "person_pool"}
    assert checkpoint["iteration"] == 11524
    restored = checkpoint["person_pool"]
    assert isinstance(restored, MemoryPool)
    torch.testing.assert_close(restored["movie_a", 902], torch.arange(3.0))
    assert restored["movie_b", 905] == [1, 2]
    assert checkpoint["scheduler"]["last_epoch"] == 0
    assert checkpoint["optimizer"]["param_groups"][0]["momentum"] == 0.9
    assert all(key.startswith("module.") for key in checkpoint["model"])
    assert "alphaction" not in sys.modules


def test_module_prefixed_keys_load_into_plain_model(tmp_path: Path) -> None:
    saved = Wrapper(Net())
    path = tmp_path / "ddp.pth"
    torch.save({"model": saved.state_dict(), "iteration": 3}, path)
    assert "module.submodule.weight" in saved.state_dict()

    checkpoint = load_legacy_checkpoint(str(path), source="ddp.pth")
    target = Net()
    state, report = match_state_dict(
        {key: value.shape for key, value in target.state_dict().items()}, checkpoint["model"]
    )
    target.load_state_dict(state)

    assert report.is_clean and report.stripped_prefix == "module."
    assert report.loaded["submodule.weight"] == "submodule.weight"
    torch.testing.assert_close(target.submodule.weight, saved.module.submodule.weight)


def test_bare_state_dict_is_wrapped(tmp_path: Path) -> None:
    net = Net()
    path = tmp_path / "bare.pth"
    torch.save(net.state_dict(), path)
    checkpoint = load_legacy_checkpoint(path, source="bare.pth")
    assert list(checkpoint) == ["model"]
    assert list(checkpoint["model"]) == list(net.state_dict())


def test_module_key_goes_under_backbone_and_drops_training_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "vit_b_k400.pth"
    weights = {"patch_embed.proj.weight": torch.ones(2), "blocks.0.norm1.bias": torch.zeros(2)}
    torch.save({"module": weights, "global_steps": 800, "optimizer": {"state": {}}}, path)
    with caplog.at_level(logging.INFO, logger="stmixer_dist_ckpt.legacy.legacy_file"):
        checkpoint = load_legacy_checkpoint(path, source="vit_b_k400.pth")
    assert list(checkpoint) == ["model"]
    assert list(checkpoint["model"]) == ["backbone.patch_embed.proj.weight", "backbone.blocks.0.norm1.bias"]
    torch.testing.assert_close(checkpoint["model"]["backbone.patch_embed.proj.weight"], torch.ones(2))
    assert "global_steps" in caplog.text


def test_module_key_already_prefixed_is_not_prefixed_twice(tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pth"
    weights = {"backbone.blocks.0.norm1.bias": torch.zeros(2), "stm_head.cls.weight": torch.ones(2)}
    torch.save({"module": weights}, path)
    checkpoint = load_legacy_checkpoint(path, source="whole_model.pth")
    assert list(checkpoint["model"]) == ["backbone.blocks.0.norm1.bias", "stm_head.cls.weight"]


def test_neither_model_nor_module_names_file_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "odd.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}, path)
    with pytest.raises(CheckpointError, match=r"odd\.pth: cannot find model weights.*'state_dict', 'epoch'"):
        load_legacy_checkpoint(path, source="odd.pth")


@pytest.mark.parametrize(
    ("data", "message"),
    [({}, "empty dict"), ([torch.zeros(1)], "found list"), ({"model": 3}, "'model' holds a int")],
    ids=["empty", "list", "model_not_dict"],
)
def test_wrong_shapes_of_file(tmp_path: Path, data: Any, message: str) -> None:
    path = tmp_path / "x.pth"
    torch.save(data, path)
    with pytest.raises(CheckpointError, match=message):
        load_legacy_checkpoint(path, source="x.pth")


def test_malicious_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str, str]]:
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth: refusing to unpickle"):
        load_legacy_checkpoint(path, source="evil.pth")
    assert not marker.exists()


def test_unknown_class_needs_opt_in(tmp_path: Path) -> None:
    path = tmp_path / "custom.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "stats": Trusted(5)}, path)
    with pytest.raises(UnsafeCheckpointError, match="Trusted"):
        load_legacy_checkpoint(path, source="custom.pth")
    checkpoint = load_legacy_checkpoint(path, source="custom.pth", allow_unsafe_pickle=True)
    assert checkpoint["stats"].value == 5


def test_stream_input_and_zip_sniff(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.ones(1)}}, buffer)
    buffer.seek(0)
    assert is_torch_zip(buffer) and buffer.tell() == 0
    assert list(load_legacy_checkpoint(buffer, source="<buffer>")["model"]) == ["w"]

    pkl = tmp_path / "w.pkl"
    pkl.write_bytes(pickle.dumps({"blobs": {}}, protocol=2))
    assert not is_torch_zip(pkl)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match=r"nope\.pth"):
        load_legacy_checkpoint(tmp_path / "nope.pth", source="nope.pth")


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b""], ids=["garbage", "empty_file"])
def test_unreadable_file_is_a_checkpoint_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"bad\.pth: not a readable torch checkpoint"):
        load_legacy_checkpoint(path, source="bad.pth")
