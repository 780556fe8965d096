"""The documentation's code runs: examples under torchrun, quickstart blocks, the CLI page.

* The commands of ``docs/quickstart.md`` run in order, as a user would type them
  (``torchrun`` with gloo ranks on CPU): ``examples/ddp_quickstart.py`` on 2 ranks,
  resumed by ``examples/fsdp2_quickstart.py`` on 2, resumed under DDP on 1, then
  ``examples/consolidate.py``; the checkpoints and the file are checked.
* The ``python`` blocks of ``docs/quickstart.md`` are executed; the blocks that
  include an example file (``--8<--``) must name one of the files run here.
* ``docs/cli.md`` must match ``stmixer-ckpt <command> --help``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TIMEOUT_S = 180

_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_SNIPPET = re.compile(r'^--8<-- "([^"]+)"$', re.MULTILINE)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, (
        f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result


def _manifest(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "manifest.json").read_text())  # type: ignore[no-any-return]


def _shell_commands(page: Path) -> list[list[str]]:
    """The one-line commands of the page's ``bash`` blocks, in order."""
    blocks = re.findall(r"^```bash\n(.*?)^```", page.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.strip()]


def _as_test_command(argv: list[str]) -> list[str]:
    """A documented command, run with this interpreter and the repository's examples."""
    program, *args = argv
    args = [str(ROOT / arg) if arg.startswith("examples/") else arg for arg in args]
    if program == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *args]
    if program == "python":
        return [sys.executable, *args]
    raise AssertionError(f"docs/quickstart.md runs {program!r}; teach tests/test_examples.py how to run it")


@pytest.mark.dist
def test_quickstart_commands(tmp_path: Path) -> None:
    """DDP on 2 ranks, resumed under FSDP2 on 2, resumed under DDP on 1, then consolidated."""
    commands = _shell_commands(DOCS / "quickstart.md")
    assert [argv[0] for argv in commands] == ["torchrun", "torchrun", "torchrun", "python"], commands
    # --standalone in every torchrun line: a rendezvous on a free port, so parallel jobs never collide.
    assert all("--standalone" in argv for argv in commands if argv[0] == "torchrun")
    run = tmp_path / "runs" / "quickstart"
    outputs = [_run(_as_test_command(argv), tmp_path).stdout for argv in commands]

    assert (run / "last_checkpoint").read_text() == "model_0000020"
    saved_by = {
        name: (_manifest(run / name)["world_size"], _manifest(run / name)["layout"])
        for name in ("model_0000005", "model_0000010", "model_0000015", "model_0000020")
    }
    # Each job resumed where the previous one stopped instead of rewriting its checkpoints.
    assert saved_by == {
        "model_0000005": (2, "ddp"),
        "model_0000010": (2, "ddp"),
        "model_0000015": (2, "fsdp2"),
        "model_0000020": (1, "ddp"),
    }
    assert _manifest(run / "model_0000020")["contents"]["extra"] == ["iteration"]

    assert "loaded iteration 20" in outputs[-1]
    checkpoint = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert checkpoint["iteration"] == 20
    assert set(checkpoint) == {"model", "optimizer", "scheduler", "iteration"}
    assert checkpoint["model"]["0.weight"].shape == (32, 16)


def _python_blocks(page: Path) -> list[str]:
    return [match.group(1) for match in _PYTHON_BLOCK.finditer(page.read_text(encoding="utf-8"))]


def test_quickstart_includes_only_the_examples_run_here() -> None:
    page = DOCS / "quickstart.md"
    included = {match.group(1) for block in _python_blocks(page) for match in _SNIPPET.finditer(block)}
    assert included == {
        "examples/ddp_quickstart.py",
        "examples/fsdp2_quickstart.py",
        "examples/consolidate.py",
    }
    for path in included:
        assert (ROOT / path).is_file(), path


def test_quickstart_inline_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = [block for block in _python_blocks(DOCS / "quickstart.md") if not _SNIPPET.search(block)]
    assert blocks, "the quickstart lost its inline example"
    for block in blocks:
        exec(compile(block, "docs/quickstart.md", "exec"), {"__name__": "__quickstart__"})


def _cli_reference() -> Any:
    spec = importlib.util.spec_from_file_location("_docs_cli_reference", DOCS / "_tools" / "cli_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_matches_help() -> None:
    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert _cli_reference().is_current(page), (
        "docs/cli.md no longer matches `stmixer-ckpt <command> --help`; "
        "regenerate it with: python docs/_tools/cli_reference.py"
    )
