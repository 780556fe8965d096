"""Tiny models and training steps shared by the multi-rank tests."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class TinyDetector(nn.Module):
    """Backbone + ``stm_head`` with names like the demo model, small enough for fast tests.

    ``odd`` has 3 rows so a 4-rank FSDP2 shard of it is empty on one rank.
    """

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
        self.odd = nn.Linear(8, 3)
        self.norm = nn.BatchNorm1d(3)
        self.stm_head = nn.Linear(3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stm_head(self.norm(self.odd(self.backbone(x))))


def build(parallel: str, num_classes: int = 5, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """Model wrapped for ``parallel`` ("single", "ddp", "fsdp2"), AdamW, MultiStepLR."""
    torch.manual_seed(seed)
    model: nn.Module = TinyDetector(num_classes)
    if parallel == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    elif parallel == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        fully_shard(model, mesh=mesh)
    elif parallel != "single":
        raise ValueError(parallel)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3, 6], gamma=0.5)
    return model, optimizer, scheduler


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, start: int, steps: int) -> None:
    """Deterministic steps: iteration i uses the same global batch on any world size."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    for iteration in range(start, start + steps):
        generator = torch.Generator().manual_seed(1000 + iteration)
        x = torch.randn(8, 6, generator=generator)
        y = torch.randint(0, 5, (8,), generator=generator)
        per_rank = 8 // world if 8 % world == 0 else 8
        lo = rank * per_rank if 8 % world == 0 else 0
        loss = nn.functional.cross_entropy(model(x[lo : lo + per_rank]), y[lo : lo + per_rank] % 5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Gathered model + optimizer state (name-keyed), identical on every rank, as plain tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return {
        "model": {k: v.detach().clone() for k, v in model_sd.items()},
        "optimizer": {
            fqn: {name: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for name, v in entry.items()}
            for fqn, entry in optim_sd["state"].items()
        },
        "lr": [group["lr"] for group in optim_sd["param_groups"]],
    }


def assert_states_equal(actual: dict[str, Any], expected: dict[str, Any], *, exact: bool = True) -> None:
    assert actual["model"].keys() == expected["model"].keys()
    for key in expected["model"]:
        a, e = actual["model"][key], expected["model"][key]
        assert torch.equal(a, e) if exact else torch.allclose(a, e), f"model {key} differs"
    assert actual["optimizer"].keys() == expected["optimizer"].keys()
    for fqn, entry in expected["optimizer"].items():
        for name, value in entry.items():
            got = actual["optimizer"][fqn][name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(got, value) if exact else torch.allclose(got, value), f"optimizer {fqn}.{name} differs"
            else:
                assert got == value, f"optimizer {fqn}.{name}: {got} != {value}"
    assert actual["lr"] == expected["lr"]


class RunStats:
    """A user class stored as an extra; must be registered to load safely."""

    def __init__(self, best: float, history: list[float]) -> None:
        self.best = best
        self.history = history

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunStats) and (self.best, self.history) == (other.best, other.history)
