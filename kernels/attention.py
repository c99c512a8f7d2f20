"""Flash-style attention forward (online softmax) for spatial self- and cross-attention.

Layout (B, H, L, D) with any strides. One program computes BLOCK_M query rows of one (batch, head); the
1-D grid is flattened as (batch*head, query block) with the query block fastest, so neighbouring programs
share K/V in L2, and batch*heads is never limited to a 65,535-long grid axis.

Head dims: SD1.5 uses 40/80/160. tl.dot tiles must be powers of two >= 16, so a head dim that two such tiles
cover exactly is split in two (80 = 64+16, 160 = 128+32: no padding) instead of padded to 128/256 (60% waste).
Other head dims, 40 among them, are padded to one tile (40 -> 64): a split whose second tile needs a column
mask (40 = 32 + 16 with 8 masked) was miscompiled by Triton 3.6 for Hopper's wgmma (wrong values, then an
illegal address, on an H200; benchmarks/kernel_smoke.py), while the padded tile and the exact splits were
right. ``head_split=False`` pads every head dim, so both are measurable (examples/bench_attention.py).

Forward only: callers fall back to PyTorch SDPA when autograd records.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from ._backend import check_runnable, is_interpreted, split_head_dim
from .reference import attention_reference  # noqa: F401  (the reference beside its kernel)

GRID_LIMIT = 2**31 - 1  # CUDA grid axis 0; the launcher chunks beyond it


@triton.jit
def _load_tile(base, rows, cols, stride_r, stride_c, n_rows, n_cols, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    ptrs = base + rows[:, None] * stride_r + cols[None, :] * stride_c
    if MASK_R and MASK_C:
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif MASK_R:
        return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif MASK_C:
        return tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    H, Lq, Lk, num_m_blocks, pid_base, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, EVEN_N: tl.constexpr, PRECISION: tl.constexpr,
):
    # int64 program index: offsets below stay exact past 2**31 elements.
    pid = tl.program_id(0).to(tl.int64) + pid_base
    bh = pid // num_m_blocks
    mb = pid % num_m_blocks
    b = bh // H
    h = bh % H
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    o_base = O + b * sob + h * soh

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, D0)
    MASK_D0: tl.constexpr = D0 > HEAD_DIM
    q0 = _load_tile(q_base, offs_m, d0, sqm, sqd, Lq, HEAD_DIM, True, MASK_D0)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        MASK_D1: tl.constexpr = D0 + D1 > HEAD_DIM
        q1 = _load_tile(q_base, offs_m, d1, sqm, sqd, Lq, HEAD_DIM, True, MASK_D1)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, (mb + 1) * BLOCK_M)
    for start in range(0, hi, BLOCK_N):
        kn = start + offs_n
        # K tiles are loaded transposed, (D, BLOCK_N), so q @ k is a plain dot.
        k0 = _load_tile(k_base, d0, kn, skd, skn, HEAD_DIM, Lk, MASK_D0, not EVEN_N)
        s = tl.dot(q0, k0, input_precision=PRECISION)
        if D1 > 0:
            k1 = _load_tile(k_base, d1, kn, skd, skn, HEAD_DIM, Lk, MASK_D1, not EVEN_N)
            s = tl.dot(q1, k1, s, input_precision=PRECISION)
        s = s * qk_scale  # scale * log2(e): softmax in base 2
        if not EVEN_N:
            s = tl.where(kn[None, :] < Lk, s, float("-inf"))
        if CAUSAL:
            s = tl.where(kn[None, :] <= offs_m[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        v0 = _load_tile(v_base, kn, d0, svn, svd, Lk, HEAD_DIM, not EVEN_N, MASK_D0)
        p = p.to(v0.dtype)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=PRECISION)
        if D1 > 0:
            v1 = _load_tile(v_base, kn, d1, svn, svd, Lk, HEAD_DIM, not EVEN_N, MASK_D1)
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PRECISION)

    inv_l = 1.0 / l_i
    o0 = (acc0 * inv_l[:, None]).to(O.dtype.element_ty)
    o_ptrs = o_base + offs_m[:, None] * som + d0[None, :] * sod
    tl.store(o_ptrs, o0, mask=(offs_m[:, None] < Lq) & (d0[None, :] < HEAD_DIM))
    if D1 > 0:
        o1 = (acc1 * inv_l[:, None]).to(O.dtype.element_ty)
        o_ptrs = o_base + offs_m[:, None] * som + d1[None, :] * sod
        tl.store(o_ptrs, o1, mask=(offs_m[:, None] < Lq) & (d1[None, :] < HEAD_DIM))


# GPU: tune BLOCK_N / warps / stages per shape; BLOCK_M is picked by the launcher so the grid is known. Four
# candidates: each one is a compile per shape key, and a UNet has about ten keys.
_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn, w, s in [(32, 4, 2), (64, 4, 3), (64, 8, 3), (128, 8, 3)]
]
_attn_fwd_tuned = triton.autotune(_CONFIGS, key=["Lq", "Lk", "HEAD_DIM", "D0", "D1", "BLOCK_M", "CAUSAL"])(
    _attn_fwd_kernel)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    head_split: bool = True, block_m: int | None = None, block_n: int | None = None,
                    num_warps: int | None = None, num_stages: int | None = None,
                    grid_limit: int = GRID_LIMIT) -> torch.Tensor:
    """Triton launcher: q (B, H, Lq, D), k/v (B, H, Lk, D), same dtype/device -> (B, H, Lq, D) like q.

    ``head_split``: split the head dim in two power-of-two tiles where they cover it exactly (default; other
    head dims are padded), or pad it to one tile.
    ``block_m/block_n/num_warps/num_stages``: fix the tiling (all four skip autotuning; the interpreter
    always uses a fixed small tiling). ``grid_limit``: most programs per launch (tests shrink it).
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if k.shape != (B, H, Lk, D) or v.shape != (B, H, Lk, D):
        raise ValueError(f"k and v must be (B, H, Lk, {D}) matching q {tuple(q.shape)}, got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if causal and Lq != Lk:
        raise ValueError(f"causal attention needs Lq == Lk, got {Lq} and {Lk}")
    check_runnable(_attn_fwd_kernel, q)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    if q.numel() == 0 or Lk == 0:
        return o.zero_() if Lk == 0 else o
    d0, d1 = split_head_dim(D, head_split)
    if d0 + d1 != D:  # a masked second tile: miscompiled on Hopper (module docstring), so pad instead
        d0, d1 = split_head_dim(D, split=False)
    interp = is_interpreted(_attn_fwd_kernel)
    if block_m is None:
        block_m = 16 if interp else (128 if Lq >= 128 else 64)
    m_blocks = triton.cdiv(Lq, block_m)
    total = B * H * m_blocks
    meta = dict(HEAD_DIM=D, D0=d0, D1=d1, BLOCK_M=block_m, CAUSAL=causal,
                PRECISION="ieee" if q.dtype == torch.float32 else None)
    if interp or block_n is not None:  # a fixed tiling
        block_n = block_n or 16
        meta.update(BLOCK_N=block_n, EVEN_N=Lk % block_n == 0, num_warps=num_warps or 4,
                    num_stages=num_stages or 2)
        kernel = _attn_fwd_kernel
    else:
        # EVEN_N depends on the tuned BLOCK_N: only claim it when every candidate divides Lk.
        meta.update(EVEN_N=Lk % 128 == 0)
        kernel = _attn_fwd_tuned
    qk_scale = 1.0 / math.sqrt(D) * 1.4426950408889634
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        for base in range(0, total, grid_limit):
            n = min(grid_limit, total - base)
            kernel[(n,)](q, k, v, o, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                         H, Lq, Lk, m_blocks, base, qk_scale, **meta)
    return o


@torch.library.custom_op("animatediff_lite::flash_attention", mutates_args=())
def flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """The Triton forward as an opaque op, so torch.compile graphs call it instead of tracing into Triton."""
    return flash_attention(q, k, v, causal)


@flash_attention_op.register_fake
def _(q, k, v, causal=False):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
