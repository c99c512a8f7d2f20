"""Functional entry points for the memory-bound ops of the hot path.

Models call these instead of torch.nn.functional directly: on CUDA tensors with Triton importable the fused
kernels of ``animatediff_lite.kernels`` take over where the backend allows (by default: where the verified table
lists the kernel for this device, at sizes where it was measured faster), everywhere else (CPU, no triton,
autograd recording through a forward-only kernel) the PyTorch references of ``animatediff_lite.kernels.reference``
run. The switch: ``backend=`` (a :class:`Backend` resolved once, or "auto" | "triton" | "torch"); model modules
hold theirs in ``kernel_backend``, set for a whole model by :func:`set_backend`. See kernels/_backend.py. Kernel
modules (and triton) are imported only when a kernel is about to run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels._backend import Backend, needs_grad, resolve_backend, use_triton
from .kernels.reference import geglu_reference, group_norm_reference, temporal_attention_reference

MAX_KERNEL_FRAMES = 32  # the temporal kernel holds a 32-row score tile (kernels/temporal_attention.py)
BackendArg = Backend | str | None


def set_backend(model: torch.nn.Module, backend: BackendArg = None,
                device: str | torch.device | None = None) -> Backend:
    """Resolve ``backend`` once for ``device`` and give it to every module of ``model`` that calls these ops.

    ``backend``: "auto" | "triton" | "torch", a :class:`Backend`, or None for ANIMATEDIFF_LITE_BACKEND (default
    "auto"). ``device``: where the model runs (default: the device of its first parameter). Returns the Backend.
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    resolved = resolve_backend(backend, device)
    for module in model.modules():
        if hasattr(module, "kernel_backend"):
            module.kernel_backend = resolved
    return resolved


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, silu: bool = False, frames: int | None = None, backend: BackendArg = None) -> torch.Tensor:
    """GroupNorm over (N, C, *spatial), optionally followed by SiLU -> same shape.

    ``frames``: when given, ``x`` is (B*F, C, H, W) with frames folded into the batch and the statistics
    are taken jointly over all F frames of each video (AnimateDiff v1's "inflated" GroupNorm).
    ``backend``: a resolved Backend, "auto", "triton", "torch" or None (env var, then "auto"). "auto" applies the
    measured per-shape thresholds (variant "per_frame" / "joint", size H*W). The kernel is forward only: with
    autograd recording this is the PyTorch reference.
    """
    if frames is not None and (frames < 1 or x.shape[0] % frames):
        raise ValueError(f"frames={frames} must be >= 1 and divide the batch {x.shape[0]}")
    why_not = (f"x {tuple(x.shape)} is not (N, C, ...) with C divisible by num_groups={num_groups}"
               if x.dim() < 2 or x.shape[1] % num_groups else None)
    params = [t for t in (weight, bias) if t is not None]
    pixels = x[0, 0].numel() if x.dim() > 2 and x.shape[0] and x.shape[1] else 1
    variant = "joint" if frames is not None and frames > 1 else "per_frame"
    if use_triton(backend, x, *params, kernel="group_norm", variant=variant, pixels=pixels, why_not=why_not):
        from .kernels.group_norm import group_norm_silu_op  # lazy: Triton is imported only when a kernel runs

        return group_norm_silu_op(x, num_groups, weight, bias, eps, silu, frames or 1)
    return group_norm_reference(x, num_groups, weight, bias, eps, silu, frames)


def geglu(x: torch.Tensor, backend: BackendArg = None) -> torch.Tensor:
    """GEGLU gate: split the last dim in two halves (a, g) and return a * gelu(g) (exact erf GELU).

    (..., 2H) -> (..., H). The kernel has a backward, so it also serves training on the GPU.
    """
    why_not = None if x.dim() >= 1 and x.shape[-1] % 2 == 0 else f"last dim of {tuple(x.shape)} is not even"
    if use_triton(backend, x, kernel="geglu", grad_ok=True, why_not=why_not):
        from .kernels.geglu import geglu_op  # lazy: Triton is imported only when a kernel runs

        return geglu_op(x)
    return geglu_reference(x)


def temporal_attention(x: torch.Tensor, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None,
                       q_weight: torch.Tensor, k_weight: torch.Tensor, v_weight: torch.Tensor,
                       out_weight: torch.Tensor, out_bias: torch.Tensor | None, heads: int,
                       pe: torch.Tensor | None = None, eps: float = 1e-5, backend: BackendArg = None,
                       qkv_weight: torch.Tensor | None = None, pe_qkv: torch.Tensor | None = None) -> torch.Tensor:
    """One AnimateDiff temporal self-attention block with its residual: x (N, F, C) -> (N, F, C).

    ``x + to_out(attention over frames(q, k, v))`` with ``q/k/v = (LayerNorm(x) + pe[:F]) @ W^T`` (no bias),
    N = batch * pixels, heads = 8 in AnimateDiff. ``pe``: the sinusoidal table (L, C) or (1, L, C), L >= F, or
    None. Weights as stored by nn.Linear ((C, C), out_bias (C,)); LayerNorm ``eps`` (1e-5 in AnimateDiff).
    ``qkv_weight``: cat([q, k, v]) (3C, C) when the caller keeps one made once (motion.TemporalAttention), and
    ``pe_qkv``: pe @ qkv_weight^T in fp32 (L, 3C) made with it; used only when autograd does not record (the
    separate weights carry the gradients). Without them the fused path concatenates on every call.

    Fused path (verified kernel, no autograd): LayerNorm, one (N*F, C) x (C, 3C) cuBLAS matmul, then the Triton
    kernel reads q/k/v per head straight from the (N, F, 3C) result with the PE folded in as the per-frame bias
    pe[:F] @ W^T, and writes heads merged for the out projection. PyTorch path: the same single projection
    matmul when ``qkv_weight`` is given, then SDPA.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (N, frames, channels), got {tuple(x.shape)}")
    n, f, c = x.shape
    if heads < 1 or c % heads:
        raise ValueError(f"channels {c} not divisible by heads={heads}")
    if pe is not None and pe.reshape(-1, c).shape[0] < f:
        raise ValueError(f"pe holds {pe.reshape(-1, c).shape[0]} positions, fewer than frames={f}")
    if qkv_weight is not None and qkv_weight.shape != (3 * c, c):
        raise ValueError(f"qkv_weight must be (3C, C) = {(3 * c, c)}, got {tuple(qkv_weight.shape)}")
    if pe_qkv is not None and (pe_qkv.dim() != 2 or pe_qkv.shape[0] < f or pe_qkv.shape[1] != 3 * c):
        raise ValueError(f"pe_qkv must be (L >= {f}, {3 * c}), got {tuple(pe_qkv.shape)}")
    why_not = f"{f} frames > {MAX_KERNEL_FRAMES}" if f > MAX_KERNEL_FRAMES else None
    tensors = [t for t in (x, norm_weight, norm_bias, q_weight, k_weight, v_weight, out_weight, out_bias)
               if t is not None]
    fused_ok = qkv_weight is not None and not needs_grad(*tensors)
    if not use_triton(backend, *tensors, kernel="temporal_attention", shape=f"{f}x{c}", why_not=why_not):
        return temporal_attention_reference(x, norm_weight, norm_bias, q_weight, k_weight, v_weight, out_weight,
                                            out_bias, heads, pe, eps, qkv_weight=qkv_weight if fused_ok else None)
    # lazy: Triton is imported only when a kernel runs
    from .kernels.temporal_attention import temporal_attention_core_op

    h = F.layer_norm(x, (c,), norm_weight, norm_bias, eps)
    w_qkv = qkv_weight.to(x.dtype) if fused_ok else torch.cat([q_weight, k_weight, v_weight])  # (3C, C)
    qkv = F.linear(h, w_qkv)  # (N, F, 3C)
    # (x + pe) W^T = x W^T + pe W^T: the PE becomes a per-frame bias (F, 3C), computed in fp32.
    if pe is None:
        pe_bias = None
    elif pe_qkv is not None and fused_ok:
        pe_bias = pe_qkv[:f]
    else:
        pe_bias = pe.reshape(-1, c)[:f].to(device=x.device, dtype=torch.float32) @ w_qkv.float().t()
    out = temporal_attention_core_op(qkv, pe_bias, heads)  # (N, F, C), heads merged
    return x + F.linear(out, out_weight, out_bias)
