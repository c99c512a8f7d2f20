"""GroupNorm(+SiLU) per frame / jointly over frames, and GEGLU forward/backward, kernels vs references.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from animatediff_lite import ops
from animatediff_lite.kernels.reference import geglu_reference, group_norm_reference

DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 4e-3, 4e-3)]
FP16_EPS = 2.0**-11

# (N = B*F, C, H, W, groups, frames or None, silu): per frame, joint over 2/3/5 frames, 1 frame, odd spatial
# sizes (group sizes not multiples of the block), no affine parameters.
GN_CASES = [
    (4, 8, 5, 3, 2, None, True),
    (6, 12, 4, 4, 3, 3, False),
    (4, 16, 3, 5, 4, 2, True),
    (5, 6, 7, 9, 3, 5, True),
    (2, 4, 17, 19, 2, 1, False),
]


def _randn(*shape, device, dtype=torch.float32, seed=0, scale=1.0, shift=0.0):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale + shift
    return t.to(device, dtype)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("n,c,h,w,groups,frames,silu", GN_CASES)
def test_group_norm_matches_reference(n, c, h, w, groups, frames, silu, dtype, atol, rtol, affine, kernel_device,
                                      compare):
    # An offset mean (3) over a unit spread checks the variance is not taken as E[x^2] - E[x]^2.
    x = _randn(n, c, h, w, device=kernel_device, dtype=dtype, scale=2.0, shift=3.0)
    wt = _randn(c, device=kernel_device, dtype=dtype, seed=1) if affine else None
    b = _randn(c, device=kernel_device, dtype=dtype, seed=2) if affine else None
    out = ops.group_norm(x, groups, wt, b, 1e-6, silu=silu, frames=frames, backend="triton")
    assert out.shape == x.shape and out.dtype == dtype
    ref = group_norm_reference(x.float(), groups, wt.float() if affine else None, b.float() if affine else None,
                               1e-6, silu, frames)
    compare(f"group_norm {dtype} {(n, c, h, w, groups, frames, silu)}", out, ref, atol, rtol)
    if dtype == torch.float16:
        torch_err = (ops.group_norm(x, groups, wt, b, 1e-6, silu, frames, backend="torch").float() - ref).abs().max()
        err = (out.float() - ref).abs().max()
        print(f"fp16 max err kernel {err:.3g} vs torch {torch_err:.3g}")
        assert err <= 2 * max(torch_err.item(), FP16_EPS)


def test_joint_differs_from_per_frame(kernel_device):
    """Joint statistics are really taken over the frames (frames differ in scale, so the two must differ)."""
    x = _randn(4, 4, 3, 3, device=kernel_device) * torch.tensor([1.0, 3.0, 1.0, 3.0], device=kernel_device)[:, None,
                                                                                                           None, None]
    joint = ops.group_norm(x, 2, None, None, 1e-6, frames=2, backend="triton")
    per_frame = ops.group_norm(x, 2, None, None, 1e-6, backend="triton")
    assert (joint - per_frame).abs().max() > 0.1
    torch.testing.assert_close(joint, group_norm_reference(x, 2, None, None, 1e-6, frames=2), atol=1e-5, rtol=1e-5)


def test_group_norm_small_block_many_chunks(kernel_device, compare):
    from animatediff_lite.kernels.group_norm import group_norm_silu

    x = _randn(3, 6, 11, 13, device=kernel_device, seed=3)
    out = group_norm_silu(x, 3, None, None, 1e-5, silu=True, frames=3, block=64)
    compare("group_norm block 64", out, group_norm_reference(x, 3, None, None, 1e-5, True, 3), 1e-5, 1e-5)


def test_group_norm_autograd_and_args():
    x = torch.randn(4, 4, 3, 3, requires_grad=True)
    w = torch.ones(4, requires_grad=True)
    ops.group_norm(x, 2, w, None, 1e-6, silu=True, frames=2, backend="triton").sum().backward()  # reference
    assert x.grad is not None and w.grad is not None
    with pytest.raises(ValueError, match="frames"):
        ops.group_norm(x.detach(), 2, None, None, 1e-6, frames=3)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 40), (7, 258), (2, 1, 2, 600)])
def test_geglu_forward_backward(shape, dtype, atol, rtol, kernel_device, compare):
    x = _randn(*shape, device=kernel_device, dtype=dtype, seed=4, scale=2.0).requires_grad_()
    dy = _randn(*shape[:-1], shape[-1] // 2, device=kernel_device, dtype=dtype, seed=5)
    out = ops.geglu(x, backend="triton")
    (dx,) = torch.autograd.grad(out, x, dy)
    x32 = x.detach().float().requires_grad_()
    ref = geglu_reference(x32)
    (dx_ref,) = torch.autograd.grad(ref, x32, dy.float())
    compare(f"geglu {dtype} {shape}", out, ref, atol, rtol)
    compare(f"geglu grad {dtype} {shape}", dx, dx_ref, atol, rtol)
    if dtype == torch.float16:
        torch_out = geglu_reference(x.detach())
        torch_err = (torch_out.float() - ref).abs().max().item()
        err = (out.float() - ref).abs().max().item()
        print(f"fp16 max err kernel {err:.3g} vs torch {torch_err:.3g}")
        assert err <= 2 * max(torch_err, FP16_EPS)


def test_cpu_auto_is_reference():
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(ops.group_norm(x, 2, None, None, 1e-6, silu=True), group_norm_reference(x, 2, None, None, 1e-6,
                                                                                               True))
    y = torch.randn(3, 8)
    assert torch.equal(ops.geglu(y), geglu_reference(y))


def test_custom_op_registration(kernel_device):
    from animatediff_lite.kernels.geglu import geglu_op
    from animatediff_lite.kernels.group_norm import group_norm_silu_op

    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    x = _randn(4, 4, 3, 3, device=kernel_device, seed=6)
    w = _randn(4, device=kernel_device, seed=7)
    torch.library.opcheck(group_norm_silu_op, (x, 2, w, None, 1e-6, True, 2), test_utils=utils[:2])
    y = _randn(3, 16, device=kernel_device, seed=8).requires_grad_()
    torch.library.opcheck(geglu_op, (y,), test_utils=(*utils, "test_autograd_registration"))


# ---- GPU only: SD1.5 resnet GroupNorms at 512x512 / 16 frames / CFG (B*F = 32), and GEGLU of the motion FF ----

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c,hw,frames", [(320, 64, None), (320, 64, 16), (640, 32, 16), (1280, 16, None),
                                         (1280, 8, 16)])
def test_gpu_group_norm_sd15(c, hw, frames, dtype):
    x = _randn(32, c, hw, hw, device="cuda", dtype=dtype, seed=9)
    w = _randn(c, device="cuda", dtype=dtype, seed=10)
    b = _randn(c, device="cuda", dtype=dtype, seed=11)
    ref = group_norm_reference(x.float(), 32, w.float(), b.float(), 1e-5, True, frames)
    out = ops.group_norm(x, 32, w, b, 1e-5, silu=True, frames=frames, backend="triton")
    torch_out = ops.group_norm(x, 32, w, b, 1e-5, silu=True, frames=frames, backend="torch")
    err = ((out.float() - ref).norm() / ref.norm()).item()
    torch_err = ((torch_out.float() - ref).norm() / ref.norm()).item()
    print(f"{dtype} C={c} {hw}x{hw} frames={frames}: rel err kernel {err:.3g}, torch {torch_err:.3g}")
    assert err <= 2 * torch_err + 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_geglu_and_compile(dtype):
    x = _randn(2 * 64 * 64 * 16, 2560, device="cuda", dtype=dtype, seed=12)
    ref = geglu_reference(x.float())
    out = ops.geglu(x, backend="triton")
    torch_err = ((geglu_reference(x).float() - ref).norm() / ref.norm()).item()
    assert ((out.float() - ref).norm() / ref.norm()).item() <= 2 * torch_err + 1e-5
    f = torch.compile(lambda t: ops.geglu(t * 2, backend="triton"), fullgraph=True)
    torch.testing.assert_close(f(x[:4096]), ops.geglu(x[:4096] * 2, backend="triton"))
    g = torch.compile(lambda t: ops.group_norm(t, 32, None, None, 1e-5, silu=True, frames=16, backend="triton"),
                      fullgraph=True)
    y = x.reshape(-1)[:32 * 320 * 8 * 8].reshape(32, 320, 8, 8)
    torch.testing.assert_close(g(y), ops.group_norm(y, 32, None, None, 1e-5, silu=True, frames=16, backend="triton"))


def test_reference_backward_on_channels_last_cpu_input():
    """torch 2.13's CPU GroupNorm backward crashes on this layout; the reference must take a safe path."""
    import torch.nn.functional as F

    x = torch.randn(4, 6, 5, 16).permute(0, 3, 1, 2)  # channels-last strides, like the motion modules' input
    w = torch.randn(16, requires_grad=True)
    ops.group_norm(x, 4, w, None, 1e-6, silu=True).sum().backward()
    expected = torch.autograd.grad(F.silu(F.group_norm(x.contiguous(), 4, w, None, 1e-6)).sum(), w)[0]
    torch.testing.assert_close(w.grad, expected)
