"""FSDP2 quickstart: the same loop with a model sharded by ``fully_shard``.

    torchrun --standalone --nproc-per-node 2 examples/fsdp2_quickstart.py runs/quickstart --max-iter 15

Each rank writes only its own shards. The checkpoint loads on any world size and
under DDP or a plain model too. On GPUs: "nccl" and init_device_mesh("cuda", ...).
"""

import argparse
import gc

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from stmixer_dist_ckpt import Checkpointer

parser = argparse.ArgumentParser()
parser.add_argument("save_dir")
parser.add_argument("--max-iter", type=int, default=20)
args = parser.parse_args()

dist.init_process_group("gloo")
torch.manual_seed(0)  # the same full weights on every rank before sharding
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built after fully_shard
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
checkpointer = Checkpointer(model, optimizer, scheduler, args.save_dir, save_to_disk=True)

arguments = {"iteration": 0}
arguments.update(checkpointer.load())  # resume from save_dir/last_checkpoint, if any
for iteration in range(arguments["iteration"], args.max_iter):
    loss = model(torch.randn(8, 16)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    if (iteration + 1) % 5 == 0:
        arguments["iteration"] = iteration + 1
        checkpointer.save(f"model_{iteration + 1:07d}", **arguments)  # collective: every rank calls it
# Free the wrapped model before its process group: DDP/FSDP objects that outlive the group can
# abort the interpreter at exit ("terminate called without an active exception").
del checkpointer, scheduler, optimizer, model
gc.collect()
dist.destroy_process_group()
