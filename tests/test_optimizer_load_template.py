"""Loading optimizer state into an optimizer whose lazy state DCP would not materialize by itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stmixer_dist_ckpt import Checkpointer

from ._dist import run_distributed
from ._models import assert_states_equal, build, full_state, train_steps


def _saved_run(save_dir: str) -> dict[str, Any]:
    model, optimizer, scheduler = build("single")
    train_steps(model, optimizer, scheduler, 0, 3)
    Checkpointer(model, optimizer, scheduler, save_dir, save_to_disk=True).save("model_0000003", iteration=3)
    return full_state(model, optimizer)


def test_gradients_left_over_before_resuming_do_not_skip_the_optimizer_state(tmp_path: Path) -> None:
    expected = _saved_run(str(tmp_path))
    model, optimizer, scheduler = build("single", seed=5)
    model(torch.ones(4, 6)).sum().backward()  # a sanity batch before resuming leaves gradients behind
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert Checkpointer(model, optimizer, scheduler, str(tmp_path)).load()["iteration"] == 3
    assert_states_equal(full_state(model, optimizer), expected)
    for name, p in model.named_parameters():  # the user's gradients are put back untouched
        assert p.grad is not None and torch.equal(p.grad, grads[name]), name


def _body_and_head(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    named = list(model.named_parameters())
    return [p for n, p in named if not n.startswith("stm_head.")], [p for n, p in named if n.startswith("stm_head.")]


def test_an_optimizer_with_state_for_some_parameters_only_loads_all_of_it(tmp_path: Path) -> None:
    model, _, _ = build("single")
    body, head = _body_and_head(model)
    optimizer = torch.optim.AdamW([{"params": body}, {"params": head}], lr=0.05, weight_decay=0.01)
    train_steps(model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 10), 0, 3)
    Checkpointer(model, optimizer, save_dir=str(tmp_path), save_to_disk=True).save("model_0000003")
    expected = full_state(model, optimizer)

    model2, _, _ = build("single", seed=5)
    body2, head2 = _body_and_head(model2)
    optimizer2 = torch.optim.AdamW(body2, lr=0.05, weight_decay=0.01)
    model2(torch.ones(4, 6)).sum().backward()
    optimizer2.step()  # state for the body only
    optimizer2.add_param_group({"params": head2})  # the head joins later (an unfreezing schedule)
    Checkpointer(model2, optimizer2, save_dir=str(tmp_path)).load()
    assert_states_equal(full_state(model2, optimizer2), expected)


def _fsdp2_resume_with_leftover_gradients(rank: int, world: int, save_dir: str) -> dict[str, Any]:
    model, optimizer, scheduler = build("fsdp2", seed=5)
    model(torch.ones(4, 6)).sum().backward()
    Checkpointer(model, optimizer, scheduler, save_dir).load()
    return full_state(model, optimizer)


def test_fsdp2_resume_with_leftover_gradients_loads_the_optimizer_state(tmp_path: Path) -> None:
    save_dir = str(tmp_path / "run")
    expected = _saved_run(save_dir)
    for state in run_distributed(_fsdp2_resume_with_leftover_gradients, 2, tmp_path, save_dir):
        assert_states_equal(state, expected)


def test_a_stateless_optimizer_still_loads_its_param_groups(tmp_path: Path) -> None:
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.25)
    Checkpointer(model, optimizer, save_dir=str(tmp_path), save_to_disk=True).save("model_0000001")
    model2 = nn.Linear(4, 2)
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.5)
    model2(torch.ones(1, 4)).sum().backward()
    Checkpointer(model2, optimizer2, save_dir=str(tmp_path)).load()
    assert optimizer2.param_groups[0]["lr"] == 0.25 and not optimizer2.state
    assert model2.weight.grad is not None and torch.equal(model2.weight, model.weight)


def _legacy_pth_into_fsdp2_with_leftover_gradients(rank: int, world: int, path: str) -> dict[str, Any]:
    model, optimizer, scheduler = build("fsdp2", seed=5)
    model(torch.ones(4, 6)).sum().backward()  # DCP would not materialize the state: it failed deep inside
    Checkpointer(model, optimizer, scheduler, "").load(path)
    return full_state(model, optimizer)


def test_a_legacy_pth_loads_its_optimizer_state_into_fsdp2_despite_leftover_gradients(tmp_path: Path) -> None:
    model, optimizer, scheduler = build("single")
    train_steps(model, optimizer, scheduler, 0, 3)
    path = tmp_path / "legacy.pth"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": 3}, path)
    expected = full_state(model, optimizer)
    for state in run_distributed(_legacy_pth_into_fsdp2_with_leftover_gradients, 2, tmp_path, str(path)):
        assert_states_equal(state, expected)
