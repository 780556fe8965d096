"""Consolidate a run's latest checkpoint into one file that plain PyTorch loads.

    python examples/consolidate.py runs/quickstart model_final.pth

Works for checkpoints saved on any number of ranks, DDP or FSDP2; it needs no
process group and reads one tensor at a time.
"""

import argparse

import torch
from torch import nn

from stmixer_dist_ckpt import consolidate

parser = argparse.ArgumentParser()
parser.add_argument("save_dir", help="a run directory (its last_checkpoint) or one checkpoint directory")
parser.add_argument("output", help="the .pth file to write")
args = parser.parse_args()

summary = consolidate(args.save_dir, args.output, overwrite=True)
print(
    f"{summary.source} (saved on {summary.saved_world_size} rank(s)) -> {summary.destination}: "
    f"{summary.tensors} tensors, {summary.file_bytes} bytes"
)

# The file is a plain torch.save dict: {"model", "optimizer", "scheduler", <extras>}.
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
checkpoint = torch.load(args.output, weights_only=True)
model.load_state_dict(checkpoint["model"])
optimizer.load_state_dict(checkpoint["optimizer"])
print(f"loaded iteration {checkpoint['iteration']} into a plain nn.Module and AdamW")
