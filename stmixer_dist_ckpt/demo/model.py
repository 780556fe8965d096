"""A small SlowFast-R50-style action classifier whose parameter names match PySlowFast/STMixer.

The demo exists to give the checkpointing code a realistic state dict: hundreds of
BatchNorm buffers, a two-pathway backbone with lateral fusion, and a head under the
``stm_head.`` prefix. The names are the contract, not the widths: STMixer's
``ActionCheckpointer`` maps Caffe2 ``.pkl`` blobs onto exactly these keys
(``backbone.s2.pathway0_res0.branch2.a.weight``, ``backbone.s1_fuse.conv_f2s.weight``, ...), so a
renamed module would silently turn every such load into a pile of "missing keys". The layer
layout follows ``MCG-NJU/STMixer:alphaction/modeling/backbone/video_model_builder.py``
(``SlowFast``) and its ``sfmodels`` helpers; only the widths are shrunk so that a training step
runs on one CPU thread.

Deliberate simplifications: no pathway max-pool modules after ``s2_fuse`` (they are
parameter-free and of size 1 in SlowFast), no spatial dilation, no grouped non-local, and
the non-local blocks exist only on the slow pathway. The STMixer detector's query decoder is
replaced by a global-pool classification head, since the demo trains on clip labels, not boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ActionDetector", "DemoModelConfig", "SlowFastBackbone", "build_demo_model"]

# SlowFast's temporal kernel basis (``_TEMPORAL_KERNEL_BASIS["slowfast"]``): the slow pathway
# stays frame-wise until res4, because its frames are too far apart for early temporal convs to
# help; the fast pathway uses temporal kernels everywhere.
_STEM_TEMPORAL_KERNEL = (1, 5)
_STAGE_TEMPORAL_KERNELS = ((1, 3), (1, 3), (3, 3), (3, 3))
_STAGE_SPATIAL_STRIDES = (1, 2, 2, 2)
# Bottleneck output width is 4x the inner width in every stage, as in ResNet-50.
_BOTTLENECK_EXPANSION = 4


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoModelConfig:
    """Knobs of the demo model; the defaults give an R50-deep network of about 0.65 M parameters.

    Attributes:
        num_classes: Outputs of ``stm_head.cls``; 81 is AVA's 80 actions plus background.
        depth: Residual blocks in stages ``s2..s5``; ``(3, 4, 6, 3)`` is ResNet-50.
        width_per_group: Slow stem width (64 in the real R50; 8 keeps the demo CPU-sized).
        alpha: Frame-rate ratio between the fast and the slow clip.
        beta_inv: Channel ratio between the slow and the fast pathway.
        fusion_conv_channel_ratio: ``conv_f2s`` output channels per fast input channel.
        fusion_kernel_size: Temporal kernel of ``conv_f2s`` (STMixer's R50 config uses 7).
        nonlocal_locations: For each of ``s2..s5``, the slow-pathway block indices followed by
            a non-local block; the default adds ``backbone.s3.pathway0_nonlocal1``.
        nonlocal_pool: Max-pool applied to the keys/values of every non-local block.
        head_hidden_dim: Width of ``stm_head.fc1``.
    """

    num_classes: int = 81
    depth: tuple[int, int, int, int] = (3, 4, 6, 3)
    width_per_group: int = 8
    alpha: int = 4
    beta_inv: int = 4
    fusion_conv_channel_ratio: int = 2
    fusion_kernel_size: int = 7
    nonlocal_locations: tuple[tuple[int, ...], ...] = ((), (1,), (), ())
    nonlocal_pool: tuple[int, int, int] = (1, 2, 2)
    head_hidden_dim: int = 128

    def __post_init__(self) -> None:
        # Rejecting bad combinations here gives a message naming the fields, instead of a
        # channel-mismatch error from deep inside a Conv3d on the first forward.
        positive = ("num_classes", "width_per_group", "alpha", "beta_inv", "head_hidden_dim")
        for name in (*positive, "fusion_conv_channel_ratio", "fusion_kernel_size"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"DemoModelConfig.{name} must be >= 1, got {value}.")
        if len(self.depth) != 4 or any(d < 1 for d in self.depth):
            raise ValueError(f"DemoModelConfig.depth needs 4 stage depths >= 1, got {self.depth}.")
        if self.width_per_group % self.beta_inv != 0:
            raise ValueError(
                f"DemoModelConfig.width_per_group ({self.width_per_group}) must be divisible by "
                f"beta_inv ({self.beta_inv}) so the fast pathway has a whole number of channels."
            )
        if self.fusion_kernel_size % 2 == 0:
            raise ValueError(
                f"DemoModelConfig.fusion_kernel_size must be odd, got {self.fusion_kernel_size}."
            )
        if len(self.nonlocal_locations) != 4:
            raise ValueError(
                "DemoModelConfig.nonlocal_locations needs one tuple per stage s2..s5, "
                f"got {len(self.nonlocal_locations)}."
            )
        for k, blocks in enumerate(self.nonlocal_locations):
            if bad := [b for b in blocks if not 0 <= b < self.depth[k]]:
                raise ValueError(
                    f"DemoModelConfig.nonlocal_locations names blocks {bad} in s{k + 2}, "
                    f"which has only {self.depth[k]} blocks (depth={self.depth})."
                )
        if len(self.nonlocal_pool) != 3 or any(p < 1 for p in self.nonlocal_pool):
            raise ValueError(f"DemoModelConfig.nonlocal_pool needs 3 sizes >= 1, got {self.nonlocal_pool}.")


def _conv(
    dim_in: int, dim_out: int, kernel: tuple[int, int, int], stride: tuple[int, int, int] = (1, 1, 1)
) -> nn.Conv3d:
    """A bias-free, "same"-padded Conv3d: every conv of the ResNet body, as in PySlowFast."""
    padding = (kernel[0] // 2, kernel[1] // 2, kernel[2] // 2)
    return nn.Conv3d(dim_in, dim_out, kernel, stride=stride, padding=padding, bias=False)


class _BasicStem(nn.Module):
    """``pathway{i}_stem``: Tx7x7 conv, BN, ReLU and a 1x3x3 max-pool (PySlowFast ``ResNetBasicStem``)."""

    def __init__(self, dim_in: int, dim_out: int, temporal_kernel: int) -> None:
        super().__init__()
        self.conv = _conv(dim_in, dim_out, (temporal_kernel, 7, 7), stride=(1, 2, 2))
        self.bn = nn.BatchNorm3d(dim_out)
        self.relu = nn.ReLU(inplace=True)
        self.pool_layer = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.pool_layer(self.relu(self.bn(self.conv(x))))
        return out


class _VideoStem(nn.Module):
    """``s1``: one basic stem per pathway."""

    def __init__(self, dims_out: tuple[int, int]) -> None:
        super().__init__()
        self.pathway0_stem = _BasicStem(3, dims_out[0], _STEM_TEMPORAL_KERNEL[0])
        self.pathway1_stem = _BasicStem(3, dims_out[1], _STEM_TEMPORAL_KERNEL[1])

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        return [self.pathway0_stem(x[0]), self.pathway1_stem(x[1])]


class _FuseFastToSlow(nn.Module):
    """``s{k}_fuse``: a time-strided conv on the fast features, concatenated onto the slow ones."""

    def __init__(self, dim_in: int, channel_ratio: int, kernel_size: int, alpha: int) -> None:
        super().__init__()
        self.conv_f2s = _conv(dim_in, dim_in * channel_ratio, (kernel_size, 1, 1), stride=(alpha, 1, 1))
        self.bn = nn.BatchNorm3d(dim_in * channel_ratio)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        fuse = self.relu(self.bn(self.conv_f2s(x[1])))
        return [torch.cat([x[0], fuse], dim=1), x[1]]


class _BottleneckTransform(nn.Module):
    """``branch2``: Tx1x1 ``a``, 1x3x3 ``b`` (strided), 1x1x1 ``c``, each followed by BN."""

    def __init__(self, dim_in: int, dim_out: int, dim_inner: int, temporal_kernel: int, stride: int) -> None:
        super().__init__()
        self.a = _conv(dim_in, dim_inner, (temporal_kernel, 1, 1))
        self.a_bn = nn.BatchNorm3d(dim_inner)
        self.a_relu = nn.ReLU(inplace=True)
        self.b = _conv(dim_inner, dim_inner, (1, 3, 3), stride=(1, stride, stride))
        self.b_bn = nn.BatchNorm3d(dim_inner)
        self.b_relu = nn.ReLU(inplace=True)
        self.c = _conv(dim_inner, dim_out, (1, 1, 1))
        self.c_bn = nn.BatchNorm3d(dim_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.a_relu(self.a_bn(self.a(x)))
        x = self.b_relu(self.b_bn(self.b(x)))
        out: Tensor = self.c_bn(self.c(x))
        return out


class _ResBlock(nn.Module):
    """``pathway{p}_res{i}``: bottleneck plus identity, or ``branch1`` projection when shapes change."""

    def __init__(self, dim_in: int, dim_out: int, dim_inner: int, temporal_kernel: int, stride: int) -> None:
        super().__init__()
        # Same rule as PySlowFast's ResBlock, so ``branch1`` appears exactly where a Caffe2
        # checkpoint has a ``*_branch1_w`` blob: only the first block of each stage.
        self.branch1: nn.Conv3d | None = None
        self.branch1_bn: nn.BatchNorm3d | None = None
        if dim_in != dim_out or stride != 1:
            self.branch1 = _conv(dim_in, dim_out, (1, 1, 1), stride=(1, stride, stride))
            self.branch1_bn = nn.BatchNorm3d(dim_out)
        self.branch2 = _BottleneckTransform(dim_in, dim_out, dim_inner, temporal_kernel, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        f_x = self.branch2(x)
        if self.branch1 is not None and self.branch1_bn is not None:
            x = self.branch1_bn(self.branch1(x))
        out: Tensor = self.relu(x + f_x)
        return out


class _Nonlocal(nn.Module):
    """``pathway{p}_nonlocal{i}``: softmax self-attention over all T*H*W positions.

    Unlike the rest of the backbone these 1x1x1 convs carry a bias, as in PySlowFast and the
    Caffe2 ``nonlocal_conv*_{theta,phi,g,out}_b`` blobs they are loaded from.
    """

    def __init__(self, dim: int, dim_inner: int, pool_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.dim_inner = dim_inner
        self.conv_theta = nn.Conv3d(dim, dim_inner, kernel_size=1)
        self.conv_phi = nn.Conv3d(dim, dim_inner, kernel_size=1)
        self.conv_g = nn.Conv3d(dim, dim_inner, kernel_size=1)
        self.conv_out = nn.Conv3d(dim_inner, dim, kernel_size=1)
        self.bn = nn.BatchNorm3d(dim)
        self.pool: nn.MaxPool3d | None = None
        if any(p > 1 for p in pool_size):
            self.pool = nn.MaxPool3d(kernel_size=pool_size, stride=pool_size)

    def forward(self, x: Tensor) -> Tensor:
        n, _, t, h, w = x.shape
        theta = self.conv_theta(x).view(n, self.dim_inner, -1)
        pooled = x if self.pool is None else self.pool(x)
        phi = self.conv_phi(pooled).view(n, self.dim_inner, -1)
        g = self.conv_g(pooled).view(n, self.dim_inner, -1)
        affinity = torch.softmax(torch.einsum("nct,ncp->ntp", theta, phi) * self.dim_inner**-0.5, dim=2)
        out = torch.einsum("ntg,ncg->nct", affinity, g).reshape(n, self.dim_inner, t, h, w)
        residual: Tensor = self.bn(self.conv_out(out))
        return x + residual


class _ResStage(nn.Module):
    """``s{k}``: ``pathway{p}_res{i}`` blocks for both pathways, with optional slow non-local blocks."""

    def __init__(
        self,
        *,
        dims_in: tuple[int, int],
        dims_out: tuple[int, int],
        dims_inner: tuple[int, int],
        temporal_kernels: tuple[int, int],
        stride: int,
        num_blocks: int,
        nonlocal_blocks: tuple[int, ...],
        nonlocal_pool: tuple[int, int, int],
    ) -> None:
        super().__init__()
        self.num_blocks = num_blocks
        for pathway in range(2):
            for i in range(num_blocks):
                block = _ResBlock(
                    dims_in[pathway] if i == 0 else dims_out[pathway],
                    dims_out[pathway],
                    dims_inner[pathway],
                    temporal_kernels[pathway],
                    stride if i == 0 else 1,
                )
                self.add_module(f"pathway{pathway}_res{i}", block)
                # Registered right after its block, as PySlowFast does, so state-dict order matches too.
                if pathway == 0 and i in nonlocal_blocks:
                    nonlocal_block = _Nonlocal(dims_out[0], dims_out[0] // 2, nonlocal_pool)
                    self.add_module(f"pathway0_nonlocal{i}", nonlocal_block)

    def forward(self, inputs: list[Tensor]) -> list[Tensor]:
        outputs = []
        for pathway, x in enumerate(inputs):
            for i in range(self.num_blocks):
                x = getattr(self, f"pathway{pathway}_res{i}")(x)
                nonlocal_block = getattr(self, f"pathway{pathway}_nonlocal{i}", None)
                if nonlocal_block is not None:
                    x = nonlocal_block(x)
            outputs.append(x)
        return outputs


class SlowFastBackbone(nn.Module):
    """The two-pathway backbone: ``s1``, ``s1_fuse``, ``s2``, ..., ``s4_fuse``, ``s5``.

    Takes ``[slow_clip, fast_clip]`` and returns ``[slow_features, fast_features]`` from ``s5``,
    the same list-in/list-out convention as PySlowFast so the stage modules line up with theirs.
    """

    def __init__(self, config: DemoModelConfig) -> None:
        super().__init__()
        width, beta_inv, ratio = config.width_per_group, config.beta_inv, config.fusion_conv_channel_ratio
        self.s1 = _VideoStem((width, width // beta_inv))
        self.s1_fuse = _FuseFastToSlow(width // beta_inv, ratio, config.fusion_kernel_size, config.alpha)
        slow_in, fast_in = width + (width // beta_inv) * ratio, width // beta_inv
        for k in range(4):
            inner = width * 2**k
            slow_out, fast_out = inner * _BOTTLENECK_EXPANSION, inner * _BOTTLENECK_EXPANSION // beta_inv
            stage = _ResStage(
                dims_in=(slow_in, fast_in),
                dims_out=(slow_out, fast_out),
                dims_inner=(inner, inner // beta_inv),
                temporal_kernels=_STAGE_TEMPORAL_KERNELS[k],
                stride=_STAGE_SPATIAL_STRIDES[k],
                num_blocks=config.depth[k],
                nonlocal_blocks=config.nonlocal_locations[k],
                nonlocal_pool=config.nonlocal_pool,
            )
            self.add_module(f"s{k + 2}", stage)
            if k < 3:
                fuse = _FuseFastToSlow(fast_out, ratio, config.fusion_kernel_size, config.alpha)
                self.add_module(f"s{k + 2}_fuse", fuse)
            slow_in, fast_in = slow_out + fast_out * ratio, fast_out
        self.dims_out = (slow_out, fast_out)

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        x = self.s1_fuse(self.s1(x))
        for k in range(2, 6):
            x = getattr(self, f"s{k}")(x)
            if k < 5:
                x = getattr(self, f"s{k}_fuse")(x)
        return x


class _ClassificationHead(nn.Module):
    """``stm_head``: global average pool of both pathways, concat, ``fc1`` + ReLU, ``cls``."""

    def __init__(self, dim_in: int, hidden_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden_dim)
        self.relu = nn.ReLU(inplace=True)
        self.cls = nn.Linear(hidden_dim, num_classes)

    def forward(self, features: list[Tensor]) -> Tensor:
        pooled = torch.cat([f.mean(dim=(2, 3, 4)) for f in features], dim=1)
        logits: Tensor = self.cls(self.relu(self.fc1(pooled)))
        return logits


class ActionDetector(nn.Module):
    """``backbone`` (SlowFast) plus ``stm_head``; the module tree STMixer's checkpoints expect.

    Call it as ``model(slow_clip, fast_clip)`` like STMixer's ``STMDetector``: both are
    ``(N, 3, T, H, W)`` with ``T_fast == alpha * T_slow`` and equal ``H, W`` (at least 16 for
    the default non-local pooling). :func:`stmixer_dist_ckpt.demo.data.slow_from_fast` derives
    the slow clip from the fast one. Returns logits ``(N, num_classes)``.
    """

    def __init__(self, config: DemoModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = SlowFastBackbone(config)
        self.stm_head = _ClassificationHead(
            sum(self.backbone.dims_out), config.head_hidden_dim, config.num_classes
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # PySlowFast's init: MSRA convs, unit BN, and zero gamma on each residual branch's
        # last BN (and the non-local BN), so every block starts as the identity and a deep,
        # thin net trains from scratch without warm-up.
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, _BottleneckTransform):
                nn.init.zeros_(module.c_bn.weight)
            elif isinstance(module, _Nonlocal):
                nn.init.zeros_(module.bn.weight)
        nn.init.normal_(self.stm_head.cls.weight, std=0.01)
        nn.init.zeros_(self.stm_head.cls.bias)

    def forward(self, slow_clip: Tensor, fast_clip: Tensor) -> Tensor:
        self._check_clips(slow_clip, fast_clip)
        features: list[Tensor] = self.backbone([slow_clip, fast_clip])
        logits: Tensor = self.stm_head(features)
        return logits

    def _check_clips(self, slow_clip: Tensor, fast_clip: Tensor) -> None:
        # A wrong frame ratio does not fail in a conv: the fusion conv would produce the wrong
        # number of frames and torch.cat would report a cryptic size mismatch three modules later.
        alpha, slow, fast = self.config.alpha, tuple(slow_clip.shape), tuple(fast_clip.shape)
        paired = (
            len(slow) == len(fast) == 5 and slow[:2] == fast[:2] and slow[1] == 3 and slow[3:] == fast[3:]
        )
        if not paired or fast[2] != alpha * slow[2]:
            raise ValueError(
                f"slow clip {slow} and fast clip {fast} do not pair: need (N, 3, T, H, W) clips with "
                f"the same N, H, W and T_fast == alpha * T_slow (alpha={alpha}). "
                "Use stmixer_dist_ckpt.demo.data.slow_from_fast to derive the slow clip."
            )


def build_demo_model(config: DemoModelConfig | None = None) -> ActionDetector:
    """Build the demo detector, in training mode, with PySlowFast's initialization.

    Args:
        config: Model knobs; ``None`` means ``DemoModelConfig()`` (R50 depth, 81 classes).

    Returns:
        A fresh :class:`ActionDetector`; seed ``torch.manual_seed`` first for reproducible weights.

    Example:
        >>> model = build_demo_model(DemoModelConfig(num_classes=4))
        >>> slow, fast = torch.randn(2, 3, 2, 32, 32), torch.randn(2, 3, 8, 32, 32)
        >>> model(slow, fast).shape
        torch.Size([2, 4])
    """
    return ActionDetector(config if config is not None else DemoModelConfig())
