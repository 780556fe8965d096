"""Deterministic synthetic video clips for the demo detector, split reproducibly across ranks.

Every sample is a pure function of ``(seed, global index)``: the index seeds its own
``torch.Generator``, so no RNG state has to be checkpointed and any rank can rebuild any sample.
Iteration ``i`` always consumes global indices ``[i * B, (i + 1) * B)`` for a global batch size
``B``, and rank ``r`` of ``w`` takes the ``r``-th contiguous ``B // w`` of them. That is what makes
resume tests meaningful: a run saved at world size 4 and resumed at world size 2 sees the same
global batch at every iteration, so its losses can be compared with an uninterrupted run.

The label is learnable from the clip in two ways, so loss falls within a few steps: each class
adds its own colour offset to all pixels, and moves a bright square in its own direction and
speed. Class prototypes come from a fixed generator, independent of ``seed``, so a held-out
stream (another seed) has the same class meanings as the training stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "SyntheticClipConfig",
    "SyntheticClips",
    "batch_for_iteration",
    "sample_indices",
    "slow_from_fast",
    "synthetic_sample",
]

# Fixed on purpose: class meanings must not change with the stream seed (see module docstring).
_PROTOTYPE_SEED = 0x5D17
_DIRECTIONS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, kw_only=True, slots=True)
class SyntheticClipConfig:
    """Shape and difficulty of the synthetic clips; keep ``num_classes``/``alpha`` equal to the model's.

    Attributes:
        num_classes: Labels are drawn uniformly from ``range(num_classes)``.
        alpha: Fast-to-slow frame ratio used to derive the slow clip.
        num_frames: Frames of the fast clip; must be a multiple of ``alpha``.
        height: Clip height in pixels.
        width: Clip width in pixels.
        noise_std: Standard deviation of the per-pixel Gaussian noise.
        signal_strength: Scale of the class colour offset and of the moving square.
    """

    num_classes: int = 81
    alpha: int = 4
    num_frames: int = 8
    height: int = 32
    width: int = 32
    noise_std: float = 1.0
    signal_strength: float = 1.0

    def __post_init__(self) -> None:
        for name in ("num_classes", "alpha", "num_frames", "height", "width"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"SyntheticClipConfig.{name} must be >= 1, got {value}.")
        if self.num_frames % self.alpha != 0:
            raise ValueError(
                f"SyntheticClipConfig.num_frames ({self.num_frames}) must be a multiple of alpha "
                f"({self.alpha}); otherwise the slow clip would not have num_frames / alpha frames."
            )
        if self.noise_std < 0:
            raise ValueError(f"SyntheticClipConfig.noise_std must be >= 0, got {self.noise_std}.")


def _sample_seed(seed: int, index: int) -> int:
    # splitmix64 of (seed, index): neighbouring indices and seeds get unrelated generator
    # streams, which a plain ``seed + index`` would not give (seed 0 index 1 == seed 1 index 0).
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def synthetic_sample(index: int, config: SyntheticClipConfig, seed: int) -> tuple[Tensor, int]:
    """Build sample ``index`` of the stream ``seed``: a fast clip ``(3, T, H, W)`` and its label.

    Args:
        index: Global position in the stream, ``>= 0``.
        config: Clip shape and difficulty.
        seed: Stream seed; equal ``(index, config, seed)`` always give equal samples.

    Returns:
        ``(fast_clip, label)``; :func:`slow_from_fast` gives the matching slow clip.

    Raises:
        ValueError: If ``index`` is negative.
    """
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}.")
    prototypes = torch.Generator().manual_seed(_PROTOTYPE_SEED)
    colours = torch.randn(config.num_classes, 3, generator=prototypes)

    g = torch.Generator().manual_seed(_sample_seed(seed, index))
    label = int(torch.randint(config.num_classes, (), generator=g))
    t, h, w = config.num_frames, config.height, config.width
    dy, dx = _DIRECTIONS[label % len(_DIRECTIONS)]
    speed = 1 + (label // len(_DIRECTIONS)) % 3
    y0 = int(torch.randint(h, (), generator=g))
    x0 = int(torch.randint(w, (), generator=g))

    square = torch.zeros(h, w)
    square[: max(1, h // 4), : max(1, w // 4)] = 1.0
    motion = torch.stack(
        [torch.roll(square, shifts=(y0 + i * dy * speed, x0 + i * dx * speed), dims=(0, 1)) for i in range(t)]
    )
    clip = torch.randn(3, t, h, w, generator=g) * config.noise_std
    clip += config.signal_strength * (colours[label].view(3, 1, 1, 1) + 2.0 * motion.unsqueeze(0))
    return clip, label


def slow_from_fast(fast_clip: Tensor, alpha: int) -> Tensor:
    """Take every ``alpha``-th frame of ``(..., T, H, W)`` clips, the slow pathway's input.

    Raises:
        ValueError: If the clip has fewer than 3 dims or ``T`` is not a multiple of ``alpha``.
    """
    if fast_clip.dim() < 3 or alpha < 1 or fast_clip.shape[-3] % alpha != 0:
        raise ValueError(
            f"cannot subsample a clip of shape {tuple(fast_clip.shape)} by alpha={alpha}: "
            "the frame axis (third from last) must be a multiple of alpha >= 1."
        )
    return fast_clip[..., ::alpha, :, :].contiguous()


class SyntheticClips(Dataset[tuple[tuple[Tensor, Tensor], int]]):
    """The first ``num_samples`` samples of stream ``seed``, as ``((slow, fast), label)``.

    Item ``k`` equals global sample ``k`` of :func:`batch_for_iteration` for the same seed and
    config, so a map-style loader and the per-iteration helper can be mixed freely.

    Example:
        >>> ds = SyntheticClips(16, SyntheticClipConfig(num_classes=4), seed=0)
        >>> (slow, fast), label = ds[3]
        >>> slow.shape, fast.shape
        (torch.Size([3, 2, 32, 32]), torch.Size([3, 8, 32, 32]))
    """

    def __init__(self, num_samples: int, config: SyntheticClipConfig | None = None, seed: int = 0) -> None:
        if num_samples < 0:
            raise ValueError(f"SyntheticClips needs num_samples >= 0, got {num_samples}.")
        self.num_samples = num_samples
        self.config = config if config is not None else SyntheticClipConfig()
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[tuple[Tensor, Tensor], int]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for SyntheticClips of {self.num_samples} samples.")
        fast, label = synthetic_sample(index % self.num_samples, self.config, self.seed)
        return (slow_from_fast(fast, self.config.alpha), fast), label


def sample_indices(iteration: int, rank: int, world_size: int, batch_size: int) -> range:
    """Global sample indices that ``rank`` consumes at ``iteration``.

    Args:
        iteration: Training iteration, ``>= 0``.
        rank: This process's rank in ``[0, world_size)``.
        world_size: Number of ranks sharing the global batch.
        batch_size: *Global* batch size; fixed across resumes, divisible by ``world_size``.

    Raises:
        ValueError: On a negative iteration, a rank outside the world, or a global batch that
            does not split evenly (uneven splits would make the global stream depend on ``w``).
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}.")
    if batch_size < 1 or batch_size % world_size != 0:
        raise ValueError(
            f"global batch_size {batch_size} must be a positive multiple of world_size {world_size}; "
            "pick a global batch divisible by every world size you plan to resume on."
        )
    per_rank = batch_size // world_size
    start = iteration * batch_size + rank * per_rank
    return range(start, start + per_rank)


def batch_for_iteration(
    iteration: int,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    *,
    config: SyntheticClipConfig | None = None,
) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """This rank's share of the global batch of ``iteration``; a pure function of its arguments.

    Concatenating the results of ranks ``0..w-1`` gives the same global batch for every
    ``world_size`` ``w`` that divides ``batch_size``.

    Args:
        iteration: Training iteration, ``>= 0``.
        rank: This process's rank in ``[0, world_size)``.
        world_size: Number of ranks sharing the global batch.
        batch_size: *Global* batch size, divisible by ``world_size``.
        seed: Stream seed.
        config: Clip shape; ``None`` means ``SyntheticClipConfig()``.

    Returns:
        ``((slow, fast), labels)`` with shapes ``(b, 3, T/alpha, H, W)``, ``(b, 3, T, H, W)`` and
        ``(b,)`` int64, where ``b = batch_size // world_size``.

    Raises:
        ValueError: See :func:`sample_indices`.

    Example:
        >>> cfg = SyntheticClipConfig(num_classes=4)
        >>> (slow, fast), labels = batch_for_iteration(7, rank=1, world_size=2, batch_size=8, seed=0, config=cfg)
        >>> fast.shape, labels.shape
        (torch.Size([4, 3, 8, 32, 32]), torch.Size([4]))
    """
    cfg = config if config is not None else SyntheticClipConfig()
    samples = [
        synthetic_sample(i, cfg, seed) for i in sample_indices(iteration, rank, world_size, batch_size)
    ]
    fast = torch.stack([clip for clip, _ in samples])
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return (slow_from_fast(fast, cfg.alpha), fast), labels
