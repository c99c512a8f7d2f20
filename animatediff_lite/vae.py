"""AutoencoderKL: the SD "kl-f8" VAE, with frame-chunked video encode/decode.

Parameter names equal diffusers' ``AutoencoderKL`` state_dict keys, so a diffusers ``vae/`` folder loads
with an identity map (other layouts are mapped in ``loading/vae_map.py``). Images are in [-1, 1];
latents of ``encode``/``decode`` are scaled by ``config.scaling_factor``, those of
``encode_frames``/``decode_frames`` are not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import VAEConfig
from .ops import group_norm

NORM_EPS = 1e-6


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"norm_num_groups={groups} must divide every channel width, got a width of {channels}")
    return nn.GroupNorm(groups, channels, eps=NORM_EPS)


def _norm_act(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = True, backend=None) -> torch.Tensor:
    return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=silu, backend=backend)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice plus a (1x1 conv when widths differ) shortcut; no time embedding."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.kernel_backend = None  # set once per pipeline (ops.set_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_norm_act(self.norm1, x, backend=self.kernel_backend))
        h = self.conv2(_norm_act(self.norm2, h, backend=self.kernel_backend))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W pixels of each image, with a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])
        self.kernel_backend = None  # set once per pipeline (ops.set_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        t = _norm_act(self.group_norm, x, silu=False, backend=self.kernel_backend)
        t = t.reshape(n, c, h * w).transpose(1, 2)  # (N, HW, C)
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (N, 1, HW, C)
        out = self.to_out[0](attention(q, k, v, backend=self.kernel_backend).squeeze(1))  # (N, HW, C)
        return x + out.transpose(1, 2).reshape(n, c, h, w)


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only (as the reference)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# One level of the encoder / decoder: resnets, then the resampler of every level but the last. Sequentials
# (of one resampler, or empty) keep diffusers' keys: ``resnets.{j}.*``, ``downsamplers.0.conv``.
def _resnets(in_channels: int, out_channels: int, layers: int, groups: int) -> nn.Sequential:
    return nn.Sequential(*[ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                           for i in range(layers)])


class EncoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, layers, groups)
        self.downsamplers = nn.Sequential(*([Downsample(out_channels)] if downsample else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsamplers(self.resnets(x))


class DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = _resnets(in_channels, out_channels, layers, groups)
        self.upsamplers = nn.Sequential(*([Upsample(out_channels)] if upsample else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsamplers(self.resnets(x))


class Encoder(nn.Module):
    """(N, in, H, W) -> (N, 2*latent, H/f, W/f) with f = 2**(levels-1): mean and log-variance moments."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.Sequential(*[
            EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)
        self.kernel_backend = None  # set once per pipeline (ops.set_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.down_blocks(self.conv_in(x)))
        return self.conv_out(_norm_act(self.conv_norm_out, x, backend=self.kernel_backend))


class Decoder(nn.Module):
    """(N, latent, h, w) -> (N, out, h*f, w*f); up_blocks run from the lowest resolution upwards."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.Sequential(*[
            DecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)
        self.kernel_backend = None  # set once per pipeline (ops.set_backend)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.up_blocks(self.mid_block(self.conv_in(z)))
        return self.conv_out(_norm_act(self.conv_norm_out, x, backend=self.kernel_backend))


class AutoencoderKL(nn.Module):
    """The SD VAE. Build on the meta device (``with torch.device("meta")``) and load with ``loading.load_vae``."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        if not config.block_out_channels:
            raise ValueError("config.block_out_channels must name at least one level")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side (8 for SD1.5)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def _check_size(self, height: int, width: int) -> None:
        f = self.downsample_factor
        for name, size in (("height", height), ("width", width)):
            if size % f:
                raise ValueError(f"image {name} must be a multiple of {f} for this VAE, got {size}")

    def encode_frames(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images x (N, in, H, W) in [-1, 1] -> (mean, logvar), each (N, latent, H/f, W/f), unscaled.

        logvar is clamped to [-30, 20] like the reference's diagonal Gaussian.
        """
        if x.ndim != 4:
            raise ValueError(f"encode_frames expects x of shape (N, C, H, W), got {tuple(x.shape)}")
        self._check_size(x.shape[-2], x.shape[-1])
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents z (N, latent, h, w) -> images (N, out, h*f, w*f), raw (not clamped)."""
        if z.ndim != 4:
            raise ValueError(f"decode_frames expects z of shape (N, C, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True,
               chunk_size: int = 8) -> torch.Tensor:
        """Video (B, in, F, H, W) in [-1, 1] -> scaled latents (B, latent, F, H/f, W/f).

        ``sample=True`` returns mean + std * noise, the noise (B*F, latent, h, w) (frames batch-major)
        drawn in one call on the generator's device (the CPU for a CPU generator, the global CPU RNG
        when None) and then moved: a CPU seed gives the same latents on every device and for any
        ``chunk_size``, equal to diffusers' ``vae.encode(frames).latent_dist.sample(cpu_generator)``
        on all B*F frames at once (as AnimateDiff training encodes them).
        ``sample=False`` returns the mean. Frames pass through the network ``chunk_size`` at a time.
        """
        if video.ndim != 5:
            raise ValueError(f"encode expects video of shape (B, C, F, H, W), got {tuple(video.shape)}")
        _check_chunk(chunk_size)
        b, c, f, h, w = video.shape
        self._check_size(h, w)
        dtype = self.quant_conv.weight.dtype
        frames = video.transpose(1, 2).reshape(b * f, c, h, w).to(dtype)  # (B*F, C, H, W), batch-major
        hl, wl = h // self.downsample_factor, w // self.downsample_factor
        noise = None
        if sample:
            device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn((b * f, self.config.latent_channels, hl, wl), generator=generator, dtype=dtype,
                                device=device)
        out = []
        for s in range(0, b * f, chunk_size):
            mean, logvar = self.encode_frames(frames[s:s + chunk_size])
            if noise is not None:
                mean = mean + torch.exp(0.5 * logvar) * noise[s:s + chunk_size].to(mean.device)
            out.append(mean)
        z = torch.cat(out) * self.config.scaling_factor  # (B*F, latent, h, w)
        return z.reshape(b, f, *z.shape[1:]).transpose(1, 2)

    def decode(self, latents: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
        """Scaled latents (B, latent, F, h, w) -> video (B, out, F, h*f, w*f), nominally in [-1, 1], unclamped.

        Divides by ``config.scaling_factor`` and decodes ``chunk_size`` frames at a time, so peak memory
        does not grow with the number of frames.
        """
        if latents.ndim != 5:
            raise ValueError(f"decode expects latents of shape (B, C, F, h, w), got {tuple(latents.shape)}")
        _check_chunk(chunk_size)
        b, c, f, h, w = latents.shape
        z = latents.transpose(1, 2).reshape(b * f, c, h, w).to(self.post_quant_conv.weight.dtype)
        z = z / self.config.scaling_factor
        x = torch.cat([self.decode_frames(z[s:s + chunk_size]) for s in range(0, b * f, chunk_size)])
        return x.reshape(b, f, *x.shape[1:]).transpose(1, 2)


def _check_chunk(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
