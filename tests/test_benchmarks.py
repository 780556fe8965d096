"""The benchmark suite runs end to end (tiny sizes): its README command must not rot or hang.

Only that it finishes and reports every measurement is checked here; the
numbers themselves belong in docs/benchmarks.md, never in assertions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.xdist_group("ws4")  # runs 4 ranks: keep it off the worker running the other 4-rank tests
def test_suite_reports_every_measurement_with_its_baseline(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite", "--size-mb", "8", "--world-sizes", "2", "4", "--repeats", "1",
         "--dir", str(tmp_path), "--json", str(out), "--plot", str(tmp_path / "suite.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    expected = {
        "save_ours", "save_dcp", "save_torch", "save_raw", "load_ours", "load_dcp", "load_torch", "load_raw",
        "stall_async_ours", "snapshot_copy_ours", "async_total_ours", "save_sync_with_optimizer", "stall_async_dcp", "async_total_dcp",
    }
    assert [row["world_size"] for row in report["per_world_size"]] == [2, 4]
    for row in report["per_world_size"]:
        assert expected <= row["seconds"].keys()
        assert all(seconds > 0 for seconds in row["seconds"].values())
    assert {"small_ours", "small_dcp", "small_torch"} <= report["small"].keys()
    assert report["consolidate"]["world_size"] == 4  # the widest checkpoint
    assert report["reshard_4_to_2_s"] > 0 and report["same_2_to_2_s"] > 0
    assert set(report["consolidate"]["methods"]) == {"raw_copy", "stmixer", "dcp_to_torch_save"}
    assert "async stall/sync save" in result.stdout and "resharded load (saved at 4, loaded at 2)" in result.stdout  # the ratios the issue tracks are printed
    assert not list(tmp_path.glob("bench-suite-*")), "the suite left its working directory behind"
