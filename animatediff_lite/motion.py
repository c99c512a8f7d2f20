"""AnimateDiff motion module: a temporal transformer that mixes information across frames.

One ``MotionModule`` is the original "VanillaTemporalModule" for one UNet width: per-frame GroupNorm,
``proj_in``, one transformer block of temporal self-attention blocks (each: LayerNorm, sinusoidal
position encoding added to the normed input, attention over the frames of every pixel, residual), a
LayerNorm + GEGLU feed-forward with residual, then a zero-initialised ``proj_out`` and an outer residual.

Layout: frames are folded into the batch, ``x`` is (B*F, C, H, W) with the ``frames`` of one video
contiguous, the same layout the UNet's spatial layers use, so no transposes are needed between them.
Parameter names follow the original AnimateDiff checkpoints (``temporal_transformer.*``); the position
table is a non-persistent buffer at ``...attention_blocks.{n}.pos_encoder.pe`` (not in ``state_dict``).

Fused projections: each temporal attention keeps cat([to_q, to_k, to_v]) (3C, C) and the PE projected through it
((L, 3C), fp32) as non-persistent buffers made once (not in ``state_dict``: keys and files are unchanged) and
remade only when a projection weight changes (an in-place LoRA merge moves its version counter; a load, ``.to``
or reassignment changes its storage). See :meth:`TemporalAttention.fused_projections`. Cost: the q/k/v weights
are held twice (236 MiB in fp16 for SD1.5's v2 motion modules); ``set_fused_projections(model, False)`` frees it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import attention
from .config import MotionConfig
from .kernels._backend import needs_grad
from .ops import geglu, group_norm, temporal_attention


def sinusoidal_table(length: int, dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The AnimateDiff/Transformer position table (1, length, dim), fp32.

    Row ``p``, column ``2i`` holds sin(p / 10000^(2i/dim)) and column ``2i+1`` cos of the same angle.
    ``dim`` must be even (it is the channel count of a UNet level).
    """
    if dim % 2:
        raise ValueError(f"sinusoidal position table needs an even dim, got dim={dim}")
    position = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    angle = position * inv_freq  # (length, dim/2)
    # Interleave: even columns sin, odd columns cos.
    table = torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(length, dim)
    return table[None]


class PositionEncoding(nn.Module):
    """Holds the position table as a non-persistent buffer ``pe`` (1, max_len, dim)."""

    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        self.dim, self.max_len = dim, max_len
        # Built on the CPU even inside a meta-device build: a float arange on meta pulls in torch's symbolic
        # machinery (2 s, ~150 MB per process); loaders call reset() to move it where the weights are.
        self.register_buffer("pe", sinusoidal_table(max_len, dim, device="cpu"), persistent=False)

    def reset(self, device: torch.device | str) -> None:
        """Recompute the table on ``device`` (replaces a meta buffer after a meta-device build)."""
        self.pe = sinusoidal_table(self.max_len, self.dim, device=device)


class TemporalAttention(nn.Module):
    """Self-attention over frames: tokens (N, F, C) -> (N, F, C), N = batch * pixels."""

    def __init__(self, dim: int, num_heads: int, max_len: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"motion module channels {dim} are not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # ".0" in the key names, as in the checkpoints
        self.pos_encoder = PositionEncoding(dim, max_len)
        self.kernel_backend = None  # set once per pipeline (ops.set_backend); None: the environment variable
        self.fuse = True  # keep the fused q/k/v weight (a benchmark lever; False concatenates per call)
        self.register_buffer("qkv_weight", None, persistent=False)  # (3C, C) = cat(to_q, to_k, to_v)
        self.register_buffer("pe_qkv", None, persistent=False)  # (L, 3C) fp32 = pe @ qkv_weight^T
        self._fused_key: tuple | None = None

    def _projection_key(self) -> tuple:
        ws = (self.to_q.weight, self.to_k.weight, self.to_v.weight, self.pos_encoder.pe)
        return tuple((w.device, w.dtype, w.data_ptr(), w._version) for w in ws)

    def fused_projections(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(qkv_weight (3C, C), pe_qkv (L, 3C) fp32), made once; (None, None) when ``fuse`` is off.

        Remade when a projection weight or the PE table changed since: in place (its version counter moves, as
        in a LoRA/MotionLoRA merge or unmerge) or by replacement (load, ``.to``: another storage). Inside a
        torch.compile trace the cache is used as it stands (``Pipeline`` refreshes it before each generation),
        and made inside the graph if there is none.
        """
        if not self.fuse:
            return None, None
        if torch.compiler.is_compiling():
            return (self.qkv_weight, self.pe_qkv) if self.qkv_weight is not None else self._fuse()
        key = self._projection_key()
        if key != self._fused_key:
            self.qkv_weight, self.pe_qkv = self._fuse()
            self._fused_key = key
        return self.qkv_weight, self.pe_qkv

    def _fuse(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])  # (3C, C)
            pe = self.pos_encoder.pe.reshape(-1, w.shape[1]).to(w.device, torch.float32) @ w.float().t()
        return w, pe

    def has_hooks(self) -> bool:
        """True when a forward hook sits on a projection, so the fused op (which reads weights) cannot be used."""
        projs = (self.to_q, self.to_k, self.to_v, self.to_out[0])
        return any(p._forward_hooks or p._forward_pre_hooks for p in projs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, f, c = x.shape
        x = x + self.pos_encoder.pe[:, :f].to(x.dtype)  # the PE feeds q, k and v (not the residual)
        h, d = self.num_heads, c // self.num_heads
        q, k, v = (proj(x).reshape(n, f, h, d).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        out = attention(q, k, v, backend=self.kernel_backend)  # (N, heads, F, d)
        return self.to_out[0](out.transpose(1, 2).reshape(n, f, c))


class FeedForward(nn.Module):
    """GEGLU feed-forward C -> 2*mult*C (value, gate) -> mult*C -> C; keys ``net.0.proj``, ``net.2``."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, 2 * mult * dim)
        # net.1 is a dropout in the reference; an Identity keeps the index of net.2.
        self.net = nn.ModuleList([proj, nn.Identity(), nn.Linear(mult * dim, dim)])
        self.kernel_backend = None  # set once per pipeline (ops.set_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](geglu(self.net[0].proj(x), backend=self.kernel_backend))


class TemporalTransformerBlock(nn.Module):
    """Pre-norm temporal self-attention blocks, then a pre-norm feed-forward, each with a residual."""

    def __init__(self, dim: int, config: MotionConfig) -> None:
        super().__init__()
        n = config.num_attention_blocks
        self.attention_blocks = nn.ModuleList(
            [TemporalAttention(dim, config.num_heads, config.max_position_len) for _ in range(n)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(n)])
        self.ff = FeedForward(dim, config.ff_mult)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms, strict=True):
            if attn.has_hooks():  # e.g. MotionLoRA training adapters: they live on the projection modules
                x = attn(norm(x)) + x
            else:  # LayerNorm + PE + attention + out proj + residual as one op (fused kernel on CUDA)
                # The cache serves inference only: trained projections change every step and need their own grads.
                trained = needs_grad(attn.to_q.weight, attn.to_k.weight, attn.to_v.weight)
                qkv_weight, pe_qkv = (None, None) if trained else attn.fused_projections()
                x = temporal_attention(x, norm.weight, norm.bias, attn.to_q.weight, attn.to_k.weight,
                                       attn.to_v.weight, attn.to_out[0].weight, attn.to_out[0].bias,
                                       attn.num_heads, pe=attn.pos_encoder.pe, eps=norm.eps,
                                       backend=attn.kernel_backend, qkv_weight=qkv_weight, pe_qkv=pe_qkv)
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer(nn.Module):
    """GroupNorm (per frame) -> proj_in -> transformer block -> proj_out, with an outer residual."""

    def __init__(self, channels: int, config: MotionConfig) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(config.norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.Sequential(TemporalTransformerBlock(channels, config))  # key "...blocks.0"
        self.proj_out = nn.Linear(channels, channels)
        self.kernel_backend = None  # set once per pipeline (ops.set_backend)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        bf, c, hgt, wid = x.shape
        b = bf // frames
        # Per-frame statistics, as in the original (diffusers normalises jointly over frames instead).
        h = group_norm(x, self.norm.num_groups, self.norm.weight, self.norm.bias, self.norm.eps,
                       backend=self.kernel_backend)
        # (B*F, C, H, W) -> (B*H*W, F, C): one sequence of frames per pixel.
        h = h.reshape(b, frames, c, hgt * wid).permute(0, 3, 1, 2).reshape(b * hgt * wid, frames, c)
        h = self.proj_in(h)
        h = self.transformer_blocks(h)
        h = self.proj_out(h)
        h = h.reshape(b, hgt * wid, frames, c).permute(0, 2, 3, 1).reshape(bf, c, hgt, wid)
        return h + x


class MotionModule(nn.Module):
    """AnimateDiff "VanillaTemporalModule" for ``channels`` channels.

    ``forward(x, frames)``: x (B*F, C, H, W) with the F frames of each video contiguous in the batch
    -> same shape. ``frames`` must not exceed ``config.max_position_len`` (ValueError otherwise).
    """

    def __init__(self, channels: int, config: MotionConfig) -> None:
        super().__init__()
        if channels % config.norm_num_groups:
            raise ValueError(f"motion module channels {channels} not divisible by "
                             f"norm_num_groups={config.norm_num_groups}")
        self.channels = channels
        self.max_position_len = config.max_position_len
        self.temporal_transformer = TemporalTransformer(channels, config)
        self._init_weights()

    def _init_weights(self) -> None:
        # The module starts as the identity (AnimateDiff's zero_initialize); the rest keeps torch defaults.
        nn.init.zeros_(self.temporal_transformer.proj_out.weight)
        nn.init.zeros_(self.temporal_transformer.proj_out.bias)

    def reset_buffers(self) -> None:
        """Recompute the position tables (after a build on the meta device and an ``assign`` load).

        They go to the device of the module's weights (CPU while those are still on meta).
        """
        device = self.temporal_transformer.proj_in.weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        for module in self.modules():
            if isinstance(module, PositionEncoding):
                module.reset(device)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """x (B*F, C, H, W) -> (B*F, C, H, W); mixes information across the F frames of each pixel."""
        check_frames(frames, self.max_position_len)
        if x.shape[0] % frames:
            raise ValueError(f"batch {x.shape[0]} of the motion module input is not a multiple of frames={frames}")
        return self.temporal_transformer(x, frames)


def refresh_fused_projections(model: nn.Module) -> int:
    """Bring every temporal attention's fused q/k/v cache of ``model`` up to date (outside any compiled graph);
    returns how many there are."""
    attentions = [m for m in model.modules() if isinstance(m, TemporalAttention)]
    for module in attentions:
        module.fused_projections()
    return len(attentions)


def set_fused_projections(model: nn.Module, enabled: bool) -> None:
    """Switch the fused q/k/v weights of every temporal attention on or off (off frees the caches)."""
    for module in model.modules():
        if isinstance(module, TemporalAttention):
            module.fuse = enabled
            module.qkv_weight = module.pe_qkv = module._fused_key = None


def check_frames(frames: int, max_len: int) -> None:
    """ValueError when ``frames`` does not fit a motion module whose PE holds ``max_len`` positions."""
    if frames > max_len:
        raise ValueError(
            f"{frames} frames exceed the motion module's position encoding length {max_len}: generate at most "
            f"{max_len} frames at once, or use context windows (sliding windows of <= {max_len} frames)")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
