"""GroupNorm (+ optional SiLU), per frame or jointly over the frames of a video, fp32 statistics.

x (N, C, *spatial) contiguous, N = B*F when frames are folded into the batch. Two launches:
1. stats: one program per (sample, group) reduces its C/G * HW contiguous elements to (mean, M2): Welford per
   lane, then Chan's combination of the lanes (no E[x^2] - E[x]^2 cancellation);
2. apply: one program per (sample, group, chunk) combines the (mean, M2) of the FRAMES samples of its video
   (FRAMES = 1: per frame) and writes (x - mean) * rstd * w + b, then SiLU, in one pass.
Joint statistics (AnimateDiff v1) thus need no (B, C, F, H, W) transpose copies, and the per-frame partials
keep B*F*G programs busy instead of B*G. Memory: 2 reads + 1 write of x (PyTorch: 2 + 1, plus 1 + 1 for the
SiLU, plus transposes when joint). Forward only: callers fall back to PyTorch when autograd records.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._backend import check_runnable, is_interpreted, next_pow2
from .reference import group_norm_reference  # noqa: F401  (the reference beside its kernel)


@triton.jit
def _gn_stats_kernel(X, MEAN, M2, group_numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # = sample * G + group; groups are contiguous in NCHW
    base = X + pid * group_numel
    offs = tl.arange(0, BLOCK)
    # Welford per lane (no cross-lane reduction inside the loop), Chan's combination of the lanes at the end.
    mean = tl.zeros([BLOCK], dtype=tl.float32)
    m2 = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, group_numel, BLOCK):
        mask = start + offs < group_numel
        x = tl.load(base + start + offs, mask=mask, other=0.0).to(tl.float32)
        new_count = count + mask.to(tl.float32)
        delta = x - mean
        mean = tl.where(mask, mean + delta / tl.maximum(new_count, 1.0), mean)
        m2 = tl.where(mask, m2 + delta * (x - mean), m2)
        count = new_count
    total = tl.sum(count, 0)
    g_mean = tl.sum(count * mean, 0) / total
    dm = mean - g_mean
    g_m2 = tl.sum(m2, 0) + tl.sum(count * dm * dm, 0)
    tl.store(MEAN + pid, g_mean)
    tl.store(M2 + pid, g_m2)


@triton.jit
def _gn_apply_kernel(X, Y, W, B, MEAN, M2, G, channels_per_group, hw, group_numel, eps,
                     FRAMES: tl.constexpr, FRAMES_P2: tl.constexpr, BLOCK: tl.constexpr,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # sample * G + group
    chunk = tl.program_id(1)
    sample = pid // G
    g = pid % G
    # Partials of the FRAMES samples of this video, group g: combine equal-count moments.
    j = tl.arange(0, FRAMES_P2)
    first = (sample // FRAMES) * FRAMES
    part = (first + j) * G + g
    jm = j < FRAMES
    means = tl.load(MEAN + part, mask=jm, other=0.0)
    m2s = tl.load(M2 + part, mask=jm, other=0.0)
    mean = tl.sum(means, 0) / FRAMES
    dm = tl.where(jm, means - mean, 0.0)
    var = (tl.sum(m2s, 0) + group_numel * tl.sum(dm * dm, 0)) / (group_numel * FRAMES)
    rstd = 1.0 / tl.sqrt(var + eps)

    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < group_numel
    x = tl.load(X + pid * group_numel + offs, mask=mask, other=0.0).to(tl.float32)
    y = (x - mean) * rstd
    if HAS_W or HAS_B:
        c = g * channels_per_group + offs // hw
        if HAS_W:
            y = y * tl.load(W + c, mask=mask, other=1.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + c, mask=mask, other=0.0).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + pid * group_numel + offs, y.to(Y.dtype.element_ty), mask=mask)


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float, silu: bool = False, frames: int = 1, block: int | None = None,
                    num_warps: int | None = None) -> torch.Tensor:
    """Triton launcher, semantics of ``group_norm_reference``: x (N, C, *spatial) -> same shape and dtype.

    ``frames``: statistics jointly over groups of ``frames`` consecutive samples (1: per sample).
    ``block``: elements per program of the apply pass (power of two).
    """
    n, c = x.shape[:2]
    if c % num_groups:
        raise ValueError(f"channels {c} not divisible by num_groups={num_groups}")
    if frames < 1 or n % frames:
        raise ValueError(f"batch {n} is not a multiple of frames={frames}")
    check_runnable(_gn_apply_kernel, x)
    x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    hw = x[0, 0].numel()
    cpg = c // num_groups
    group_numel = cpg * hw
    interp = is_interpreted(_gn_apply_kernel)
    block = block or (256 if interp else min(4096, max(512, next_pow2(group_numel))))
    stats_block = 256 if interp else 2048  # 8 warps: 16-byte loads for 16-bit types
    mean = torch.empty(n * num_groups, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    warps = num_warps or (4 if block <= 1024 else 8)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _gn_stats_kernel[(n * num_groups,)](x, mean, m2, group_numel, BLOCK=stats_block, num_warps=8)
        _gn_apply_kernel[(n * num_groups, triton.cdiv(group_numel, block))](
            x, y, weight if weight is not None else x, bias if bias is not None else x, mean, m2,
            num_groups, cpg, hw, group_numel, eps, FRAMES=frames, FRAMES_P2=next_pow2(frames), BLOCK=block,
            HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, num_warps=warps)
    return y


@torch.library.custom_op("animatediff_lite::group_norm_silu", mutates_args=())
def group_norm_silu_op(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       eps: float, silu: bool, frames: int) -> torch.Tensor:
    """The Triton GroupNorm(+SiLU) as an opaque op for torch.compile graphs."""
    return group_norm_silu(x, num_groups, weight, bias, eps, silu, frames)


@group_norm_silu_op.register_fake
def _(x, num_groups, weight, bias, eps, silu, frames):
    return torch.empty_like(x, memory_format=torch.contiguous_format)
