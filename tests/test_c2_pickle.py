"""Reading Caffe2/Detectron ``.pkl`` weight files (seed_semantics §6.1, §6.7, §10.7)."""

from __future__ import annotations

import io
import logging
import pickle
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from stmixer_dist_ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    IncompatibleCheckpointError,
    UnsafeCheckpointError,
)
from stmixer_dist_ckpt.legacy.c2_pickle import load_c2_state_dict, read_c2_pickle


def _blobs() -> dict[str, Any]:
    """A toy SlowFast stem: weights, BN stats, plus the training state files carry."""
    return {
        "conv1_w": np.arange(24, dtype=np.float32).reshape(2, 3, 1, 2, 2),
        "res_conv1_bn_s": np.ones(2, dtype=np.float32),
        "res_conv1_bn_b": np.zeros(2, dtype=np.float32),
        "res_conv1_bn_rm": np.full(2, 0.25, dtype=np.float32),
        "res_conv1_bn_riv": np.full(2, 4.0, dtype=np.float32),
        "conv1_w_momentum": np.zeros((2, 3, 1, 2, 2), dtype=np.float32),
        "pred_w": np.ones((400, 2), dtype=np.float32),
        "lr": np.array(0.01, dtype=np.float32),
        "model_iter": 196000,
    }


STEM_KEYS = [
    "backbone.s1.pathway0_stem.conv.weight",
    "backbone.s1.pathway0_stem.bn.weight",
    "backbone.s1.pathway0_stem.bn.bias",
    "backbone.s1.pathway0_stem.bn.running_mean",
    "backbone.s1.pathway0_stem.bn.running_var",
    "backbone.head.projection.weight",
]


def _write_pickle(path: Path, obj: Any) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    """Writes byte and text strings as Python 2 ``str`` (BINSTRING opcodes).

    That is what the Caffe2 trainer's Python 2 produced: reading the array
    bytes back needs ``encoding="latin1"``.
    """

    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes | str) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def _py2_pickle(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    # Python 2 numpy lived at numpy.core; numpy 2 reduces to numpy._core.
    return buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


@pytest.mark.parametrize("wrapped", [True, False], ids=["blobs_key", "flat_dict"])
def test_load_with_and_without_blobs_key(tmp_path: Path, wrapped: bool) -> None:
    data = {"blobs": _blobs()} if wrapped else _blobs()
    path = _write_pickle(tmp_path / "SLOWFAST_4x16_R50.pkl", data)

    state = load_c2_state_dict(str(path), source=str(path))

    assert list(state) == STEM_KEYS
    torch.testing.assert_close(
        state["backbone.s1.pathway0_stem.conv.weight"], torch.arange(24.0).reshape(2, 3, 1, 2, 2)
    )
    assert all(not key.endswith("momentum") for key in state)


def test_read_returns_raw_blobs(tmp_path: Path) -> None:
    path = _write_pickle(tmp_path / "w.pkl", {"blobs": _blobs()})
    blobs = read_c2_pickle(path, source="w.pkl")
    assert set(blobs) == set(_blobs())
    assert blobs["model_iter"] == 196000


def test_python2_style_pickle_needs_latin1_and_loads(tmp_path: Path) -> None:
    raw = _py2_pickle({"blobs": {"res_conv1_bn_s": np.ones(2, dtype=np.float32), "model_iter": 7}})
    assert b"_codecs" not in raw and pickle.SHORT_BINSTRING in raw
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(raw)  # the array bytes (0x80) are not ASCII: the reason for latin1
    path = tmp_path / "py2.pkl"
    path.write_bytes(raw)

    state = load_c2_state_dict(path, source="py2.pkl")

    torch.testing.assert_close(state["backbone.s1.pathway0_stem.bn.weight"], torch.ones(2))


def test_stream_input_keeps_working(tmp_path: Path) -> None:
    stream = io.BytesIO(pickle.dumps({"blobs": _blobs()}, protocol=2))
    assert list(load_c2_state_dict(stream, source="stream.pkl")) == STEM_KEYS


def test_non_seekable_stream(tmp_path: Path) -> None:
    class Pipe(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._inner = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            chunk = self._inner.read(len(buffer))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    pipe = io.BufferedReader(Pipe(pickle.dumps(_blobs(), protocol=2)))
    assert not pipe.seekable()
    assert list(load_c2_state_dict(pipe, source="pipe")) == STEM_KEYS


def test_weight_map_picks_only_mapped_blobs_and_logs_absent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write_pickle(tmp_path / "I3D.pkl", {"blobs": _blobs()})
    weight_map = {
        "backbone.conv1.weight": "conv1_w",
        "backbone.bn1.running_var": "res_conv1_bn_riv",
        "backbone.res_nl1.res_0.btnk.conv1.conv.weight": "res2_0_branch2a_w",
    }
    with caplog.at_level(logging.INFO, logger="stmixer_dist_ckpt.legacy.c2_pickle"):
        state = load_c2_state_dict(path, source="I3D.pkl", weight_map=weight_map)

    assert list(state) == ["backbone.conv1.weight", "backbone.bn1.running_var"]
    assert "res2_0_branch2a_w not found in C2 weights file, skipped." in caplog.text
    assert "I3D.pkl" in caplog.text


def test_weight_map_matching_nothing_is_an_error(tmp_path: Path) -> None:
    path = _write_pickle(tmp_path / "I3D.pkl", {"blobs": _blobs()})
    with pytest.raises(IncompatibleCheckpointError, match="none of the 1 blobs"):
        load_c2_state_dict(path, source="I3D.pkl", weight_map={"fc.weight": "fc1000_w"})


def test_reduce_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    class Payload:
        def __init__(self, marker: Path) -> None:
            self.marker = marker

        def __reduce__(self) -> tuple[Any, tuple[str, str]]:
            return (open, (str(self.marker), "w"))

    # Control: the payload really does create its marker under plain pickle.
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps({"blobs": {"x": Payload(control)}}, protocol=2)).get("blobs")["x"].close()
    assert control.exists()

    marker = tmp_path / "marker"
    path = _write_pickle(tmp_path / "evil.pkl", {"blobs": {"conv1_w": Payload(marker)}})
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pkl: refusing to unpickle .io\.open."):
        load_c2_state_dict(path, source="evil.pkl")
    assert not marker.exists()


def test_torch_zip_named_pkl_says_rename(tmp_path: Path) -> None:
    path = tmp_path / "SLOWFAST_8x8_R50.pkl"
    torch.save({"model_state": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=r"torch\.save zip archive.*Rename it to end in \.pth"):
        read_c2_pickle(path, source=str(path))


def test_legacy_torch_format_named_pkl_says_rename(tmp_path: Path) -> None:
    path = tmp_path / "old.pkl"
    torch.save({"w": torch.zeros(1)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy-format torch\.save file.*\.pth"):
        read_c2_pickle(path, source="old.pkl")


@pytest.mark.parametrize("data", [{"blobs": {}}, {}], ids=["empty_blobs", "empty_dict"])
def test_empty_blobs_is_a_clear_error(tmp_path: Path, data: dict[str, Any]) -> None:
    path = _write_pickle(tmp_path / "empty.pkl", data)
    with pytest.raises(CheckpointError, match=r"empty\.pkl: the file holds no blobs"):
        load_c2_state_dict(path, source="empty.pkl")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([np.ones(1)], "found list"),
        ({"blobs": [np.ones(1)]}, "'blobs' holds a list"),
        ({"model": {"conv.weight": np.ones(1)}, "__author__": "Detectron2"}, "detectron2 or pycls"),
    ],
    ids=["list", "blobs_list", "detectron2_zoo"],
)
def test_wrong_container_is_a_clear_error(tmp_path: Path, data: Any, message: str) -> None:
    path = _write_pickle(tmp_path / "odd.pkl", data)
    with pytest.raises(CheckpointError, match=message):
        read_c2_pickle(path, source="odd.pkl")


def test_scalar_blob_error_names_blob_and_file(tmp_path: Path) -> None:
    path = _write_pickle(tmp_path / "bad.pkl", {"blobs": {"res2_0_branch2a_w": np.float32(3.0)}})
    with pytest.raises(CheckpointError, match=r"bad\.pkl: blob 'res2_0_branch2a_w' holds a float32"):
        load_c2_state_dict(path, source="bad.pkl")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match=r"nope\.pkl"):
        read_c2_pickle(tmp_path / "nope.pkl", source="nope.pkl")


def test_truncated_pickle_is_a_checkpoint_error(tmp_path: Path) -> None:
    raw = pickle.dumps({"blobs": _blobs()}, protocol=2)
    path = tmp_path / "cut.pkl"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pkl: not a readable Caffe2 pickle"):
        read_c2_pickle(path, source="cut.pkl")
