"""GEGLU: (..., 2H) -> (..., H), a * gelu(g) with exact (erf) GELU, forward and backward.

Elementwise and memory bound: one read of x and one write of H outputs (PyTorch: chunk views, gelu writes H,
the product reads 2H and writes H). Grid: rows on axis 0 (2**31 - 1), column blocks on axis 1; row offsets
are int64. The backward kernel recomputes gelu from x (no saved activations beyond x), so training on the GPU
keeps the fused path; the custom op carries both through torch.library.register_autograd.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._backend import check_runnable, is_interpreted
from .reference import geglu_reference  # noqa: F401  (the reference beside its kernel)

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _geglu_fwd_kernel(X, Y, H, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    x_row = X + row * 2 * H
    a = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_row + H + cols, mask=mask, other=0.0).to(tl.float32)
    y = a * (0.5 * g * (1.0 + tl.erf(g * _SQRT1_2)))
    tl.store(Y + row * H + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(X, DY, DX, H, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    x_row = X + row * 2 * H
    a = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_row + H + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(g * _SQRT1_2))
    pdf = tl.exp(-0.5 * g * g) * _INV_SQRT_2PI
    dx_row = DX + row * 2 * H
    tl.store(dx_row + cols, (dy * g * cdf).to(DX.dtype.element_ty), mask=mask)
    tl.store(dx_row + H + cols, (dy * a * (cdf + g * pdf)).to(DX.dtype.element_ty), mask=mask)


def _launch(kernel, rows: int, h: int, device: torch.device, *args, block: int | None = None) -> None:
    block = block or (128 if is_interpreted(kernel) else min(1024, triton.next_power_of_2(h)))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[(rows, triton.cdiv(h, block))](*args, h, BLOCK=block, num_warps=4 if block <= 512 else 8)


def geglu_forward(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Triton launcher: x (..., 2H) -> a * gelu(g) (..., H)."""
    if x.shape[-1] % 2:
        raise ValueError(f"GEGLU needs an even last dim, got {x.shape[-1]}")
    check_runnable(_geglu_fwd_kernel, x)
    x = x.contiguous()
    h = x.shape[-1] // 2
    y = x.new_empty(*x.shape[:-1], h)
    if y.numel():
        _launch(_geglu_fwd_kernel, x.numel() // (2 * h), h, x.device, x, y, block=block)
    return y


def geglu_backward(x: torch.Tensor, dy: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Triton launcher: gradient of ``geglu_forward`` w.r.t. x (..., 2H) given dy (..., H)."""
    x, dy = x.contiguous(), dy.contiguous()
    h = x.shape[-1] // 2
    dx = torch.empty_like(x)
    if dx.numel():
        _launch(_geglu_bwd_kernel, x.numel() // (2 * h), h, x.device, x, dy, dx, block=block)
    return dx


@torch.library.custom_op("animatediff_lite::geglu", mutates_args=())
def geglu_op(x: torch.Tensor) -> torch.Tensor:
    """The Triton GEGLU as an opaque, differentiable op."""
    return geglu_forward(x)


@geglu_op.register_fake
def _(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.custom_op("animatediff_lite::geglu_backward", mutates_args=())
def geglu_backward_op(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return geglu_backward(x, dy)


@geglu_backward_op.register_fake
def _(x, dy):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return geglu_backward_op(x, dy)


geglu_op.register_autograd(_backward, setup_context=_setup_context)
