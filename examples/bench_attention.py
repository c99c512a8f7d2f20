"""Spatial attention: the Triton flash kernel (split and padded head dim) vs every PyTorch SDPA backend.

SD1.5 shapes at 512x512 (64x64 latents), 16 frames, CFG batch 2 -> B*F = 32 images, 8 heads:
self-attention over 4096/1024/256/64 tokens with head dims 40/80/160/160, cross-attention over 77 text
tokens. Prints time (median, p20-p80), TFLOP/s (4*B*H*Lq*Lk*D flops) and % of the measured fp16 matmul
rate; writes benchmarks/results/attention-<dtype>-<device>.json. Run: python examples/bench_attention.py [--dtype bf16]
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from bench_common import measure, rel_err, run_benchmark

# (name, B, H, Lq, Lk, D)
SHAPES = [
    ("self 64x64", 32, 8, 4096, 4096, 40), ("self 32x32", 32, 8, 1024, 1024, 80),
    ("self 16x16", 32, 8, 256, 256, 160), ("self 8x8", 32, 8, 64, 64, 160),
    ("cross 64x64", 32, 8, 4096, 77, 40), ("cross 32x32", 32, 8, 1024, 77, 80),
    ("cross 16x16", 32, 8, 256, 77, 160), ("cross 8x8", 32, 8, 64, 77, 160),
]


def _variants() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from animatediff_lite.kernels.attention import flash_attention

    variants = {
        "triton split-D": lambda q, k, v: flash_attention(q, k, v, head_split=True),
        "triton pad-D": lambda q, k, v: flash_attention(q, k, v, head_split=False),
    }
    for name, be in [("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa math", SDPBackend.MATH)]:
        def run(q, k, v, be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v)
        variants[name] = run
    return variants


def bench_shape(label: str, B: int, H: int, Lq: int, Lk: int, D: int, dtype: torch.dtype, dtype_name: str,
                peak: float) -> list[dict]:
    """All variants at one shape; a variant that cannot take it is recorded with its error."""
    q = torch.randn(B, H, Lq, D, device="cuda", dtype=dtype)
    k = torch.randn(B, H, Lk, D, device="cuda", dtype=dtype)
    v = torch.randn(B, H, Lk, D, device="cuda", dtype=dtype)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    flops = 4 * B * H * Lq * Lk * D
    rows = []
    for name, fn in _variants().items():
        row = {"shape": label, "B": B, "H": H, "Lq": Lq, "Lk": Lk, "D": D, "dtype": dtype_name, "variant": name}
        # An SDPA backend that does not take this shape/dtype/device gives an error row; a device fault stops.
        row = measure(row, functools.partial(fn, q, k, v), lambda out: {"rel_err": rel_err(out, ref)})
        if "ms" in row:
            tflops = flops / row["ms"] / 1e9
            row.update(TFLOPs=tflops, pct_peak=100 * tflops / peak)
        rows.append(row)
    return rows


def main() -> None:
    run_benchmark("attention", __doc__.splitlines()[0], SHAPES, [bench_shape],
                  ["shape", "D", "Lk", "variant", "ms", "p20_ms", "p80_ms", "TFLOPs", "pct_peak", "rel_err", "error"],
                  ceiling="matmul_fp16_TFLOPs", quick=2)


if __name__ == "__main__":
    main()
