"""Storage: one contract over local disk, ``memory://`` and S3; paths with odd characters end to end.

The contract class runs the same checks on every backend (fsspec's
``tests/abstract`` pattern), because the commit protocol relies on exactly
these operations behaving alike: an atomic small write, a listing that sees
another writer's objects, and a recursive delete.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from stmixer_dist_ckpt import Checkpointer, StorageError
from stmixer_dist_ckpt.cli import main
from stmixer_dist_ckpt.storage import StorageLocation, resolve_location

from .s3_server import S3Bucket


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageLocation]:
    """An empty directory on each backend, named with a space and non-ASCII characters."""
    if request.param == "local":
        yield resolve_location(str(tmp_path / "räum 1"))
    elif request.param == "memory":
        location = resolve_location(f"memory://test-{uuid.uuid4().hex}/räum 1")
        yield location
        location.remove(recursive=True)
    else:
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        yield resolve_location(f"{bucket.url}/räum 1", bucket.storage_options)


class TestStorageContract:
    def test_atomic_write_then_read_and_replace(self, root: StorageLocation) -> None:
        target = root.join("last checkpoint ü")
        target.write_bytes_atomic(b"model_0000001")
        assert target.read_bytes() == b"model_0000001" and target.isfile() and target.size() == 13
        target.write_bytes_atomic(b"model_0000002")
        assert target.read_bytes() == b"model_0000002"
        assert root.listdir() == ["last checkpoint ü"]  # no temp file left beside it

    def test_listing_sees_objects_written_behind_its_back(self, root: StorageLocation) -> None:
        root.join("a").write_bytes_atomic(b"1")
        assert root.listdir() == ["a"]
        other = resolve_location(root.url, {**root.storage_options, "skip_instance_cache": True}) if not root.is_local else root
        other.join("b dir").join("x").write_bytes_atomic(b"2")  # another client, as another process would
        assert root.listdir() == ["a", "b dir"] and root.join("b dir").isdir()

    def test_missing_things_and_recursive_remove(self, root: StorageLocation) -> None:
        assert root.join("nope").listdir() == [] and not root.join("nope").exists()
        with pytest.raises(FileNotFoundError):
            root.join("nope").read_bytes()
        root.join("d").join("e").join("f").write_bytes_atomic(b"x")
        root.join("d").remove(recursive=True)
        root.join("d").remove(recursive=True)  # missing is fine
        assert not root.join("d").exists()

    def test_join_refuses_paths(self, root: StorageLocation) -> None:
        for bad in ("..", "a/b", "", "."):
            with pytest.raises(StorageError, match="plain name"):
                root.join(bad)


# ---------------------------------------------------------------- end to end
def _model(value: float) -> nn.Linear:
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


@pytest.mark.parametrize("form", ["plain", "file-url", "memory"])
def test_checkpointer_round_trip_on_each_kind_of_path(tmp_path: Path, form: str) -> None:
    save_dir = {
        "plain": str(tmp_path / "my runs" / "exp ü 1"),
        "file-url": f"file://{tmp_path}/exp \u2013 2",
        "memory": f"memory://run-{uuid.uuid4().hex}/exp 3",
    }[form]
    Checkpointer(_model(4.0), save_dir=save_dir, save_to_disk=True).save("model 0000001", iteration=1)
    model = _model(0.0)
    assert Checkpointer(model, save_dir=save_dir).load()["iteration"] == 1
    assert torch.equal(model.weight, torch.full_like(model.weight, 4.0))
    assert main(["verify", f"{save_dir}/model 0000001"]) == 0  # the CLI takes the same paths


@pytest.mark.parametrize("bad", ["run?1", "run*", "run[1]", "ru]n"])
def test_glob_characters_in_save_dir_are_refused_before_anything_is_written(tmp_path: Path, bad: str) -> None:
    save_dir = tmp_path / bad
    with pytest.raises(StorageError, match="glob"):
        Checkpointer(_model(1.0), save_dir=str(save_dir), save_to_disk=True).save("model_0000001")
    with pytest.raises(StorageError, match="glob"):
        Checkpointer(_model(1.0), save_dir=f"file://{save_dir}", save_to_disk=True).save("model_0000001")
    with pytest.raises(StorageError, match="glob"):
        Checkpointer(_model(1.0)).load(str(save_dir / "model_0000001"))
    assert os.listdir(tmp_path) == []
    assert main(["verify", str(save_dir)]) == 2


@pytest.mark.parametrize("bad", ["model[1]", "model?", "model*"])
def test_glob_characters_in_a_checkpoint_name_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="choose a name without them"):
        Checkpointer(_model(1.0), save_dir=str(tmp_path / "run"), save_to_disk=True).save(bad)
    assert not (tmp_path / "run").exists()


@pytest.mark.s3
def test_glob_characters_in_an_s3_url_are_refused(s3_bucket: S3Bucket) -> None:
    with pytest.raises(StorageError, match="glob"):
        Checkpointer(
            _model(1.0), save_dir=f"{s3_bucket.url}/run*", save_to_disk=True, storage_options=s3_bucket.storage_options
        ).save("model_0000001")
    assert resolve_location(s3_bucket.url, s3_bucket.storage_options).listdir() == []
