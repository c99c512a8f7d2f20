"""Functional entry points for the memory-bound ops of the hot path.

Models call these instead of torch.nn.functional directly: on CUDA tensors with Triton importable the fused
kernels of ``animatediff_lite.kernels`` take over, everywhere else (CPU, no triton, autograd recording through
a forward-only kernel) the PyTorch references of ``animatediff_lite.kernels.reference`` run. The switch:
``backend=`` ("auto" | "triton" | "torch") or the environment variable ANIMATEDIFF_LITE_BACKEND; see
kernels/_backend.py. Kernel modules (and triton) are imported only when a kernel is about to run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels._backend import use_triton
from .kernels.reference import geglu_reference, group_norm_reference, temporal_attention_reference

MAX_KERNEL_FRAMES = 32  # the temporal kernel holds a 32-row score tile (kernels/temporal_attention.py)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, silu: bool = False, frames: int | None = None, backend: str | None = None) -> torch.Tensor:
    """GroupNorm over (N, C, *spatial), optionally followed by SiLU -> same shape.

    ``frames``: when given, ``x`` is (B*F, C, H, W) with frames folded into the batch and the statistics
    are taken jointly over all F frames of each video (AnimateDiff v1's "inflated" GroupNorm).
    ``backend``: None (env var, then "auto"), "auto", "triton" or "torch". The kernel is forward only:
    with autograd recording this is the PyTorch reference.
    """
    if frames is not None and (frames < 1 or x.shape[0] % frames):
        raise ValueError(f"frames={frames} must be >= 1 and divide the batch {x.shape[0]}")
    why_not = None
    if x.dim() < 2 or x.shape[1] % num_groups:
        why_not = f"x {tuple(x.shape)} is not (N, C, ...) with C divisible by num_groups={num_groups}"
    params = [t for t in (weight, bias) if t is not None]
    if use_triton(backend, x, *params, why_not=why_not):
        from .kernels.group_norm import group_norm_silu_op

        return group_norm_silu_op(x, num_groups, weight, bias, eps, silu, frames or 1)
    return group_norm_reference(x, num_groups, weight, bias, eps, silu, frames)


def geglu(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """GEGLU gate: split the last dim in two halves (a, g) and return a * gelu(g) (exact erf GELU).

    (..., 2H) -> (..., H). The kernel has a backward, so it also serves training on the GPU.
    """
    why_not = None if x.dim() >= 1 and x.shape[-1] % 2 == 0 else f"last dim of {tuple(x.shape)} is not even"
    if use_triton(backend, x, grad_ok=True, why_not=why_not):
        from .kernels.geglu import geglu_op

        return geglu_op(x)
    return geglu_reference(x)


def temporal_attention(x: torch.Tensor, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None,
                       q_weight: torch.Tensor, k_weight: torch.Tensor, v_weight: torch.Tensor,
                       out_weight: torch.Tensor, out_bias: torch.Tensor | None, heads: int,
                       pe: torch.Tensor | None = None, eps: float = 1e-5, backend: str | None = None) -> torch.Tensor:
    """One AnimateDiff temporal self-attention block with its residual: x (N, F, C) -> (N, F, C).

    ``x + to_out(attention over frames(q, k, v))`` with ``q/k/v = (LayerNorm(x) + pe[:F]) @ W^T`` (no bias),
    N = batch * pixels, heads = 8 in AnimateDiff. ``pe``: the sinusoidal table (L, C) or (1, L, C), L >= F, or
    None. Weights as stored by nn.Linear ((C, C), out_bias (C,)); LayerNorm ``eps`` (1e-5 in AnimateDiff).

    Fused path (CUDA, no autograd): LayerNorm, one (N*F, C) x (C, 3C) cuBLAS matmul, then the Triton kernel reads
    q/k/v per head straight from the (N, F, 3C) result with the PE folded in as the per-frame bias
    pe[:F] @ W^T, and writes heads merged for the out projection.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (N, frames, channels), got {tuple(x.shape)}")
    n, f, c = x.shape
    if heads < 1 or c % heads:
        raise ValueError(f"channels {c} not divisible by heads={heads}")
    if pe is not None and pe.reshape(-1, c).shape[0] < f:
        raise ValueError(f"pe holds {pe.reshape(-1, c).shape[0]} positions, fewer than frames={f}")
    why_not = f"{f} frames > {MAX_KERNEL_FRAMES}" if f > MAX_KERNEL_FRAMES else None
    tensors = [t for t in (x, norm_weight, norm_bias, q_weight, k_weight, v_weight, out_weight, out_bias)
               if t is not None]
    if not use_triton(backend, *tensors, why_not=why_not):
        return temporal_attention_reference(x, norm_weight, norm_bias, q_weight, k_weight, v_weight, out_weight,
                                            out_bias, heads, pe, eps)
    from .kernels.temporal_attention import temporal_attention_core_op

    h = F.layer_norm(x, (c,), norm_weight, norm_bias, eps)
    w_qkv = torch.cat([q_weight, k_weight, v_weight])  # (3C, C)
    qkv = F.linear(h, w_qkv)  # (N, F, 3C)
    # (x + pe) W^T = x W^T + pe W^T: the PE becomes a per-frame bias (F, 3C), computed in fp32.
    pe_qkv = pe.reshape(-1, c)[:f].to(device=x.device, dtype=torch.float32) @ w_qkv.float().t() if pe is not None \
        else None
    out = temporal_attention_core_op(qkv, pe_qkv, heads)  # (N, F, C), heads merged
    return x + F.linear(out, out_weight, out_bias)
