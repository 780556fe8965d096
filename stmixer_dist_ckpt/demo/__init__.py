"""A CPU-sized STMixer-style video action model and synthetic data to train it on.

Used by the examples, tests and benchmarks to exercise checkpointing on a realistic,
PySlowFast-named state dict; nothing in the library itself depends on it.
"""

from __future__ import annotations

from stmixer_dist_ckpt.demo.data import (
    SyntheticClipConfig,
    SyntheticClips,
    batch_for_iteration,
    sample_indices,
    slow_from_fast,
    synthetic_sample,
)
from stmixer_dist_ckpt.demo.model import ActionDetector, DemoModelConfig, SlowFastBackbone, build_demo_model

__all__ = [
    "ActionDetector",
    "DemoModelConfig",
    "SlowFastBackbone",
    "SyntheticClipConfig",
    "SyntheticClips",
    "batch_for_iteration",
    "build_demo_model",
    "sample_indices",
    "slow_from_fast",
    "synthetic_sample",
]
