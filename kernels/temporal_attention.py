"""Temporal attention: softmax attention over <= 32 frames for every pixel and head, read straight from the
fused projection output.

Input qkv (N, F, 3C) = LayerNorm(x) @ [Wq; Wk; Wv]^T (N = batch * pixels), heads split by strides (no transpose);
the sinusoidal position encoding enters as a per-frame bias pe_qkv = pe @ [Wq; Wk; Wv]^T (F, 3C), since
(x + pe) W = x W + pe W when the projections have no bias; output (N, F, C) with the heads already merged,
ready for the out projection. One pass over qkv and one write of the output: the op is memory bound.

Tiling: a program takes BLOCK_R rows = SEQS whole sequences of F frames ((pixel, head) pairs, heads fastest,
so a program reads neighbouring columns of the same pixel) and computes one block-diagonal BLOCK_R x BLOCK_R
score tile on the tensor cores: BLOCK_R/F times the useful flops, still far under the memory time for F <= 32.
Sequences go on grid axis 0 (2**31 - 1 programs; axes 1/2 stop at 65,535), program and element offsets are
int64. Head dims 40/80/160 use split power-of-two tiles (see kernels/attention.py).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from ._backend import check_runnable, next_pow2, split_head_dim
from .reference import temporal_attention_core_reference  # noqa: F401  (the reference beside its kernel)

GRID_LIMIT = 2**31 - 1


@triton.jit
def _load_rows(base, pe, row_off, pe_row, cols, row_ok, HEAD_DIM: tl.constexpr, TRANS: tl.constexpr,
               HAS_PE: tl.constexpr, s_c):
    """Tile of one projection for the rows of this program (+ its per-frame PE bias); (D, R) when TRANS."""
    if TRANS:
        mask = (cols[:, None] < HEAD_DIM) & row_ok[None, :]
        x = tl.load(base + row_off[None, :] + cols[:, None] * s_c, mask=mask, other=0.0)
        if HAS_PE:
            x = (x.to(tl.float32) + tl.load(pe + pe_row[None, :] + cols[:, None], mask=mask, other=0.0)).to(x.dtype)
    else:
        mask = row_ok[:, None] & (cols[None, :] < HEAD_DIM)
        x = tl.load(base + row_off[:, None] + cols[None, :] * s_c, mask=mask, other=0.0)
        if HAS_PE:
            x = (x.to(tl.float32) + tl.load(pe + pe_row[:, None] + cols[None, :], mask=mask, other=0.0)).to(x.dtype)
    return x


@triton.jit
def _temporal_attn_kernel(
    QKV, PE, O, s_n, s_f, s_c, n_seq, heads, C, pid_base, qk_scale,
    FRAMES: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_PE: tl.constexpr, PRECISION: tl.constexpr,
):
    SEQS: tl.constexpr = BLOCK_R // FRAMES
    pid = tl.program_id(0).to(tl.int64) + pid_base
    r = tl.arange(0, BLOCK_R)
    s_loc = r // FRAMES
    f = r % FRAMES
    seq = pid * SEQS + s_loc  # int64
    row_ok = (s_loc < SEQS) & (seq < n_seq)
    n = seq // heads
    col0 = (seq % heads) * HEAD_DIM  # first channel of this row's head
    q_off = n * s_n + f * s_f + col0 * s_c
    pe_row = f * (3 * C) + col0
    k_ptr = QKV + C * s_c
    v_ptr = QKV + 2 * C * s_c

    d0 = tl.arange(0, D0)
    q0 = _load_rows(QKV, PE, q_off, pe_row, d0, row_ok, HEAD_DIM, False, HAS_PE, s_c)
    k0 = _load_rows(k_ptr, PE + C, q_off, pe_row, d0, row_ok, HEAD_DIM, True, HAS_PE, s_c)
    s = tl.dot(q0, k0, input_precision=PRECISION)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        q1 = _load_rows(QKV, PE, q_off, pe_row, d1, row_ok, HEAD_DIM, False, HAS_PE, s_c)
        k1 = _load_rows(k_ptr, PE + C, q_off, pe_row, d1, row_ok, HEAD_DIM, True, HAS_PE, s_c)
        s = tl.dot(q1, k1, s, input_precision=PRECISION)
    # Block-diagonal mask: a row attends to the frames of its own sequence only. Finite fill: rows past the
    # end then get a harmless uniform softmax instead of NaN (they are not stored).
    same = (s_loc[:, None] == s_loc[None, :]) & row_ok[None, :]
    s = tl.where(same, s * qk_scale, -1.0e30)
    m = tl.max(s, 1)
    p = tl.exp2(s - m[:, None])
    inv_l = 1.0 / tl.sum(p, 1)

    o_off = n * (FRAMES * C) + f * C + col0  # output (N, F, C), contiguous
    v0 = _load_rows(v_ptr, PE + 2 * C, q_off, pe_row, d0, row_ok, HEAD_DIM, False, HAS_PE, s_c)
    o0 = tl.dot(p.to(v0.dtype), v0, input_precision=PRECISION) * inv_l[:, None]
    tl.store(O + o_off[:, None] + d0[None, :], o0.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (d0[None, :] < HEAD_DIM))
    if D1 > 0:
        v1 = _load_rows(v_ptr, PE + 2 * C, q_off, pe_row, d1, row_ok, HEAD_DIM, False, HAS_PE, s_c)
        o1 = tl.dot(p.to(v1.dtype), v1, input_precision=PRECISION) * inv_l[:, None]
        tl.store(O + o_off[:, None] + d1[None, :], o1.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (d1[None, :] < HEAD_DIM))


def temporal_attention_core(qkv: torch.Tensor, pe_qkv: torch.Tensor | None, heads: int, block_r: int | None = None,
                            num_warps: int | None = None, num_stages: int | None = None,
                            grid_limit: int = GRID_LIMIT) -> torch.Tensor:
    """Triton launcher: qkv (N, F, 3C) (any strides), pe_qkv (F, 3C) or None -> (N, F, C) contiguous.

    ``block_r``: rows per program (a power of two >= max(16, F); default 32, or the next power of two above F).
    ``grid_limit``: most programs per launch; larger grids are split into several launches (tests shrink it).
    """
    n, f, c3 = qkv.shape
    if c3 % 3 or (c3 // 3) % heads:
        raise ValueError(f"qkv last dim {c3} must be 3 * heads * head_dim with heads={heads}")
    c = c3 // 3
    if pe_qkv is not None and (pe_qkv.shape != (f, c3)):
        raise ValueError(f"pe_qkv must be (frames, 3C) = {(f, c3)}, got {tuple(pe_qkv.shape)}")
    check_runnable(_temporal_attn_kernel, qkv)
    out = torch.empty(n, f, c, device=qkv.device, dtype=qkv.dtype)
    if out.numel() == 0:
        return out
    d = c // heads
    d0, d1 = split_head_dim(d)
    # 32 rows by default: Triton 3.6 lowers 64-row tiles to Hopper's wgmma, which got the masked head-dim tiles
    # wrong on an H200 (benchmarks/kernel_smoke.py: 40 = 32+16 and 48 = 32+16 wrong at 64 rows, right at 32,
    # which use mma.sync); the kernel is memory bound, so the smaller tile costs little.
    block_r = block_r or max(32, next_pow2(f))
    if block_r < max(16, f) or block_r & (block_r - 1):
        raise ValueError(f"block_r={block_r} must be a power of two >= max(16, frames={f})")
    if block_r > 32 and (d1 > 0 or d0 != d):
        raise ValueError(f"block_r={block_r} with head dim {d}: tiles of more than 32 rows are only right for "
                         "head dims of one power-of-two tile (16/32/64/...); use block_r <= 32")
    seqs = block_r // f
    total = triton.cdiv(n * heads, seqs)
    pe = pe_qkv.float().contiguous() if pe_qkv is not None else qkv  # dummy pointer when HAS_PE is False
    warps = num_warps or (4 if block_r <= 64 else 8)
    meta = dict(FRAMES=f, HEAD_DIM=d, D0=d0, D1=d1, BLOCK_R=block_r, HAS_PE=pe_qkv is not None,
                PRECISION="ieee" if qkv.dtype == torch.float32 else None, num_warps=warps,
                num_stages=num_stages or 1)
    qk_scale = 1.0 / math.sqrt(d) * 1.4426950408889634
    with torch.cuda.device(qkv.device) if qkv.is_cuda else contextlib.nullcontext():
        for base in range(0, total, grid_limit):
            _temporal_attn_kernel[(min(grid_limit, total - base),)](
                qkv, pe, out, *qkv.stride(), n * heads, heads, c, base, qk_scale, **meta)
    return out


@torch.library.custom_op("animatediff_lite::temporal_attention_core", mutates_args=())
def temporal_attention_core_op(qkv: torch.Tensor, pe_qkv: torch.Tensor | None, heads: int) -> torch.Tensor:
    """The Triton kernel as an opaque op for torch.compile graphs."""
    return temporal_attention_core(qkv, pe_qkv, heads)


@temporal_attention_core_op.register_fake
def _(qkv, pe_qkv, heads):
    n, f, c3 = qkv.shape
    return qkv.new_empty(n, f, c3 // 3)
