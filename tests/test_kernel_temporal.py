"""Temporal attention kernel (PE folded in, heads split/merged by strides) vs the PyTorch references, and the
reference vs the motion module's own temporal attention block.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from animatediff_lite import ops
from animatediff_lite.kernels.reference import temporal_attention_core_reference, temporal_attention_reference

DTYPES = [(torch.float32, 2e-5, 1e-5), (torch.float16, 5e-3, 5e-3)]
FP16_EPS = 2.0**-11

# (N sequences, frames, heads, head_dim, with PE, block_r, grid_limit): 1 frame, 32 frames, odd frame counts,
# SD1.5 head dims 40/80 and scaled-down ones (10, 20), grid limits that force several launches.
CORE_CASES = [
    (5, 16, 8, 40, True, None, None),
    (3, 1, 2, 10, True, None, None),
    (2, 32, 2, 20, False, None, None),
    (7, 13, 3, 16, True, 32, 3),
    (4, 24, 2, 80, True, None, 1),
]


def _randn(*shape, device, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("n,f,heads,d,with_pe,block_r,grid_limit", CORE_CASES)
def test_core_matches_reference(n, f, heads, d, with_pe, block_r, grid_limit, dtype, atol, rtol, kernel_device,
                                compare):
    from animatediff_lite.kernels.temporal_attention import GRID_LIMIT, temporal_attention_core

    c = heads * d
    qkv = _randn(n, f, 3 * c, device=kernel_device, dtype=dtype)
    pe_qkv = _randn(f, 3 * c, device=kernel_device, seed=1) if with_pe else None
    out = temporal_attention_core(qkv, pe_qkv, heads, block_r=block_r, grid_limit=grid_limit or GRID_LIMIT)
    assert out.shape == (n, f, c) and out.dtype == dtype
    ref = temporal_attention_core_reference(qkv.float(), pe_qkv, heads)
    compare(f"temporal core {dtype} {(n, f, heads, d)}", out, ref, atol, rtol)
    if dtype == torch.float16:
        torch_err = (temporal_attention_core_reference(qkv, pe_qkv, heads).float() - ref).abs().max().item()
        err = (out.float() - ref).abs().max().item()
        print(f"fp16 max err kernel {err:.3g} vs torch {torch_err:.3g}")
        assert err <= 2 * max(torch_err, FP16_EPS)


def test_core_reads_strided_qkv(kernel_device, compare):
    """qkv as a view with padded rows (channel stride 1, row stride > 3C) is read in place."""
    from animatediff_lite.kernels.temporal_attention import temporal_attention_core

    big = _randn(3, 16, 3 * 32 + 8, device=kernel_device, seed=2)
    qkv = big[..., 8:]
    out = temporal_attention_core(qkv, None, 2)
    compare("strided qkv", out, temporal_attention_core_reference(qkv, None, 2), 2e-5, 1e-5)


def _block_params(c, device, dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    p = dict(norm_weight=1 + 0.1 * torch.randn(c, generator=g), norm_bias=0.1 * torch.randn(c, generator=g),
             q_weight=torch.randn(c, c, generator=g) / c**0.5, k_weight=torch.randn(c, c, generator=g) / c**0.5,
             v_weight=torch.randn(c, c, generator=g) / c**0.5, out_weight=torch.randn(c, c, generator=g) / c**0.5,
             out_bias=0.1 * torch.randn(c, generator=g))
    return {k: v.to(device, dtype) for k, v in p.items()}


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 5e-5, 1e-5), (torch.float16, 1e-2, 1e-2)])
@pytest.mark.parametrize("n,f,heads,c", [(6, 16, 8, 80), (4, 1, 8, 16), (2, 32, 2, 40), (3, 13, 4, 40)])
def test_fused_block_matches_reference(n, f, heads, c, dtype, atol, rtol, kernel_device, compare):
    x = _randn(n, f, c, device=kernel_device, dtype=dtype, seed=4)
    pe = _randn(1, 32, c, device=kernel_device, seed=5)
    p = _block_params(c, kernel_device, dtype)
    out = ops.temporal_attention(x, heads=heads, pe=pe, backend="triton", **p)
    ref = temporal_attention_reference(x.float(), heads=heads, pe=pe, **{k: v.float() for k, v in p.items()})
    compare(f"temporal block {dtype} {(n, f, heads, c)}", out, ref, atol, rtol)
    if dtype == torch.float16:
        torch_err = (ops.temporal_attention(x, heads=heads, pe=pe, backend="torch", **p).float() - ref).abs().max()
        err = (out.float() - ref).abs().max()
        print(f"fp16 max err fused {err:.3g} vs torch {torch_err:.3g}")
        assert err <= 2 * max(torch_err.item(), FP16_EPS * ref.abs().max().item())


def test_reference_is_the_motion_module_block():
    """The functional reference equals `x = attn(norm(x)) + x` of the motion module (8 heads, PE, LayerNorm)."""
    import animatediff_lite.motion as motion
    c, f = 64, 12
    attn = motion.TemporalAttention(c, 8, 24)
    norm = torch.nn.LayerNorm(c)
    with torch.no_grad():
        for prm in [*attn.parameters(), *norm.parameters()]:
            prm.normal_(0, 0.2)
    x = torch.randn(5, f, c)
    with torch.no_grad():
        expected = attn(norm(x)) + x
        got = ops.temporal_attention(x, norm.weight, norm.bias, attn.to_q.weight, attn.to_k.weight, attn.to_v.weight,
                                     attn.to_out[0].weight, attn.to_out[0].bias, attn.num_heads,
                                     pe=attn.pos_encoder.pe, eps=norm.eps, backend="torch")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_autograd_falls_back_and_bad_args():
    c = 16
    p = {k: v.requires_grad_() for k, v in _block_params(c, "cpu").items()}
    x = torch.randn(2, 4, c, requires_grad=True)
    out = ops.temporal_attention(x, heads=2, backend="triton", **p)  # grad: the reference, even when forced
    out.sum().backward()
    assert x.grad is not None and p["q_weight"].grad is not None
    with pytest.raises(ValueError, match="heads"):
        ops.temporal_attention(x, heads=3, **p)
    with pytest.raises(ValueError, match="pe"):
        ops.temporal_attention(x, heads=2, pe=torch.zeros(3, c), **p)


def test_custom_op_registration(kernel_device):
    from animatediff_lite.kernels.temporal_attention import temporal_attention_core_op

    qkv = _randn(3, 4, 3 * 16, device=kernel_device, seed=6)
    pe_qkv = _randn(4, 3 * 16, device=kernel_device, seed=7)
    torch.library.opcheck(temporal_attention_core_op, (qkv, pe_qkv, 2),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


# ---- GPU only: SD1.5 levels at 512x512 (64x64 latents), 16 frames, CFG batch 2, 8 heads ----

GPU_LEVELS = [(2 * 64 * 64, 320), (2 * 32 * 32, 640), (2 * 16 * 16, 1280), (2 * 8 * 8, 1280)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,c", GPU_LEVELS)
def test_gpu_sd15_levels(n, c, dtype):
    x = _randn(n, 16, c, device="cuda", dtype=dtype, seed=8)
    pe = _randn(1, 32, c, device="cuda", seed=9)
    p = _block_params(c, "cuda", dtype)
    ref = temporal_attention_reference(x.float(), heads=8, pe=pe, **{k: v.float() for k, v in p.items()})
    out = ops.temporal_attention(x, heads=8, pe=pe, backend="triton", **p)
    torch_out = ops.temporal_attention(x, heads=8, pe=pe, backend="torch", **p)
    err = ((out.float() - ref).norm() / (ref - x.float()).norm()).item()
    torch_err = ((torch_out.float() - ref).norm() / (ref - x.float()).norm()).item()
    print(f"{dtype} N={n} C={c}: rel err fused {err:.3g}, torch {torch_err:.3g}")
    assert err <= 2 * torch_err + 1e-4


@pytest.mark.gpu
def test_gpu_more_than_65535_programs():
    """1024x1024 with CFG: 2*128*128*8 = 262,144 sequences -> 65,536 programs on grid axis 0."""
    from animatediff_lite.kernels.temporal_attention import temporal_attention_core

    n, heads, c = 2 * 128 * 128, 8, 320
    qkv = _randn(n, 16, 3 * c, device="cuda", dtype=torch.float16, seed=10)
    out = temporal_attention_core(qkv, None, heads)
    ref = temporal_attention_core_reference(qkv.float(), None, heads)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-3


@pytest.mark.gpu
def test_gpu_under_compile():
    c = 320
    x = _randn(512, 16, c, device="cuda", dtype=torch.float16, seed=11)
    pe = _randn(1, 32, c, device="cuda", seed=12)
    p = _block_params(c, "cuda", torch.float16)
    f = torch.compile(lambda x: ops.temporal_attention(x, heads=8, pe=pe, backend="triton", **p), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(f(x), ops.temporal_attention(x, heads=8, pe=pe, backend="triton", **p),
                                   atol=2e-3, rtol=2e-3)


def test_wide_row_tiles_refused_for_split_head_dims(kernel_device):
    """More than 32 rows lowers to Hopper's wgmma, which got masked head-dim tiles wrong (seen on an H200)."""
    from animatediff_lite.kernels.temporal_attention import temporal_attention_core

    qkv = torch.zeros(4, 16, 3 * 2 * 40, device=kernel_device)
    with pytest.raises(ValueError, match="block_r=64 with head dim 40"):
        temporal_attention_core(qkv, None, 2, block_r=64)


@pytest.mark.parametrize("n,f,heads,d,block_r,warps", [
    (7, 16, 8, 40, 16, None),  # bench_temporal's block_r=16 tiling
    (9, 16, 3, 40, 32, 2),  # its 2-warp tiling; 27 sequences in programs of 2: the last one is partial
    (7, 16, 3, 40, None, None),  # the default tiling, partial last program
    (5, 13, 4, 80, None, None),  # 13 frames: rows 26..31 of every 32-row tile hold no sequence
    (3, 16, 2, 16, 64, None),  # 4 sequences per program, 6 in all
])
def test_core_reads_nothing_outside_its_input(n, f, heads, d, block_r, warps, kernel_device, compare):
    """qkv as a view inside a NaN-filled buffer: any unmasked read outside it (a wrong offset, a row or column mask
    missing on the partial last program) puts NaN in the output. Covers the tilings bench_temporal ran on the H200
    (block_r=16, 2 warps) at odd N, where the last program is partial."""
    from animatediff_lite.kernels.temporal_attention import temporal_attention_core

    c = heads * d
    big = torch.full((n + 4, f + 1, 3 * c + 24), float("nan"), device=kernel_device)
    qkv = big[2:2 + n, :f, 8:8 + 3 * c]
    qkv.copy_(_randn(n, f, 3 * c, device=kernel_device, seed=13))
    pe_qkv = _randn(f, 3 * c, device=kernel_device, seed=14)
    out = temporal_attention_core(qkv, pe_qkv, heads, block_r=block_r, num_warps=warps)
    assert torch.isfinite(out).all(), "read outside the input"
    compare(f"guarded {(n, heads, d, block_r, warps)}", out, temporal_attention_core_reference(qkv, pe_qkv, heads),
            2e-5, 1e-5)
