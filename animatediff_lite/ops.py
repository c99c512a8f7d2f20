"""Functional entry points for the memory-bound ops of the hot path.

Models call these instead of torch.nn.functional directly, so that fused Triton kernels
(``animatediff_lite.kernels``) can take over on the GPU while this PyTorch code stays the reference
and the fallback everywhere else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, silu: bool = False, frames: int | None = None) -> torch.Tensor:
    """GroupNorm over (N, C, *spatial), optionally followed by SiLU.

    ``frames``: when given, ``x`` is (B*F, C, H, W) with frames folded into the batch and the statistics
    are taken jointly over all F frames of each video (AnimateDiff v1's "inflated" GroupNorm).
    """
    if frames is not None and frames > 1:
        n, c = x.shape[:2]
        # (B*F, C, H, W) -> (B, C, F, H, W): one sample per video, statistics over (C/G, F, H, W).
        y = x.reshape(n // frames, frames, c, *x.shape[2:]).transpose(1, 2)
        y = F.group_norm(y, num_groups, weight, bias, eps)
        y = y.transpose(1, 2).reshape(x.shape)
    else:
        y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def geglu(x: torch.Tensor) -> torch.Tensor:
    """GEGLU gate: split the last dim in two halves (a, g) and return a * gelu(g) (exact erf GELU)."""
    a, g = x.chunk(2, dim=-1)
    return a * F.gelu(g)
