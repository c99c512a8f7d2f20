"""Shared helpers of the kernel benchmarks: CUDA check, timing, device ceilings, table and JSON output.

Timing: triton.testing.do_bench (CUDA events, L2 flushed between runs, warm-up and repetitions in ms),
median with p20/p80. Ceilings: datasheet numbers for known GPUs plus a measured device-to-device copy
(bandwidth) and a large fp16 matmul (tensor-core rate); percentages use the measured ones.
"""

from __future__ import annotations

import json
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"

# Dense fp16/bf16 tensor-core TFLOP/s and HBM TB/s from the vendor datasheets (leads, not measurements).
DATASHEET = {"H100 80GB HBM3": (989.0, 3.35), "H100 PCIe": (756.0, 2.0), "H100 NVL": (835.0, 3.9),
             "H200": (989.0, 4.8), "A100-SXM4-80GB": (312.0, 2.04), "A100-SXM4-40GB": (312.0, 1.56),
             "RTX 4090": (165.0, 1.01)}


def require_cuda(name: str) -> None:
    """Print a clear message and exit 0 when there is no GPU (the benchmarks are GPU-only)."""
    if not torch.cuda.is_available():
        print(f"{name}: needs CUDA (a GPU with triton); nothing to measure on this machine.")
        sys.exit(0)


def bench(fn: Callable[[], object], warmup_ms: int = 50, rep_ms: int = 300) -> dict[str, float]:
    """Median, p20 and p80 run time of fn in milliseconds."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"ms": med, "p20_ms": p20, "p80_ms": p80}


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by one call of fn above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure_ceilings() -> dict[str, float]:
    """Measured copy bandwidth (GB/s, bytes read + written) and fp16 matmul rate (TFLOP/s)."""
    x = torch.empty(2**28, dtype=torch.float32, device="cuda").normal_()  # 1 GiB
    y = torch.empty_like(x)
    copy_ms = bench(lambda: y.copy_(x))["ms"]
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    mm_ms = bench(lambda: a @ b)["ms"]
    return {"copy_GBps": 2 * 2**30 / copy_ms / 1e6, "matmul_fp16_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


def device_context() -> dict[str, object]:
    """Device name, versions and ceilings recorded with every result file."""
    import triton

    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    sheet = next((v for k, v in DATASHEET.items() if k in name), None)
    measured = measure_ceilings()
    torch.cuda.empty_cache()
    return {
        "device": name, "capability": list(torch.cuda.get_device_capability(0)),
        "sm_count": props.multi_processor_count, "memory_GiB": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "datasheet": {"tflops_fp16": sheet[0], "TBps": sheet[1]} if sheet else None,
        "measured": measured,
    }


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Plain fixed-width table of the given columns."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def device_slug(name: str) -> str:
    """A device name as it appears in result file names: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_json(name: str, context: dict, rows: list[dict], out_dir: Path | None = None) -> Path:
    """benchmarks/results/<name>-<device>.json with the device context and the result rows."""
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{device_slug(str(context['device']))}.json"
    path.write_text(json.dumps({"benchmark": name, **context, "results": rows}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


class DeviceFault(RuntimeError):
    """A variant broke the CUDA context (illegal address, ...): nothing after it can run in this process."""


def is_device_fault(e: BaseException) -> bool:
    """True for errors that poison the CUDA context, as opposed to a variant refusing a shape or dtype."""
    fault_type = getattr(torch, "AcceleratorError", None)  # a RuntimeError subclass (torch >= 2.8)
    text = str(e)
    return (fault_type is not None and isinstance(e, fault_type)) or "illegal memory access" in text or \
        "unspecified launch failure" in text or "misaligned address" in text


def measure(row: dict, fn: Callable[[], object], check: Callable[[object], dict] | None = None) -> dict:
    """One variant: ``check(fn())`` (extra fields such as rel_err), then the timing; returns the completed row.

    The device is synchronised after each call, so an asynchronous fault is charged to the variant that caused
    it (the H200 run of 2026-11-28 blamed bench_temporal's block part for a fault of its core part, because a
    broad ``except RuntimeError`` recorded the fault as an error row and the next variants too). A variant that
    refuses its inputs (e.g. an SDPA backend not built for the shape) gives an ``error`` row; a device fault
    raises :class:`DeviceFault` naming the variant.
    """
    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    try:
        out = fn()
        sync()
        extra = check(out) if check is not None else {}
        timing = bench(fn)
        sync()
    except RuntimeError as e:
        if is_device_fault(e):
            raise DeviceFault(f"device fault in variant {row.get('variant')!r} at {row}: "
                              f"{str(e).splitlines()[0]}") from e
        return {**row, "error": str(e).splitlines()[0][:120]}
    return {**row, **timing, **extra}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32."""
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def run_benchmark(name: str, description: str, shapes: list[tuple], benches: list[Callable[..., list[dict]]],
                  columns: list[str], ceiling: str, quick: int = 0) -> Path | None:
    """The shared main of the kernel benchmarks: ``--dtype`` (and ``--quick``), device ceilings, then every
    bench over every shape as ``bench(*shape, dtype, dtype_name, ceiling_value)``; prints the table and saves it
    as ``benchmarks/results/<name>-<dtype>-<device>.json``.

    ``ceiling`` is the key of ``device_context()["measured"]`` the percentages refer to; ``quick`` > 0 adds
    ``--quick`` (only the first ``quick`` shapes).
    """
    import argparse

    require_cuda(f"bench_{name}")
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    if quick:
        parser.add_argument("--quick", action="store_true", help=f"only the first {quick} shapes")
    args = parser.parse_args()
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    ctx = device_context()
    peak = ctx["measured"][ceiling]
    rows, fault = [], None
    for shape in shapes[:quick] if quick and args.quick else shapes:
        for fn in benches:
            try:
                rows += fn(*shape, dtype, args.dtype, peak)
            except DeviceFault as e:  # the context is gone: keep what was measured, say where it broke
                fault = str(e)
                rows.append({"variant": "DEVICE FAULT", "error": fault[:300]})
                break
        if fault:
            break
        torch.cuda.empty_cache()
    print(f"{ctx['device']}  torch {ctx['torch']}  triton {ctx['triton']}  measured {ceiling} {peak:.0f}")
    print_table(rows, columns)
    path = write_json(f"{name}-{args.dtype}", ctx, rows)
    if fault:
        print(f"bench_{name}: {fault}", file=sys.stderr)
        sys.exit(1)
    return path
