"""Multi-node: two torchrun "nodes" rendezvous over c10d on 127.0.0.1, save to S3, resume elsewhere.

Each "node" is its own ``torchrun`` process (an elastic agent with its own
workers), exactly as two hosts would run it; only the addresses are
loopback. This module is also the worker script (``torchrun -m
tests.test_multinode PHASE ...``).

The non-shared case gives each node its own working directory (through
``STMIXER_TEST_NODE_DIR``) and a relative ``save_dir``: the same string on
every rank names a different directory per node, as a node-local disk would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
NODE_DIR_ENV = "STMIXER_TEST_NODE_DIR"
_TIMEOUT_S = 200


# ------------------------------------------------------------------ worker side
def _worker(phase: str, save_dir: str, options_json: str, results: str) -> None:
    import faulthandler

    import torch
    import torch.distributed as dist

    from stmixer_dist_ckpt import Checkpointer, DistributedCheckpointError
    from tests._models import assert_states_equal, build, full_state, train_steps

    faulthandler.dump_traceback_later(_TIMEOUT_S - 30, exit=False)  # where a hang is, before the test gives up
    if os.environ.get(NODE_DIR_ENV):
        os.chdir(os.environ[NODE_DIR_ENV])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    options: dict[str, Any] = json.loads(options_json)
    model, optimizer, scheduler = build("ddp", seed=11 if phase == "resume" else 0)
    ckpt = Checkpointer(model, optimizer, scheduler, save_dir, save_to_disk=rank == 0, storage_options=options)
    outcome: dict[str, Any] = {"rank": rank, "world": world, "host_group": os.environ.get("GROUP_RANK")}
    if phase == "save":
        train_steps(model, optimizer, scheduler, 0, 3)
        outcome["saved"] = ckpt.save("model_0000003", iteration=3)
        if rank == 0:
            torch.save(full_state(model, optimizer), Path(results) / "saved.pt")
    elif phase == "resume":
        outcome["iteration"] = ckpt.load()["iteration"]
        expected = torch.load(Path(results) / "saved.pt", weights_only=False)
        assert_states_equal(full_state(model, optimizer), expected)  # raises on any difference
        outcome["equal"] = True
    else:  # unshared
        try:
            ckpt.save("model_0000001", iteration=1)
            outcome["error"] = None
        except DistributedCheckpointError as exc:
            outcome["error"] = str(exc)
    (Path(results) / f"{phase}-rank{rank}.json").write_text(json.dumps(outcome))
    # Tear down in order while the process group still exists: a DDP model destroyed after
    # destroy_process_group() (as the frame's locals would be) hung at exit under CPU contention.
    del ckpt, model, optimizer, scheduler
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------ test side
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _torchrun(nodes: int, per_node: int, args: list[str], node_dirs: list[Path] | None = None) -> None:
    """Start ``nodes`` torchrun agents sharing one c10d rendezvous; wait for all; raise with their logs."""
    port, job = _free_port(), uuid.uuid4().hex[:8]
    procs = []
    for node in range(nodes):
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        if node_dirs is not None:
            env[NODE_DIR_ENV] = str(node_dirs[node])
        command = [
            sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={nodes}", f"--nproc-per-node={per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={job}",
            "--rdzv-conf=join_timeout=90", "--local-addr=127.0.0.1", "--max-restarts=0", "--tee=3",
            "-m", "tests.test_multinode", *args,
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    logs = []
    deadline = time.monotonic() + _TIMEOUT_S
    for node, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()  # the agent stops its workers on SIGTERM; SIGKILL would orphan them
            try:
                out, _ = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
        logs.append((node, proc.returncode, out))
    failed = [(node, code, out[-8000:]) for node, code, out in logs if code != 0]
    assert not failed, "\n".join(f"--- node {node} exited {code} ---\n{out}" for node, code, out in failed)


def _results(results: Path, phase: str, world: int) -> list[dict[str, Any]]:
    found = [json.loads((results / f"{phase}-rank{rank}.json").read_text()) for rank in range(world)]
    assert [r["rank"] for r in found] == list(range(world)) and all(r["world"] == world for r in found)
    return found


@pytest.mark.dist
@pytest.mark.s3
@pytest.mark.slow
@pytest.mark.xdist_group("ws4")
def test_two_nodes_save_to_s3_and_one_node_with_three_ranks_resumes(tmp_path: Path, s3_bucket: Any) -> None:
    save_dir, options = f"{s3_bucket.url}/multi node run", json.dumps(s3_bucket.storage_options)
    _torchrun(2, 2, ["save", save_dir, options, str(tmp_path)])
    saved = _results(tmp_path, "save", 4)
    assert {r["host_group"] for r in saved} == {"0", "1"}  # two agents ("nodes") took part
    _torchrun(1, 3, ["resume", save_dir, options, str(tmp_path)])
    resumed = _results(tmp_path, "resume", 3)
    assert all(r["iteration"] == 3 and r["equal"] for r in resumed)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.xdist_group("ws4")
def test_a_save_dir_not_shared_between_nodes_fails_on_every_rank(tmp_path: Path) -> None:
    node_dirs = [tmp_path / "node0", tmp_path / "node1"]
    for directory in node_dirs:
        directory.mkdir()
    _torchrun(2, 1, ["unshared", "run", "{}", str(tmp_path)], node_dirs)
    outcomes = _results(tmp_path, "unshared", 2)
    messages = [str(r["error"]) for r in outcomes]
    assert all("save_dir must be one storage location shared by every node" in m for m in messages), messages
    # The same error on every rank: rank 0's report; only the headline path is each rank's own view.
    assert messages[0].split("\n", 1)[1] == messages[1].split("\n", 1)[1]
    assert all(m.splitlines()[0].endswith("failed on rank(s) 0") for m in messages)
    for directory in node_dirs:  # nothing was committed anywhere, and no tag moved
        assert not (directory / "run" / "last_checkpoint").exists()
        assert not list((directory / "run").glob("*/manifest.json"))


if __name__ == "__main__":
    _worker(*sys.argv[1:5])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (s3fs/aiohttp finalizers); the results are on disk
