"""The main job end to end: train, SIGKILL, resume on another world size, consolidate, verify."""

from __future__ import annotations

from pathlib import Path

import pytest

from stmixer_dist_ckpt.cli import main
from stmixer_dist_ckpt.demo.train import DEMO_MODEL_CONFIG

from .test_dist_c2_load import c2_pickle_bytes, make_c2_blobs

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.mark.xdist_group("ws4")  # 2 + 3 ranks: keep it off the worker running 4-rank tests
def test_demo_from_caffe2_weights_passes_every_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    init = tmp_path / "SLOWFAST_R50_synthetic.pkl"
    init.write_bytes(c2_pickle_bytes(make_c2_blobs(DEMO_MODEL_CONFIG)))
    save_dir = tmp_path / "run dir with spaces"
    code = main(
        [
            "demo",
            "--save-dir", str(save_dir),
            "--max-iter", "8",
            "--checkpoint-period", "2",
            "--preempt-at", "5",
            "--init-weights", str(init),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ALL CHECKS PASSED" in out
    assert "[PASS] phase 1 started from --init-weights" in out
    assert "resumed from" in out and "at iteration 4" in out
    assert (save_dir / "last_checkpoint").read_text() == "model_final"
    assert (save_dir / "model_final.pth").is_file()


def test_demo_rejects_a_batch_size_that_does_not_split(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["demo", "--save-dir", str(tmp_path), "--global-batch-size", "4", "--resume-world-size", "3"])
    assert code == 2
    assert "must divide by world size 3" in capsys.readouterr().err
