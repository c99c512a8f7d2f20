"""Flash attention kernel vs the SDPA reference.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, tests/conftest.py) at
tiny shapes; with a GPU the same tests run compiled on CUDA, plus the `gpu` tests at the real SD1.5 shapes.
"""

from __future__ import annotations

import pytest
import torch

from animatediff_lite.attention import attention

# (dtype, atol, rtol) vs an fp32 reference on the same (rounded) inputs.
DTYPES = [(torch.float32, 2e-5, 1e-5), (torch.float16, 2e-3, 2e-3)]
FP16_EPS = 2.0**-11

# (B, H, Lq, Lk, D, causal): SD1.5 head dims 40/80/160 with tiny token counts, scaled-down ones (10, 20),
# key lengths off the tile (77 = cross-attention, 13, 5), one query block shorter than the tile.
SHAPES = [
    (1, 2, 33, 77, 40, False),
    (2, 1, 20, 13, 80, False),
    (1, 1, 16, 16, 160, False),
    (1, 3, 24, 24, 10, False),
    (2, 2, 17, 5, 20, False),
    (1, 2, 40, 40, 40, True),
]


def _qkv(B, H, Lq, Lk, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g).to(device, dtype) for n in (Lq, Lk, Lk)]


def _fp32_ref(q, k, v, causal=False):
    return torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("B,H,Lq,Lk,D,causal", SHAPES)
def test_kernel_matches_reference(B, H, Lq, Lk, D, causal, dtype, atol, rtol, kernel_device, compare):
    q, k, v = _qkv(B, H, Lq, Lk, D, dtype, kernel_device)
    out = attention(q, k, v, causal=causal, backend="triton")
    assert out.shape == q.shape and out.dtype == dtype
    ref = _fp32_ref(q, k, v, causal)
    compare(f"attn {dtype} {(B, H, Lq, Lk, D)}", out, ref, atol, rtol)
    if dtype == torch.float16:
        # The kernel's fp16 error must stay within ~2x of PyTorch's own fp16 error.
        torch_err = (attention(q, k, v, causal=causal, backend="torch").float() - ref).abs().max().item()
        err = (out.float() - ref).abs().max().item()
        print(f"fp16 max err kernel {err:.3g} vs torch {torch_err:.3g}")
        assert err <= 2 * max(torch_err, FP16_EPS)


@pytest.mark.parametrize("head_split", [True, False])
def test_head_split_and_padding_agree(head_split, kernel_device, compare):
    from animatediff_lite.kernels.attention import flash_attention

    q, k, v = _qkv(1, 2, 20, 21, 40, torch.float32, kernel_device, seed=1)
    out = flash_attention(q, k, v, head_split=head_split, block_m=16, block_n=16)
    compare(f"head_split={head_split}", out, _fp32_ref(q, k, v), 2e-5, 1e-5)


def test_grid_limit_chunks_batch_heads(kernel_device, compare):
    """batch*heads*query blocks beyond one launch's grid limit (simulated by a limit of 4 programs)."""
    from animatediff_lite.kernels.attention import flash_attention

    q, k, v = _qkv(3, 3, 20, 9, 16, torch.float32, kernel_device, seed=2)  # 3*3*2 = 18 programs -> 5 launches
    out = flash_attention(q, k, v, block_m=16, block_n=16, grid_limit=4)
    compare("grid limit 4", out, _fp32_ref(q, k, v), 2e-5, 1e-5)


def test_strided_inputs(kernel_device, compare):
    """Heads split by a view of (B, L, H, D), as the model code produces them, are read without a copy."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 19, 3, 3, 40, generator=g).to(kernel_device)  # (B, L, qkv, H, D)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    out = attention(q, k, v, backend="triton")
    compare("strided", out, _fp32_ref(q, k, v), 2e-5, 1e-5)


def test_autograd_and_cpu_fall_back_to_torch():
    q, k, v = (torch.randn(1, 2, 7, 8, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, backend="triton")  # grad required: the differentiable SDPA path, even when forced
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with torch.no_grad():
        # auto on CPU tensors is PyTorch (bit-identical to SDPA), also under TRITON_INTERPRET=1.
        assert torch.equal(attention(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_bad_backend_name():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="backend"):
        attention(q, q, q, backend="cuda")


# ---- GPU only: real SD1.5 shapes (64x64 latents, 16 frames, CFG -> B*F = 32, 8 heads), bf16 included ----

GPU_SHAPES = [  # (B, H, Lq, Lk, D)
    (32, 8, 4096, 4096, 40), (32, 8, 4096, 77, 40), (32, 8, 1024, 1024, 80), (32, 8, 1024, 77, 80),
    (32, 8, 256, 256, 160), (32, 8, 64, 64, 160), (32, 8, 256, 77, 160),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,Lq,Lk,D", GPU_SHAPES)
def test_gpu_sd15_shapes(B, H, Lq, Lk, D, dtype):
    q, k, v = _qkv(B, H, Lq, Lk, D, dtype, "cuda", seed=4)
    ref = _fp32_ref(q, k, v)
    out = attention(q, k, v, backend="triton")
    torch_out = attention(q, k, v, backend="torch")
    err = ((out.float() - ref).norm() / ref.norm()).item()
    torch_err = ((torch_out.float() - ref).norm() / ref.norm()).item()
    print(f"{dtype} {(B, H, Lq, Lk, D)}: rel err kernel {err:.3g}, SDPA {torch_err:.3g}")
    assert torch.isfinite(out).all()
    assert err <= 2 * torch_err + 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("head_split", [True, False])
def test_gpu_head_split_choice(head_split):
    from animatediff_lite.kernels.attention import flash_attention

    q, k, v = _qkv(4, 8, 1024, 1024, 80, torch.float16, "cuda", seed=5)
    ref = _fp32_ref(q, k, v)
    out = flash_attention(q, k, v, head_split=head_split)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-3


@pytest.mark.gpu
def test_gpu_custom_op_under_compile():
    q, k, v = _qkv(2, 8, 256, 77, 40, torch.float16, "cuda", seed=6)

    @torch.compile(fullgraph=True)
    def f(q, k, v):
        return attention(q * 2, k, v, backend="triton") + 1

    out = f(q, k, v)
    ref = attention(q * 2, k, v, backend="triton") + 1
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)


def test_custom_op_registration(kernel_device):
    """Schema, fake (meta) kernel and dispatch of the custom op, as torch.compile relies on them."""
    from animatediff_lite.kernels.attention import flash_attention_op

    q, k, v = _qkv(1, 2, 9, 13, 16, torch.float32, kernel_device, seed=7)
    torch.library.opcheck(flash_attention_op, (q, k, v, False),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_pytorch_path_splits_batches_past_the_cuda_sdpa_grid_limit(monkeypatch):
    """CUDA SDPA fails for a batch >= 65,536 (temporal attention at 1024x1024, two videos with CFG; the reference in
    test_gpu_more_than_65535_programs): the PyTorch paths split the batch. Limit shrunk to 3 to test on CPU."""
    import torch.nn.functional as F

    from animatediff_lite.kernels import reference
    from animatediff_lite.kernels.reference import temporal_attention_core_reference

    batches = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(reference.F, "scaled_dot_product_attention",
                        lambda q, *a, **kw: batches.append(q.shape[0]) or real(q, *a, **kw))
    q, k, v = _qkv(8, 2, 5, 6, 4, torch.float32, "cpu", seed=9)
    whole = attention(q, k, v, causal=False, backend="torch")
    qkv = torch.randn(7, 4, 3 * 8, generator=torch.Generator().manual_seed(1))
    core = temporal_attention_core_reference(qkv, None, 2)
    assert batches == [8, 7]
    batches.clear()
    monkeypatch.setattr(reference, "SDPA_MAX_BATCH", 3)
    torch.testing.assert_close(attention(q, k, v, backend="torch"), whole, atol=0, rtol=0)
    torch.testing.assert_close(temporal_attention_core_reference(qkv, None, 2), core, atol=0, rtol=0)
    assert batches == [3, 3, 2, 3, 3, 1]
