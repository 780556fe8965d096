"""DDP quickstart: train, save a sharded checkpoint every 5 iterations, resume from the tag.

    torchrun --standalone --nproc-per-node 2 examples/ddp_quickstart.py runs/quickstart --max-iter 10

Run it again with a larger --max-iter (or another --nproc-per-node) and it resumes.
On GPUs: init with "nccl" and move the model to f"cuda:{LOCAL_RANK}" before wrapping.
"""

import argparse
import gc

import torch
import torch.distributed as dist
from torch import nn

from stmixer_dist_ckpt import Checkpointer

parser = argparse.ArgumentParser()
parser.add_argument("save_dir")
parser.add_argument("--max-iter", type=int, default=20)
args = parser.parse_args()

dist.init_process_group("gloo")
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
checkpointer = Checkpointer(model, optimizer, scheduler, args.save_dir, save_to_disk=dist.get_rank() == 0)

arguments = {"iteration": 0}
arguments.update(checkpointer.load())  # no argument: resume from save_dir/last_checkpoint, if any
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
