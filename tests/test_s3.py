"""S3 through s3fs against a local moto server: round trips, caches, and a failing endpoint.

Ranks run in other processes and reach the server over loopback with the
same ``storage_options`` a user would pass. Failures come from
``tests/fault_proxy.py``: 5xx answers and connections cut mid-upload.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from stmixer_dist_ckpt import Checkpointer, DistributedCheckpointError
from stmixer_dist_ckpt.integrity import verify_checkpoint
from stmixer_dist_ckpt.storage import resolve_location

from ._models import build, full_state
from ._ranks import run_ranks
from .fault_proxy import FaultProxy, Rule
from .s3_server import S3Bucket, s3_filesystem
from .test_crash_safety import leftovers, loaded_value, net, save_body, save_here

pytestmark = [pytest.mark.s3, pytest.mark.dist]

# Fail fast when a fault is permanent: one retry in botocore (s3fs adds its own for
# connection errors). Transient faults below are chosen to be absorbed by these retries.
_FEW_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}}


def _ddp_save(rank: int, world: int, save_dir: str, options: dict[str, Any]) -> dict[str, Any]:
    model, optimizer, scheduler = build("ddp")
    Checkpointer(model, optimizer, scheduler, save_dir, save_to_disk=rank == 0, storage_options=options).save(
        "model_0000000", iteration=7
    )
    return full_state(model, optimizer)


def test_ddp_round_trip_with_spaces_and_unicode_then_resume_on_one_rank(tmp_path: Path, s3_bucket: S3Bucket) -> None:
    save_dir = f"{s3_bucket.url}/runs/exp 1 \u2013 größe"
    outcomes = run_ranks(_ddp_save, 2, tmp_path, save_dir, s3_bucket.storage_options)
    assert all(o.returned for o in outcomes), [o.error for o in outcomes]
    model, optimizer, scheduler = build("single", seed=5)
    extras = Checkpointer(model, optimizer, scheduler, save_dir, storage_options=s3_bucket.storage_options).load()
    assert extras["iteration"] == 7
    saved, loaded = outcomes[0].value, full_state(model, optimizer)
    for key, value in saved["model"].items():
        assert torch.equal(loaded["model"][key], value), key
    assert verify_checkpoint(f"{save_dir}/model_0000000", s3_bucket.storage_options).ok
    keys = sorted(s3_filesystem(s3_bucket.storage_options).find(s3_bucket.name))
    assert f"{s3_bucket.name}/runs/exp 1 \u2013 größe/last_checkpoint" in keys
    assert f"{s3_bucket.name}/runs/exp 1 \u2013 größe/model_0000000/manifest.json" in keys


def test_tag_written_by_another_process_is_seen_at_once(tmp_path: Path, s3_bucket: S3Bucket) -> None:
    save_dir, options = f"{s3_bucket.url}/run", s3_bucket.storage_options
    save_here(save_dir, options, "model_0000001", 1.0)
    reader = Checkpointer(net(0.0), save_dir=save_dir, storage_options=options)
    assert reader.get_checkpoint_file().endswith("/model_0000001")
    resolve_location(save_dir, options).listdir()  # fill this process's s3fs listing cache
    outcome = run_ranks(save_body, 1, tmp_path, save_dir, options, "model_0000002", 2.0, None)[0]
    assert outcome.returned, outcome.error
    assert reader.get_checkpoint_file().endswith("/model_0000002")
    assert loaded_value(save_dir, options) == 2.0


def test_resume_skips_a_tag_whose_checkpoint_was_deleted(s3_bucket: S3Bucket, caplog: pytest.LogCaptureFixture) -> None:
    save_dir, options = f"{s3_bucket.url}/run", s3_bucket.storage_options
    save_here(save_dir, options, "model_0000001", 1.0)
    save_here(save_dir, options, "model_0000002", 2.0)
    resolve_location(f"{save_dir}/model_0000002", options).remove(recursive=True)
    with caplog.at_level("WARNING"):
        assert loaded_value(save_dir, options) == 1.0
    assert "resuming from the newest committed checkpoint" in caplog.text


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param(Rule("status", method="PUT", path_contains="/data-", times=1, status=503), id="503-once"),
        pytest.param(Rule("status", method="PUT", path_contains="/data-", times=1, status=500), id="500-once"),
        pytest.param(Rule("drop", method="PUT", path_contains="/data-", times=1), id="connection-cut-once"),
    ],
)
def test_transient_endpoint_faults_are_retried(tmp_path: Path, s3_bucket: S3Bucket, rule: Rule) -> None:
    direct = s3_bucket.storage_options
    save_dir = f"{s3_bucket.url}/run"
    save_here(save_dir, direct, "model_0000001", 1.0)
    with FaultProxy(s3_bucket.endpoint.url) as proxy:
        proxy.add(rule)
        through_proxy = s3_bucket.endpoint.storage_options(endpoint_url=proxy.url)
        outcomes = run_ranks(save_body, 2, tmp_path, save_dir, through_proxy, "model_0000002", 2.0, None)
        assert proxy.faults() == 1
    assert all(o.returned for o in outcomes), [o.error for o in outcomes]
    assert verify_checkpoint(f"{save_dir}/model_0000002", direct).ok
    assert loaded_value(save_dir, direct) == 2.0


def _failing_save(rank: int, world: int, save_dir: str, options: dict[str, Any], name: str) -> tuple[str, float]:
    started = time.monotonic()
    try:
        save_body(rank, world, save_dir, options, name, 2.0, None)
    except DistributedCheckpointError as exc:
        return str(exc).splitlines()[0], time.monotonic() - started
    raise AssertionError("a save against a failing endpoint must raise on every rank")


@pytest.mark.parametrize(
    ("path", "new_name", "expect_committed"),
    [
        pytest.param("/data-", "model_0000002", False, id="shard-uploads"),
        pytest.param("manifest.json", "model_0000001", False, id="manifest-of-an-overwrite"),
        pytest.param("last_checkpoint", "model_0000002", True, id="tag-update"),
    ],
)
def test_persistent_5xx_fails_every_rank_and_keeps_the_previous_checkpoint(
    tmp_path: Path, s3_bucket: S3Bucket, path: str, new_name: str, expect_committed: bool
) -> None:
    direct = s3_bucket.storage_options
    save_dir = f"{s3_bucket.url}/run"
    save_here(save_dir, direct, "model_0000001", 1.0)
    with FaultProxy(s3_bucket.endpoint.url) as proxy:
        proxy.add(Rule("status", method="PUT", path_contains=path, status=503))
        through_proxy = s3_bucket.endpoint.storage_options(endpoint_url=proxy.url, **_FEW_RETRIES)
        outcomes = run_ranks(_failing_save, 2, tmp_path, save_dir, through_proxy, new_name)
        assert proxy.faults() >= 1
    assert all(o.returned for o in outcomes), [o.error for o in outcomes]
    (first, seconds0), (second, seconds1) = (o.value for o in outcomes)
    assert first == second  # the same error on every rank
    assert max(seconds0, seconds1) < 60, "ranks must fail promptly, not wait for a collective timeout"
    assert loaded_value(save_dir, direct) == 1.0  # the tag still names the previous, intact checkpoint
    new = resolve_location(f"{save_dir}/{new_name}", direct)
    if expect_committed:  # manifest PUT succeeded, tag PUT failed: committed but not the resume point
        assert loaded_value(save_dir, direct, new.url) == 2.0
    save_here(save_dir, direct, "model_0000003", 3.0)
    assert loaded_value(save_dir, direct) == 3.0
    assert leftovers(save_dir, direct) == []
