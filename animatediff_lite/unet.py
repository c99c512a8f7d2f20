"""UNet3D: the SD1.5 UNet applied to every frame of a video, with AnimateDiff motion modules between layers.

Frames are folded into the batch for the spatial layers; the motion modules mix information across
frames. With ``motion=None`` this is a plain SD1.5 UNet applied frame by frame. State-dict keys are
diffusers ``UNet2DConditionModel`` keys plus ``{down_blocks.i,up_blocks.i,mid_block}.motion_modules.j.*``
in the original AnimateDiff layout (see ``motion.py``), so an original motion-module checkpoint's keys are
a subset of ``state_dict()``.

Build on the meta device, load with ``loading.io.load_strict`` (assign), then call ``reset_buffers()``
to materialise the non-persistent position tables of the motion modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import MotionConfig, UNetConfig
from .motion import MotionModule, check_frames
from .ops import group_norm
from .unet_blocks import DownBlock, MidBlock, UpBlock


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N,) -> (N, dim) fp32: [sin | cos] of t * max_period^(-i/(dim/2 - freq_shift)).

    ``flip_sin_to_cos`` swaps the halves to [cos | sin] (SD1.5). Odd ``dim`` gets a zero last column.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * (-math.log(max_period))
    freqs = torch.exp(exponent / (half - freq_shift))
    angle = timesteps.float()[:, None] * freqs[None]  # (N, half)
    parts = [angle.cos(), angle.sin()] if flip_sin_to_cos else [angle.sin(), angle.cos()]
    emb = torch.cat(parts, dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepMLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers ``TimestepEmbedding`` names)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class UNet3D(nn.Module):
    """SD1.5 UNet over video latents with optional AnimateDiff motion modules.

    ``config``: sizes of the base UNet. ``motion``: motion-module settings (``MotionConfig.for_version``),
    or None for a per-frame image UNet. Motion modules sit after every resnet(+attention) of the down
    blocks (``layers_per_block`` per level) and up blocks (``layers_per_block + 1`` per level), and in the
    mid block between attention and the second resnet when ``motion.mid_block`` (v2).
    ``motion.joint_groupnorm`` (v1) normalises the resnet GroupNorms and ``conv_norm_out`` jointly over
    all frames of a video (the original runs ``nn.GroupNorm`` on (B, C, F, H, W) there); the spatial
    transformer and motion-module GroupNorms stay per frame in every version.
    """

    def __init__(self, config: UNetConfig, motion: MotionConfig | None = None) -> None:
        super().__init__()
        levels = len(config.block_out_channels)
        if len(config.down_cross_attention) != levels:
            raise ValueError(f"down_cross_attention has {len(config.down_cross_attention)} entries for "
                             f"{levels} block_out_channels")
        if motion is not None and motion.norm_num_groups != config.norm_num_groups:
            raise ValueError(f"motion.norm_num_groups={motion.norm_num_groups} must equal the UNet's "
                             f"norm_num_groups={config.norm_num_groups}")
        self.config, self.motion = config, motion
        self.gradient_checkpointing = False
        ch = config.block_out_channels
        self.joint_norm = motion is not None and motion.joint_groupnorm

        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepMLP(ch[0], config.time_embed_dim)

        # level i maps the previous level's width to its own
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], config, config.down_cross_attention[i], motion,
                      add_downsample=i < levels - 1) for i in range(levels)])

        self.mid_block = MidBlock(ch[-1], config, motion)

        rev, rev_attn = ch[::-1], config.down_cross_attention[::-1]
        # up level i (deepest first): UpBlock(width of its last skip, its own width, width of the level below)
        self.up_blocks = nn.ModuleList([
            UpBlock(rev[min(i + 1, levels - 1)], rev[i], rev[max(i - 1, 0)], config, rev_attn[i], motion,
                    add_upsample=i < levels - 1) for i in range(levels)])

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, 3, padding=1)
        self.kernel_backend = None  # set once per pipeline (ops.set_backend)

    def reset_buffers(self) -> None:
        """Recompute the motion modules' position tables (needed after a meta-device build)."""
        for module in self.modules():
            if isinstance(module, MotionModule):
                module.reset_buffers()

    @property
    def max_frames(self) -> int | None:
        """Most frames one forward accepts (the PE length), None without motion modules."""
        return None if self.motion is None else self.motion.max_position_len

    def _timesteps(self, timestep: int | float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            return torch.full((batch,), float(timestep), device=device)
        if timestep.dim() == 0 or timestep.shape == (1,):
            return timestep.reshape(1).to(device).expand(batch)
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be a number, a 0-d tensor or shape ({batch},), "
                             f"got {tuple(timestep.shape)}")
        return timestep.to(device)

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, sample: torch.Tensor, timestep: int | float | torch.Tensor,
                encoder_hidden_states: torch.Tensor, down_residuals: list[torch.Tensor] | None = None,
                mid_residual: torch.Tensor | None = None) -> torch.Tensor:
        """Predict noise for video latents.

        sample (B, C_in, F, h, w); timestep a number, 0-d or (B,) tensor; encoder_hidden_states (B, L, D),
        or (B*F, L, D) for per-frame text (frame-major within each video) -> (B, C_out, F, h, w).
        down_residuals / mid_residual: ControlNet outputs in the folded (B*F, C, h', w') layout, added to every
        skip tensor of the down path and to the mid block's output (as diffusers' additional residuals).
        """
        if sample.dim() != 5 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"sample must be (batch, {self.config.in_channels}, frames, h, w), "
                             f"got {tuple(sample.shape)}")
        b, c, f, hgt, wid = sample.shape
        if self.motion is not None:
            check_frames(f, self.motion.max_position_len)
        ctx = encoder_hidden_states
        if ctx.dim() != 3 or ctx.shape[0] not in (b, b * f) or ctx.shape[2] != self.config.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states must be ({b}, L, {self.config.cross_attention_dim}) or "
                             f"({b * f}, L, {self.config.cross_attention_dim}), got {tuple(ctx.shape)}")
        if ctx.shape[0] != b * f:
            ctx = ctx.repeat_interleave(f, dim=0)  # (B*F, L, D): the same text for every frame

        t = timestep_embedding(self._timesteps(timestep, b, sample.device), self.config.block_out_channels[0],
                               self.config.flip_sin_to_cos, self.config.freq_shift)
        temb = F.silu(self.time_embedding(t.to(self.conv_in.weight.dtype)))  # (B, T); every resnet uses SiLU(emb)

        x = sample.permute(0, 2, 1, 3, 4).reshape(b * f, c, hgt, wid)  # (B*F, C, h, w)
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = self._run(block, x, temb, ctx, f)
            skips.extend(block_skips)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"down_residuals: {len(down_residuals)} tensors for {len(skips)} skip tensors")
            skips = [s + r for s, r in zip(skips, down_residuals, strict=True)]
        x = self._run(self.mid_block, x, temb, ctx, f)
        if mid_residual is not None:
            x = x + mid_residual
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            up_size = tuple(skips[-1].shape[-2:]) if block.upsamplers is not None else None
            x = self._run(block, x, block_skips, temb, ctx, f, up_size)

        norm = self.conv_norm_out
        x = group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=True,
                       frames=f if self.joint_norm else None, backend=self.kernel_backend)
        x = self.conv_out(x)
        return x.reshape(b, f, -1, hgt, wid).permute(0, 2, 1, 3, 4)  # (B, C_out, F, h, w)
