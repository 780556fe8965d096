"""The ``consolidate``, ``convert``, ``inspect`` and ``ls`` subcommands, through ``cli.main(argv)``.

Checkpoints are saved in process (no process group); the library behind each
command is tested in ``test_consolidate.py``. Here: arguments, output, and that
every failure is one line on stderr with a non-zero exit code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from stmixer_dist_ckpt import Checkpointer, MemoryPool
from stmixer_dist_ckpt.cli import main

# Checkpointer.save without a process group: DCP says it assumes a single process, which is the point.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    # main() calls logging.basicConfig, which binds a handler to the sys.stderr of the moment:
    # the first test's capture. Later tests would then log into a closed stream.
    handlers = list(logging.root.handlers)
    yield
    for handler in logging.root.handlers[:]:
        if handler not in handlers:
            logging.root.removeHandler(handler)


def _save(save_dir: Path, name: str = "model_0000004", **extra: Any) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    Checkpointer(model, optimizer, save_dir=str(save_dir), save_to_disk=True).save(name, **extra)
    return model


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command", ["consolidate", "convert", "inspect", "ls"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert f"usage: stmixer-ckpt {command}" in capsys.readouterr().out


def test_consolidate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _save(tmp_path / "run", iteration=4, person_pool=MemoryPool())
    out = tmp_path / "final.pth"
    code, stdout, _ = _run(capsys, "consolidate", str(tmp_path / "run"), str(out))
    assert code == 0 and f"wrote {out}" in stdout and "left out: extra.person_pool" in stdout
    loaded = torch.load(out, weights_only=True)
    assert loaded["iteration"] == 4 and sorted(loaded["optimizer"]["state"]) == [0, 1, 2, 3, 4, 5]
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value)

    code, _, err = _run(capsys, "consolidate", str(tmp_path / "run"), str(out))
    assert code == 2 and err.count("\n") == 1 and "already exists" in err and "--overwrite" in err

    weights = tmp_path / "final.safetensors"  # the format follows the suffix
    code, stdout, _ = _run(capsys, "consolidate", str(tmp_path / "run"), str(weights), "--dtype", "fp16")
    assert code == 0 and "(safetensors)" in stdout
    assert load_file(str(weights))["0.weight"].dtype == torch.float16

    code, stdout, _ = _run(
        capsys, "consolidate", str(tmp_path / "run"), str(out), "--overwrite", "--unsafe-extras", "keep", "--no-progress"
    )
    assert code == 0 and "kept (needs Checkpointer.load" in stdout


def test_inspect_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _save(tmp_path / "run", iteration=4)
    checkpoint = str(tmp_path / "run" / "model_0000004")
    code, stdout, _ = _run(capsys, "inspect", checkpoint)
    assert code == 0
    assert "saved by:  1 rank(s), layout single" in stdout
    assert "model.0.weight" in stdout and "[3, 4]" in stdout and "extras:    iteration" in stdout

    code, stdout, _ = _run(capsys, "inspect", str(tmp_path / "run"), "--json", "--prefix", "model")
    info = json.loads(stdout)
    assert code == 0 and info["world_size"] == 1 and info["kind"] == "committed"
    assert info["url"].endswith("model_0000004")  # a save_dir means its tagged checkpoint
    assert {e["key"] for e in info["entries"]} == {
        f"model.{k}" for k in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                              "1.num_batches_tracked", "2.weight", "2.bias")
    }
    weight = next(e for e in info["entries"] if e["key"] == "model.0.weight")
    assert weight == {"key": "model.0.weight", "kind": "tensor", "dtype": "float32", "shape": [3, 4], "nbytes": 48,
                      "chunks": 1, "preview": None}
    assert "torch" in info["versions"] and info["tensor_bytes"] > 0

    code, stdout, _ = _run(capsys, "inspect", checkpoint, "--prefix", "extra")
    assert code == 0 and "extra.iteration" in stdout and "4" in stdout

    single = tmp_path / "single.pth"
    assert main(["consolidate", checkpoint, str(single)]) == 0
    capsys.readouterr()
    code, stdout, _ = _run(capsys, "inspect", str(single), "--json")
    assert code == 0 and json.loads(stdout)["kind"] == "torch_file"


def test_ls_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    _save(run, "model_0000004")
    _save(run, "model_0000008")
    (run / "model_0000012" / "data-20250101-abc").mkdir(parents=True)  # a save that died before committing
    (run / "inference").mkdir()  # not a checkpoint: not listed
    (run / "log.txt").write_text("training log")
    code, stdout, _ = _run(capsys, "ls", str(run))
    assert code == 0
    lines = {line.split()[1] if line.startswith("  *") else line.split()[0]: line for line in stdout.splitlines()[2:]}
    assert set(lines) == {"model_0000004", "model_0000008", "model_0000012"}
    assert lines["model_0000008"].startswith("  *") and "complete" in lines["model_0000008"]
    assert "incomplete" in lines["model_0000012"]
    assert "last_checkpoint -> model_0000008" in stdout

    code, stdout, _ = _run(capsys, "ls", str(run), "--json")
    listing = json.loads(stdout)
    assert code == 0 and listing["tagged_name"] == "model_0000008"
    states = {c["name"]: (c["state"], c["tagged"]) for c in listing["checkpoints"]}
    assert states == {"model_0000004": ("complete", False), "model_0000008": ("complete", True),
                      "model_0000012": ("incomplete", False)}


def test_convert_command_both_directions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _save(tmp_path / "run", iteration=4)
    single = tmp_path / "model.pth"
    code, stdout, _ = _run(capsys, "convert", str(tmp_path / "run" / "model_0000004"), str(single))
    assert code == 0 and "(torch)" in stdout  # sharded -> file is consolidation

    code, _, err = _run(capsys, "convert", str(single), str(tmp_path / "sharded" / "model_0000004"))
    assert code == 2 and err.count("\n") == 1 and "--model-only" in err  # integer optimizer ids need the model

    target = tmp_path / "sharded" / "model_0000004"
    code, stdout, _ = _run(capsys, "convert", str(single), str(target), "--model-only")
    assert code == 0 and "sharded checkpoint" in stdout
    restored = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    Checkpointer(restored).load(str(target))
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)

    code, _, err = _run(capsys, "convert", str(single), str(target), "--model-only", "--dtype", "bf16", "--overwrite")
    assert code == 2 and "--dtype" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["consolidate", "{tmp}/missing", "{tmp}/out.pth"], "does not exist"),
        (["inspect", "{tmp}/missing"], "does not exist"),
        (["ls", "{tmp}/missing"], "not a directory"),
        (["convert", "{tmp}/notes.txt", "{tmp}/out"], "cannot convert"),
        (["inspect", "{tmp}/notes.txt"], "neither a torch.save file nor safetensors"),
        (["consolidate", "{tmp}/run", "{tmp}/out.pth", "--dtype", "int8"], "unknown dtype"),
        (["consolidate", "{tmp}/run", "{tmp}/out.pth", "--storage-options", "[1]"], "JSON object"),
        (["consolidate", "{tmp}/run/model_0000004/manifest.json", "{tmp}/out.pth"], "single file"),
    ],
)
def test_failures_exit_non_zero_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    _save(tmp_path / "run")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    code, stdout, err = _run(capsys, *(part.format(tmp=tmp_path) for part in argv))
    assert code == 2 and not stdout
    assert err.count("\n") == 1 and err.startswith(f"stmixer-ckpt {argv[0]}: error: ") and message in err
    assert not (tmp_path / "out.pth").exists()
