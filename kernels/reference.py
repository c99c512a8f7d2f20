"""PyTorch references of every fused kernel: the oracle of the kernel tests and the fallback path.

Kept free of triton imports so that the fallback works where triton is missing; each kernel module
re-exports the reference of its op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# PyTorch's CUDA SDPA kernels (memory-efficient: the batch on grid axis z; cuDNN: a 16-bit batch) fail for a batch of
# 65,536 or more (pytorch/pytorch#142228, #181085). Temporal attention's batch is batch * pixels (65,536 at 1024x1024
# with CFG and two videos), so every PyTorch path goes through sdpa() below, which splits the batch.
SDPA_MAX_BATCH = 65535


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention on (B, H, L, D), in batch chunks of at most SDPA_MAX_BATCH (same result)."""
    b = q.shape[0]
    if b <= SDPA_MAX_BATCH:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    m = SDPA_MAX_BATCH
    return torch.cat([F.scaled_dot_product_attention(q[i:i + m], k[i:i + m], v[i:i + m], is_causal=causal)
                      for i in range(0, b, m)])


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v: q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D)."""
    return sdpa(q, k, v, causal)


def temporal_attention_core_reference(qkv: torch.Tensor, pe_qkv: torch.Tensor | None, heads: int) -> torch.Tensor:
    """Attention over frames from fused projections.

    qkv (N, F, 3C): [q | k | v] projections of N sequences of F frames; pe_qkv (F, 3C) or None: the position
    encoding already projected (pe @ [Wq; Wk; Wv]^T), added per frame. Returns (N, F, C), heads merged.
    """
    n, f, c3 = qkv.shape
    c = c3 // 3
    if pe_qkv is not None:
        qkv = qkv + pe_qkv.to(qkv.dtype)
    q, k, v = (t.reshape(n, f, heads, c // heads).transpose(1, 2) for t in qkv.split(c, dim=-1))
    out = sdpa(q, k, v)  # (N, heads, F, d)
    return out.transpose(1, 2).reshape(n, f, c)


def temporal_attention_reference(x: torch.Tensor, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None,
                                 q_weight: torch.Tensor, k_weight: torch.Tensor, v_weight: torch.Tensor,
                                 out_weight: torch.Tensor, out_bias: torch.Tensor | None, heads: int,
                                 pe: torch.Tensor | None = None, eps: float = 1e-5,
                                 qkv_weight: torch.Tensor | None = None) -> torch.Tensor:
    """One AnimateDiff temporal self-attention block with its residual, x (N, F, C) -> (N, F, C).

    x + to_out(attention(q, k, v)) with q/k/v = (LayerNorm(x) + pe[:F]) @ W^T (no bias): the PE feeds q, k
    and v but not the residual. pe: (L, C) or (1, L, C), L >= F. ``qkv_weight``: cat([q, k, v]) (3C, C), if
    given one matmul replaces the three (same products; the separate weights are then unused).
    """
    n, f, c = x.shape
    h = F.layer_norm(x, (c,), norm_weight, norm_bias, eps)
    if pe is not None:
        h = h + pe.reshape(-1, c)[:f].to(h.dtype)
    d = c // heads
    if qkv_weight is not None:
        projected = F.linear(h, qkv_weight.to(h.dtype)).split(c, dim=-1)  # one (N*F, C) x (C, 3C) matmul
    else:
        projected = tuple(F.linear(h, w) for w in (q_weight, k_weight, v_weight))
    q, k, v = (t.reshape(n, f, heads, d).transpose(1, 2) for t in projected)
    out = sdpa(q, k, v).transpose(1, 2).reshape(n, f, c)
    return x + F.linear(out, out_weight, out_bias)


def group_norm_reference(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         eps: float, silu: bool = False, frames: int | None = None) -> torch.Tensor:
    """GroupNorm over (N, C, *spatial), optionally followed by SiLU.

    ``frames``: x is (B*F, C, ...) with frames folded into the batch and the statistics are taken jointly over
    the F frames of each video, i.e. over (C/G, F, ...) (AnimateDiff v1's "inflated" GroupNorm).
    """
    if x.device.type == "cpu" and not x.is_contiguous():
        # torch 2.13's CPU GroupNorm backward segfaults on channels-last inputs that do not require grad while
        # the weight does (the motion modules' input when only they train); a contiguous copy avoids that kernel.
        x = x.contiguous()
    if frames is not None and frames > 1:
        n, c = x.shape[:2]
        # (B*F, C, ...) -> (B, C, F, ...): one sample per video.
        y = x.reshape(n // frames, frames, c, *x.shape[2:]).transpose(1, 2)
        y = F.group_norm(y, num_groups, weight, bias, eps)
        y = y.transpose(1, 2).reshape(x.shape)
    else:
        y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def geglu_reference(x: torch.Tensor) -> torch.Tensor:
    """Split the last dim in two halves (a, g) and return a * gelu(g) (exact erf GELU): (..., 2H) -> (..., H)."""
    a, g = x.chunk(2, dim=-1)
    return a * F.gelu(g)
