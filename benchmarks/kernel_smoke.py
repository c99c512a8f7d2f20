"""Small cases of the attention kernels, each in its own process, to localise a GPU fault quickly.

An illegal memory access poisons the whole CUDA context, so every case runs in a fresh subprocess
(CUDA_LAUNCH_BLOCKING=1) and reports ok / wrong (relative error vs the fp32 reference) / crashed.
With ``--asm DIR`` each case keeps its own Triton cache (TTGIR, PTX, SASS inputs) under DIR for reading offline.

    python benchmarks/kernel_smoke.py [--asm /tmp/asm] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# name -> (kind, kwargs)
CASES = {
    # attention: B, H, Lq, Lk, D, causal, fixed tiling (block_n, warps, stages) or None (autotuned)
    "attn d64": ("attn", dict(L=(128, 128), D=64)),
    "attn d32 lk77": ("attn", dict(L=(128, 77), D=32)),
    "attn d48 split": ("attn", dict(L=(128, 128), D=48)),
    "attn d40 split": ("attn", dict(L=(128, 128), D=40)),
    "attn d40 split s1": ("attn", dict(L=(128, 128), D=40, tiling=(64, 4, 1))),
    "attn d40 pad": ("attn", dict(L=(128, 128), D=40, split=False)),
    "attn d40 causal40": ("attn", dict(L=(40, 40), D=40, causal=True)),
    "attn d40 split w8": ("attn", dict(L=(128, 128), D=40, tiling=(64, 8, 2))),
    "attn d80 split": ("attn", dict(L=(256, 256), D=80)),
    "attn d160 split": ("attn", dict(L=(256, 77), D=160)),
    "attn d40 autotuned": ("attn", dict(L=(1024, 1024), D=40, tiling=None)),
    "attn d80 autotuned": ("attn", dict(L=(1024, 77), D=80, tiling=None)),
    "attn d160 autotuned": ("attn", dict(L=(256, 256), D=160, tiling=None)),
    # temporal: N sequences, F frames, heads, head dim, block_r
    "temporal d16": ("temporal", dict(n=64, f=16, heads=2, d=16)),
    "temporal d32": ("temporal", dict(n=64, f=16, heads=2, d=32)),
    "temporal d64": ("temporal", dict(n=64, f=16, heads=2, d=64)),
    "temporal d48": ("temporal", dict(n=64, f=16, heads=2, d=48)),
    "temporal d40": ("temporal", dict(n=64, f=16, heads=2, d=40)),
    "temporal d40 r32": ("temporal", dict(n=64, f=16, heads=2, d=40, block_r=32)),
    "temporal d40 pe": ("temporal", dict(n=64, f=16, heads=8, d=40, pe=True)),
    "temporal d80 pe": ("temporal", dict(n=64, f=16, heads=8, d=80, pe=True)),
    "temporal d160 f32": ("temporal", dict(n=16, f=32, heads=8, d=160, pe=True)),
    # examples/bench_temporal.py's core variants at its first level (64x64, CFG: N = 8192, C = 320, d = 40), each
    # alone: the 2026-11-28 H200 run hit an illegal address in that script and its broad except hid which variant.
    "bench temporal 64x64": ("temporal", dict(n=8192, f=16, heads=8, d=40, pe=True)),
    "bench temporal 64x64 r16": ("temporal", dict(n=8192, f=16, heads=8, d=40, pe=True, block_r=16)),
    "bench temporal 64x64 w2": ("temporal", dict(n=8192, f=16, heads=8, d=40, pe=True, block_r=32, warps=2)),
    "bench sdpa flash 64x64": ("sdpa", dict(n=8192, f=16, heads=8, d=40, backend="FLASH_ATTENTION")),
    "bench sdpa efficient 64x64": ("sdpa", dict(n=8192, f=16, heads=8, d=40, backend="EFFICIENT_ATTENTION")),
    "bench sdpa cudnn 64x64": ("sdpa", dict(n=8192, f=16, heads=8, d=40, backend="CUDNN_ATTENTION")),
}
# Too large for the CPU interpreter: a dry run without CUDA skips them.
GPU_ONLY = {name for name in CASES if name.startswith("bench ")}


def run_case(name: str) -> None:
    import torch

    from animatediff_lite.kernels.reference import attention_reference, temporal_attention_core_reference

    kind, kw = CASES[name]
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only under TRITON_INTERPRET=1 (a dry run)
    g = torch.Generator().manual_seed(0)
    if kind == "attn":
        from animatediff_lite.kernels.attention import flash_attention

        (lq, lk), d = kw["L"], kw["D"]
        q, k, v = (torch.randn(1, 2, n, d, generator=g).to(dev, torch.float16) for n in (lq, lk, lk))
        tiling = kw.get("tiling", (64, 4, 2))
        fixed = {} if tiling is None else dict(block_n=tiling[0], num_warps=tiling[1], num_stages=tiling[2])
        out = flash_attention(q, k, v, causal=kw.get("causal", False), head_split=kw.get("split", True), **fixed)
        ref = attention_reference(q.float(), k.float(), v.float(), kw.get("causal", False))
    elif kind == "sdpa":  # PyTorch's own backends on the pre-split temporal q/k/v (N, heads, F, d)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        n, f, heads, d = kw["n"], kw["f"], kw["heads"], kw["d"]
        q, k, v = (torch.randn(n, heads, f, d, generator=g).to(dev, torch.float16) for _ in range(3))
        try:
            with sdpa_kernel([getattr(SDPBackend, kw["backend"])]):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        except RuntimeError as e:
            if "No available kernel" not in str(e) and "No viable backend" not in str(e):
                raise
            print(f"RESULT ok (backend not available here: {str(e).splitlines()[0][:80]})")
            return
        ref = attention_reference(q.float(), k.float(), v.float())
    else:
        from animatediff_lite.kernels.temporal_attention import temporal_attention_core

        n, f, heads, d = kw["n"], kw["f"], kw["heads"], kw["d"]
        qkv = torch.randn(n, f, 3 * heads * d, generator=g).to(dev, torch.float16)
        pe = torch.randn(f, 3 * heads * d, generator=g).to(dev) if kw.get("pe") else None
        out = temporal_attention_core(qkv, pe, heads, block_r=kw.get("block_r"), num_warps=kw.get("warps"))
        ref = temporal_attention_core_reference(qkv.float(), pe, heads)
    if dev == "cuda":
        torch.cuda.synchronize()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    bad = ((out.float() - ref).abs() > 1e-2 + 1e-2 * ref.abs())
    where = bad.nonzero()[:4].tolist() if bad.any() else []
    print(f"RESULT {'ok' if err < 2e-3 else 'WRONG'} rel_err={err:.3g} bad={int(bad.sum())}/{bad.numel()} {where}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--asm", default=None, help="keep each case's Triton cache under this folder")
    p.add_argument("--only", nargs="+", default=None)
    p.add_argument("--jobs", type=int, default=8, help="cases run at once")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        run_case(args.case)
        return 0
    def one(i: int, name: str) -> str:
        env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"}
        if args.asm:
            env["TRITON_CACHE_DIR"] = os.path.join(args.asm, f"case{i:02d}")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--case", name], env=env, capture_output=True, text=True,
                           timeout=120)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
        status = lines[-1][7:] if lines else "CRASHED: " + (r.stderr.strip().splitlines() or ["?"])[-1][:150]
        return f"case{i:02d} {name:22s} {time.perf_counter() - t0:5.1f}s  {status}"

    # Cases in parallel processes: compiling dominates, and a fault stays in its own process.
    names = args.only or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; known: {list(CASES)}")
    import torch

    if not torch.cuda.is_available():
        skipped = [n for n in names if n in GPU_ONLY]
        names = [n for n in names if n not in GPU_ONLY]
        if skipped:
            print(f"needs CUDA: skipped {len(skipped)} SD1.5-size cases ({', '.join(skipped)})")
    if not names:
        return 0
    with ThreadPoolExecutor(args.jobs) as pool:
        reports = list(pool.map(one, *zip(*enumerate(names), strict=True)))
    print("\n".join(reports))
    return 1 if any("  ok " not in r for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
