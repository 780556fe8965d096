"""Loading the formats upstream STMixer/AlphAction wrote, without a process group.

Pure building blocks for the legacy ``Checkpointer`` API: reading single-file
``.pth`` checkpoints and Caffe2 ``.pkl`` weights safely, converting Caffe2 blob
names, and matching a loaded state dict onto a model's keys with a report.
"""

from __future__ import annotations

from .c2_names import convert_c2_blobs, convert_c2_name, select_c2_blobs
from .c2_pickle import load_c2_state_dict, read_c2_pickle
from .key_matching import LoadReport, match_state_dict
from .legacy_file import is_torch_zip, load_legacy_checkpoint

__all__ = [
    "LoadReport",
    "convert_c2_blobs",
    "convert_c2_name",
    "is_torch_zip",
    "load_c2_state_dict",
    "load_legacy_checkpoint",
    "match_state_dict",
    "read_c2_pickle",
    "select_c2_blobs",
]
