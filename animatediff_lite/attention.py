"""The one attention entry point used by every model part.

Layout (batch, heads, tokens, head_dim). On CUDA with Triton available the flash-attention kernel of
``animatediff_lite.kernels.attention`` takes over (forward only: when autograd records, or for shapes the
kernel does not take, this is PyTorch's scaled_dot_product_attention). The switch: ``backend=`` (a resolved
Backend, or auto | triton | torch; None: the environment variable ANIMATEDIFF_LITE_BACKEND), see
kernels/_backend.py; "auto" takes the kernel only where kernels/verified.toml lists it for the device.
"""

from __future__ import annotations

import torch

from .kernels._backend import Backend, use_triton
from .kernels.reference import sdpa

MAX_KERNEL_HEAD_DIM = 256


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              backend: Backend | str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D).

    ``causal``: mask keys after the query position (needs Lq == Lk on the kernel path).
    ``backend``: a resolved Backend, "auto", "triton", "torch" or None (env var, then "auto").
    """
    why_not = None
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        why_not = "shapes must be q (B, H, Lq, D), k/v (B, H, Lk, D)"
    elif q.shape[:2] != k.shape[:2]:
        why_not = "q and k must share (B, H)"
    elif q.shape[-1] > MAX_KERNEL_HEAD_DIM:
        why_not = f"head dim {q.shape[-1]} > {MAX_KERNEL_HEAD_DIM}"
    elif causal and q.shape[2] != k.shape[2]:
        why_not = "causal needs Lq == Lk"
    elif q.dtype != k.dtype or q.dtype != v.dtype:
        why_not = "q, k, v dtypes differ"
    shape = f"{q.shape[-2]}x{k.shape[-2]}x{q.shape[-1]}" if why_not is None else None  # Lq x Lk x D
    if use_triton(backend, q, k, v, kernel="attention", shape=shape, why_not=why_not):
        from .kernels.attention import flash_attention_op  # lazy: Triton is imported only when a kernel runs

        return flash_attention_op(q, k, v, causal)
    return sdpa(q, k, v, causal)  # batch-chunked: CUDA SDPA kernels fail past a batch of 65,535
