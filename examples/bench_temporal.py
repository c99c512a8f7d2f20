"""Temporal attention (motion modules): the Triton kernel vs PyTorch, at the SD1.5 UNet levels.

512x512 (64x64 latents), 16 frames, CFG batch 2, 8 heads: per level N = 2*h*w sequences of 16 frames with
C = 320/640/1280/1280 channels at 64x64/32x32/16x16/8x8 (N*heads = 65,536 at the first level).
- core: attention from the fused projections qkv (N, F, 3C) + per-frame PE bias -> (N, F, C). Memory bound:
  GB/s over the minimum bytes (read qkv once, write the output once) and % of the measured copy bandwidth
  (target >= 70%). Compared with the PyTorch core (PE add, head split transposes, SDPA, merge) and with SDPA
  alone on pre-split contiguous q/k/v, for each SDPA backend. Also the kernel's block_r / num_warps choices.
- block: the whole temporal attention block (LayerNorm, PE, projections, attention, out proj, residual),
  ops.temporal_attention fused vs the PyTorch reference.
Writes benchmarks/results/temporal-<dtype>-<device>.json. Run: python examples/bench_temporal.py [--dtype bf16]
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from bench_common import measure, rel_err, run_benchmark

FRAMES, HEADS = 16, 8
LEVELS = [("64x64", 2 * 64 * 64, 320), ("32x32", 2 * 32 * 32, 640), ("16x16", 2 * 16 * 16, 1280),
          ("8x8", 2 * 8 * 8, 1280)]


def bench_core(label: str, n: int, c: int, dtype: torch.dtype, dtype_name: str, bw: float) -> list[dict]:
    """Attention from qkv: the kernel (and its tiling choices), the PyTorch core, SDPA alone per backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from animatediff_lite.kernels.reference import temporal_attention_core_reference as core_ref
    from animatediff_lite.kernels.temporal_attention import temporal_attention_core

    d = c // HEADS
    qkv = torch.randn(n, FRAMES, 3 * c, device="cuda", dtype=dtype)
    pe_qkv = torch.randn(FRAMES, 3 * c, device="cuda")
    ref, ref_no_pe = core_ref(qkv.float(), pe_qkv, HEADS), core_ref(qkv.float(), None, HEADS)
    q, k, v = (t.reshape(n, FRAMES, HEADS, d).transpose(1, 2).contiguous() for t in qkv.split(c, -1))
    nbytes = qkv.numel() * qkv.element_size() * 4 // 3  # read q, k, v + write o
    core = {
        "triton core": functools.partial(temporal_attention_core, qkv, pe_qkv, HEADS),
        # block_r 32 is the default; more rows are refused for SD1.5's head dims (see the kernel's launcher).
        "triton core block_r=16": functools.partial(temporal_attention_core, qkv, pe_qkv, HEADS, block_r=16),
        "triton core block_r=32 w2": functools.partial(temporal_attention_core, qkv, pe_qkv, HEADS, block_r=32,
                                                       num_warps=2),
        "torch core (pe, transposes, sdpa)": functools.partial(core_ref, qkv, pe_qkv, HEADS),
    }
    for name, be in [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]:
        def run(be=be, q=q, k=k, v=v):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, FRAMES, c)
        core[f"sdpa {name} only (pre-split q/k/v, + merge)"] = run
    rows = []
    for name, fn in core.items():
        row = {"level": label, "N": n, "C": c, "F": FRAMES, "dtype": dtype_name, "part": "core", "variant": name}
        want = ref_no_pe if name.startswith("sdpa") else ref
        row = measure(row, fn, lambda out, want=want: {"rel_err": rel_err(out, want)})
        if "ms" in row:
            gbps = nbytes / row["ms"] / 1e6
            row.update(GBps=gbps, pct_bw=100 * gbps / bw)
        rows.append(row)
    return rows


def bench_block(label: str, n: int, c: int, dtype: torch.dtype, dtype_name: str, bw: float) -> list[dict]:
    """The whole block: ops.temporal_attention fused vs the PyTorch reference (times only: ``bw`` unused,
    the block's projections make it compute-bound)."""
    from animatediff_lite import ops
    from animatediff_lite.kernels.reference import temporal_attention_reference

    x = torch.randn(n, FRAMES, c, device="cuda", dtype=dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    p = {key: (torch.randn(*shape, device="cuda", generator=g) * s).to(dtype) for key, shape, s in [
        ("norm_weight", (c,), 1.0), ("norm_bias", (c,), 0.1), ("q_weight", (c, c), c**-0.5),
        ("k_weight", (c, c), c**-0.5), ("v_weight", (c, c), c**-0.5), ("out_weight", (c, c), c**-0.5),
        ("out_bias", (c,), 0.1)]}
    pe = torch.randn(1, 32, c, device="cuda")
    ref = temporal_attention_reference(x.float(), heads=HEADS, pe=pe, **{k: v.float() for k, v in p.items()})
    rows = []
    for name, backend in [("fused block (triton)", "triton"), ("torch block", "torch")]:
        fn = functools.partial(ops.temporal_attention, x, heads=HEADS, pe=pe, backend=backend, **p)
        row = {"level": label, "N": n, "C": c, "F": FRAMES, "dtype": dtype_name, "part": "block", "variant": name}
        with torch.no_grad():
            rows.append(measure(row, fn, lambda out: {"rel_err": rel_err(out - x, ref - x.float())}))
    return rows


def main() -> None:
    run_benchmark("temporal", __doc__.splitlines()[0], LEVELS, [bench_core, bench_block],
                  ["level", "part", "variant", "ms", "p20_ms", "p80_ms", "GBps", "pct_bw", "rel_err", "error"],
                  ceiling="copy_GBps")


if __name__ == "__main__":
    main()
