"""ControlNet for SD1.5: a trainable copy of the UNet's encoder steered by a condition image.

The encoder reuses the UNet's own blocks (:class:`~animatediff_lite.unet_blocks.DownBlock` and
:class:`~animatediff_lite.unet_blocks.MidBlock`); on top come the condition embedding (a small conv stack
taking the condition image down to latent size, ending in a zero-initialised conv) and one zero-initialised
1x1 conv per skip tensor and for the mid block. The outputs, times ``scale``, are added to the UNet3D's skip
tensors and mid-block output (``UNet3D.forward(down_residuals=, mid_residual=)``).

Video frames are folded into the batch, so a ControlNet acts on every frame on its own, as in diffusers'
``AnimateDiffControlNetPipeline``. With a ``motion`` config the down blocks get motion modules (SparseCtrl,
see :mod:`animatediff_lite.sparsectrl`). State-dict keys are diffusers ``ControlNetModel`` keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import MotionConfig, UNetConfig
from .unet import TimestepMLP, timestep_embedding
from .unet_blocks import DownBlock, MidBlock


@dataclass(frozen=True)
class ControlNetConfig:
    """Sizes of a ControlNet: the UNet encoder it copies, plus its condition embedding.

    ``embedding_channels``: widths of the condition embedding's conv stack (SD1.5: 16, 32, 96, 256; each
    step after the first halves the size, so ``len - 1`` halvings must equal the VAE's downsampling).
    ``conditioning_channels``: channels of the condition image (3, RGB in [0, 1]).
    """

    unet: UNetConfig = UNetConfig()
    conditioning_channels: int = 3
    embedding_channels: tuple[int, ...] = (16, 32, 96, 256)


class ConditionEmbedding(nn.Module):
    """conv3x3 -> SiLU -> (conv3x3 -> SiLU -> conv3x3 stride 2 -> SiLU) per step -> zero conv3x3.

    Maps a (N, conditioning_channels, H, W) image to (N, out_channels, H / 2^(steps), W / 2^(steps)).
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...], out_channels: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        blocks = []
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            blocks += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.Conv2d(c_in, c_out, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class ControlNet(nn.Module):
    """The SD1.5 ControlNet (diffusers ``ControlNetModel`` keys), applied to frames folded into the batch.

    ``motion``: motion modules in the down blocks (SparseCtrl's encoder); None for a per-frame ControlNet.
    """

    def __init__(self, config: ControlNetConfig, motion: MotionConfig | None = None) -> None:
        super().__init__()
        self.config, self.motion = config, motion
        u = config.unet
        ch = u.block_out_channels
        self.conv_in = nn.Conv2d(u.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepMLP(ch[0], u.time_embed_dim)
        self.controlnet_cond_embedding = ConditionEmbedding(config.conditioning_channels,
                                                            config.embedding_channels, ch[0])
        self.down_blocks = nn.ModuleList()
        zero_convs = [nn.Conv2d(ch[0], ch[0], 1)]  # one per skip tensor of the UNet, conv_in's first
        out_c = ch[0]
        for i, c in enumerate(ch):
            last = i == len(ch) - 1
            in_c, out_c = out_c, c
            self.down_blocks.append(DownBlock(in_c, out_c, u, u.down_cross_attention[i], motion,
                                              add_downsample=not last))
            zero_convs += [nn.Conv2d(out_c, out_c, 1) for _ in range(u.layers_per_block + (0 if last else 1))]
        self.controlnet_down_blocks = nn.ModuleList(zero_convs)
        self.mid_block = MidBlock(ch[-1], u, None)
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)

    def reset_buffers(self) -> None:
        """Recompute motion-module position tables (SparseCtrl) after a meta-device build; no-op otherwise."""
        for block in self.down_blocks:
            for m in block.motion_modules or ():
                m.reset_buffers()

    def embed_time(self, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        """(SiLU of) the time embedding (batch, T) for a 0-d or (batch,) timestep tensor."""
        t = timestep.reshape(-1).to(self.conv_in.weight.device).expand(batch)
        u = self.config.unet
        emb = timestep_embedding(t, u.block_out_channels[0], u.flip_sin_to_cos, u.freq_shift)
        return F.silu(self.time_embedding(emb.to(self.conv_in.weight.dtype)))

    def encode(self, x: torch.Tensor, cond: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
               frames: int, scale: float) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The residuals for folded inputs: x (B*F, C, h, w) latents, cond (B*F, C_embed, h, w) the condition
        already embedded to ``conv_in``'s width, temb (B, T), context (B*F, L, D).

        Returns (one residual per UNet skip tensor, the mid-block residual), each times ``scale``.
        """
        h = self.conv_in(x) + cond
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context, frames)
            skips.extend(block_skips)
        h = self.mid_block(h, temb, context, frames)
        down = [conv(s) * scale for conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        return down, self.controlnet_mid_block(h) * scale

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                cond: torch.Tensor, scale: float = 1.0) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-frame ControlNet on video latents.

        sample (B, C, F, h, w); timestep 0-d or (B,); encoder_hidden_states (B, L, D) or (B*F, L, D);
        cond (B*F, conditioning_channels, H, W) condition images in [0, 1], frame-major within each video.
        Returns residuals in the UNet3D's folded layout (B*F, C, h', w') and the mid residual.
        """
        b, c, f, hgt, wid = sample.shape
        x = sample.permute(0, 2, 1, 3, 4).reshape(b * f, c, hgt, wid)
        ctx = encoder_hidden_states
        if ctx.shape[0] != b * f:
            ctx = ctx.repeat_interleave(f, dim=0)
        if cond.shape[0] != b * f:
            raise ValueError(f"cond must hold {b * f} condition images (batch x frames), got {cond.shape[0]}")
        temb = self.embed_time(timestep, b)
        return self.encode(x, self.controlnet_cond_embedding(cond.to(x.dtype)), temb, ctx, f, scale)
