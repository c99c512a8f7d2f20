"""Spatial building blocks of the SD1.5 UNet, applied to frames folded into the batch.

Every tensor here is (B*F, C, H, W) with the F frames of one video contiguous; ``frames`` is passed
along for the motion modules and for AnimateDiff v1's GroupNorm over all frames of a video. Module and
parameter names are those of diffusers' ``UNet2DConditionModel`` (plus ``motion_modules`` as in the
original AnimateDiff ``UNet3DConditionModel``), so checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import MotionConfig, UNetConfig
from .motion import FeedForward, MotionModule
from .ops import group_norm


class ResnetBlock(nn.Module):
    """GroupNorm+SiLU -> conv3x3 -> + time embedding -> GroupNorm+SiLU -> conv3x3, plus a (1x1) shortcut.

    ``joint_norm``: normalise over all frames of a video (AnimateDiff v1) instead of per frame.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float,
                 joint_norm: bool = False) -> None:
        super().__init__()
        self.joint_norm = joint_norm
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.kernel_backend = None  # set once per pipeline (ops.set_backend)

    def _norm(self, norm: nn.GroupNorm, x: torch.Tensor, frames: int) -> torch.Tensor:
        return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=True,
                          frames=frames if self.joint_norm else None, backend=self.kernel_backend)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, frames: int) -> torch.Tensor:
        """x (B*F, Cin, H, W), temb (B, T) already through SiLU -> (B*F, Cout, H, W)."""
        h = self.conv1(self._norm(self.norm1, x, frames))
        bf, c, hgt, wid = h.shape
        # One time embedding per video, broadcast over its frames: (B, Cout) -> (B, 1, Cout, 1, 1).
        t = self.time_emb_proj(temb)[:, None, :, None, None]
        h = (h.reshape(bf // frames, frames, c, hgt, wid) + t).reshape(bf, c, hgt, wid)
        h = self.conv2(self._norm(self.norm2, h, frames))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class CrossAttention(nn.Module):
    """Multi-head attention of x (N, L, C) over context (N, S, Cc) (itself when context is None)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.kernel_backend = None  # set once per pipeline (ops.set_backend)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        n, length, c = x.shape
        h = self.heads
        q = self.to_q(x).reshape(n, length, h, c // h).transpose(1, 2)  # (N, heads, L, d)
        k = self.to_k(ctx).reshape(n, ctx.shape[1], h, c // h).transpose(1, 2)
        v = self.to_v(ctx).reshape(n, ctx.shape[1], h, c // h).transpose(1, 2)
        out = attention(q, k, v, backend=self.kernel_backend).transpose(1, 2).reshape(n, length, c)
        return self.to_out[0](out)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward; residual each."""

    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """diffusers Transformer2DModel: GroupNorm -> proj_in -> blocks over H*W tokens -> proj_out -> + x.

    proj_in/proj_out are 1x1 convs, or linears when ``config.use_linear_projection``.
    """

    def __init__(self, channels: int, config: UNetConfig) -> None:
        super().__init__()
        self.linear = config.use_linear_projection
        heads = config.attention_head_dim  # the SD1.5 quirk: this is the number of heads
        if channels % heads:
            raise ValueError(f"UNet channels {channels} not divisible by attention_head_dim={heads} (heads)")
        self.norm = nn.GroupNorm(config.norm_num_groups, channels, eps=1e-6)
        proj = nn.Linear if self.linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, config.cross_attention_dim)
             for _ in range(config.transformer_layers_per_block)])
        self.proj_out = proj(channels, channels)
        self.kernel_backend = None  # set once per pipeline (ops.set_backend)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W), context (N, S, D) -> (N, C, H, W)."""
        n, c, hgt, wid = x.shape
        h = group_norm(x, self.norm.num_groups, self.norm.weight, self.norm.bias, self.norm.eps,
                       backend=self.kernel_backend)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(n, hgt * wid, c)  # (N, H*W, C) tokens
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(n, hgt, wid, c).permute(0, 3, 1, 2)
        if not self.linear:
            h = self.proj_out(h)
        return h + x


class Downsample(nn.Module):
    """conv3x3 with stride 2 (key ``downsamplers.0.conv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to ``size`` (2x, or the skip's size for odd sizes), then conv3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        dtype = x.dtype
        # nearest upsampling has no bf16 kernel on some backends; it is exact in fp32.
        y = F.interpolate(x.float() if dtype == torch.bfloat16 else x, size=size, mode="nearest")
        return self.conv(y.to(dtype))


def _motion_list(channels: int, count: int, motion: MotionConfig | None) -> nn.ModuleList | None:
    return None if motion is None else nn.ModuleList([MotionModule(channels, motion) for _ in range(count)])


def _resnet(in_channels: int, out_channels: int, config: UNetConfig, motion: MotionConfig | None) -> ResnetBlock:
    joint = motion is not None and motion.joint_groupnorm  # AnimateDiff v1
    return ResnetBlock(in_channels, out_channels, config.time_embed_dim, config.norm_num_groups, config.norm_eps,
                       joint)


def _attend(block: nn.Module, j: int, x: torch.Tensor, context: torch.Tensor, frames: int) -> torch.Tensor:
    """Layer j's spatial transformer and motion module of ``block`` after its resnet, where the block has them."""
    if block.attentions is not None:
        x = block.attentions[j](x, context)
    if block.motion_modules is not None:
        x = block.motion_modules[j](x, frames)
    return x


class DownBlock(nn.Module):
    """``layers_per_block`` x (resnet [-> spatial transformer] [-> motion module]) [-> downsample]."""

    def __init__(self, in_channels: int, out_channels: int, config: UNetConfig, cross_attention: bool,
                 motion: MotionConfig | None, add_downsample: bool) -> None:
        super().__init__()
        n = config.layers_per_block
        self.resnets = nn.ModuleList(
            [_resnet(in_channels if j == 0 else out_channels, out_channels, config, motion) for j in range(n)])
        self.attentions = (nn.ModuleList([SpatialTransformer(out_channels, config) for _ in range(n)])
                           if cross_attention else None)
        self.motion_modules = _motion_list(out_channels, n, motion)
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if add_downsample else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                frames: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (output, skip tensors for the up path, one per layer plus one after the downsampler)."""
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = _attend(self, j, resnet(x, temb, frames), context, frames)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """resnet -> spatial transformer [-> motion module (v2)] -> resnet."""

    def __init__(self, channels: int, config: UNetConfig, motion: MotionConfig | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(channels, channels, config, motion) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialTransformer(channels, config)])
        self.motion_modules = _motion_list(channels, 1, motion if motion is not None and motion.mid_block else None)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, frames: int) -> torch.Tensor:
        x = _attend(self, 0, self.resnets[0](x, temb, frames), context, frames)
        return self.resnets[1](x, temb, frames)


class UpBlock(nn.Module):
    """``layers_per_block + 1`` x (concat skip -> resnet [-> spatial transformer] [-> motion]) [-> upsample]."""

    def __init__(self, in_channels: int, out_channels: int, prev_channels: int, config: UNetConfig,
                 cross_attention: bool, motion: MotionConfig | None, add_upsample: bool) -> None:
        super().__init__()
        n = config.layers_per_block + 1
        resnets = []
        for j in range(n):
            skip = in_channels if j == n - 1 else out_channels
            resnet_in = prev_channels if j == 0 else out_channels
            resnets.append(_resnet(resnet_in + skip, out_channels, config, motion))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = (nn.ModuleList([SpatialTransformer(out_channels, config) for _ in range(n)])
                           if cross_attention else None)
        self.motion_modules = _motion_list(out_channels, n, motion)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor,
                frames: int, up_size: tuple[int, int] | None) -> torch.Tensor:
        """skips: this block's skip tensors, consumed last first; up_size: (H, W) after upsampling."""
        for j, resnet in enumerate(self.resnets):
            x = _attend(self, j, resnet(torch.cat([x, skips[-1 - j]], dim=1), temb, frames), context, frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, up_size)
        return x
