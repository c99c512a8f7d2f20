"""GroupNorm(+SiLU) per frame and jointly over frames, and GEGLU: Triton kernels vs PyTorch.

SD1.5 resnet GroupNorms at 512x512 / 16 frames / CFG: x (B*F = 32, C, h, w) for (320, 64x64), (640, 32x32),
(1280, 16x16), (1280, 8x8), 32 groups, SiLU; per frame (v2/v3) and joint over 16 frames (v1). GEGLU of the
motion-module feed-forward: (N*F, 2*4C) -> (N*F, 4C) at each level, forward and forward+backward.
GB/s over the minimum bytes (one read of the input, one write of the output; the backward: x and dy read,
dx written) and % of the measured copy bandwidth. Writes benchmarks/results/norm-<dtype>-<device>.json.
Run: python examples/bench_norm.py [--dtype bf16]
"""

from __future__ import annotations

import functools

import torch
from bench_common import bench, rel_err, run_benchmark

GN_SHAPES = [("64x64", 320, 64), ("32x32", 640, 32), ("16x16", 1280, 16), ("8x8", 1280, 8)]
FRAMES = 16


def bench_group_norm(label: str, c: int, hw: int, dtype: torch.dtype, dtype_name: str, bw: float) -> list[dict]:
    from animatediff_lite import ops
    from animatediff_lite.kernels.reference import group_norm_reference

    x = torch.randn(2 * FRAMES, c, hw, hw, device="cuda", dtype=dtype)
    w = torch.randn(c, device="cuda", dtype=dtype)
    b = torch.randn(c, device="cuda", dtype=dtype)
    nbytes = 2 * x.numel() * x.element_size()
    rows = []
    for frames in (None, FRAMES):
        ref = group_norm_reference(x.float(), 32, w.float(), b.float(), 1e-5, True, frames)
        for backend in ("triton", "torch"):
            fn = functools.partial(ops.group_norm, x, 32, w, b, 1e-5, silu=True, frames=frames, backend=backend)
            t = bench(fn)
            gbps = nbytes / t["ms"] / 1e6
            rows.append({"op": "group_norm+silu", "shape": f"32x{c}x{hw}x{hw}", "level": label,
                         "stats": "joint" if frames else "per frame", "dtype": dtype_name, "variant": backend,
                         **t, "GBps": gbps, "pct_bw": 100 * gbps / bw, "rel_err": rel_err(fn(), ref)})
    return rows


def _geglu_fwd_bwd(x: torch.Tensor, dy: torch.Tensor, backend: str) -> torch.Tensor:
    from animatediff_lite import ops

    return torch.autograd.grad(ops.geglu(x, backend=backend), x, dy)[0]


def bench_geglu(label: str, c: int, hw: int, dtype: torch.dtype, dtype_name: str, bw: float) -> list[dict]:
    from animatediff_lite import ops
    from animatediff_lite.kernels.reference import geglu_reference

    rows_n = 2 * hw * hw * FRAMES
    x = torch.randn(rows_n, 8 * c, device="cuda", dtype=dtype)
    dy = torch.randn(rows_n, 4 * c, device="cuda", dtype=dtype)
    ref = geglu_reference(x.float())
    xg = x.detach().requires_grad_()
    size = x.numel() * x.element_size()
    rows = []
    for backend in ("triton", "torch"):
        fn = functools.partial(ops.geglu, x, backend=backend)
        t = bench(fn)
        gbps = 1.5 * size / t["ms"] / 1e6  # x read, y (half the size) written
        rows.append({"op": "geglu fwd", "shape": f"{rows_n}x{8 * c}", "level": label, "dtype": dtype_name,
                     "variant": backend, **t, "GBps": gbps, "pct_bw": 100 * gbps / bw, "rel_err": rel_err(fn(), ref)})
        t = bench(functools.partial(_geglu_fwd_bwd, xg, dy, backend))
        gbps = (1.5 + 2.5) * size / t["ms"] / 1e6  # + backward: x and dy read, dx written
        rows.append({"op": "geglu fwd+bwd", "shape": f"{rows_n}x{8 * c}", "level": label, "dtype": dtype_name,
                     "variant": backend, **t, "GBps": gbps, "pct_bw": 100 * gbps / bw})
    return rows


def main() -> None:
    run_benchmark("norm", __doc__.splitlines()[0], GN_SHAPES, [bench_group_norm, bench_geglu],
                  ["op", "shape", "stats", "variant", "ms", "p20_ms", "p80_ms", "GBps", "pct_bw", "rel_err"],
                  ceiling="copy_GBps")


if __name__ == "__main__":
    main()
