"""Backend choice shared by the fused kernels: Triton where it can run, PyTorch everywhere else.

One switch per call: the ``backend`` argument ("auto" | "triton" | "torch"), defaulting to the
environment variable ``ANIMATEDIFF_LITE_BACKEND`` and then to "auto".

- "auto":   Triton for CUDA tensors when triton imports, PyTorch otherwise (CPU always uses PyTorch,
            even under ``TRITON_INTERPRET=1``, so CPU model code never pays for the interpreter).
- "triton": Triton wherever it can run: CUDA tensors, or CPU tensors when the kernels were imported with
            ``TRITON_INTERPRET=1`` (the CPU tests). Passed as an argument it is strict (raises if the kernel
            cannot run); set through the environment it falls back to PyTorch where Triton cannot run.
- "torch":  always the PyTorch reference.

Autograd: kernels without a backward are used only when no input requires grad (see ``needs_grad``).
"""

from __future__ import annotations

import importlib.util
import os

import torch

ENV_VAR = "ANIMATEDIFF_LITE_BACKEND"
BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Looked up once at import (cheap: no import of triton); a module constant keeps torch.compile from tracing
# through a cached function on every call.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the triton package can be imported (checked once, without importing it)."""
    return _TRITON_AVAILABLE


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``; it must be set before the kernel modules are imported."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def is_interpreted(kernel: object) -> bool:
    """True when a ``@triton.jit`` object was built by the interpreter (runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """True when autograd will record an op on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def use_triton(backend: str | None, *tensors: torch.Tensor, grad_ok: bool = False, why_not: str | None = None) -> bool:
    """Decide whether a kernel should run on ``tensors``.

    ``grad_ok``: the kernel has a backward, so inputs that require grad are fine.
    ``why_not``: a caller-side reason the kernel cannot take these inputs (unsupported shape, ...); None if it can.
    Returns False for the PyTorch path; raises ValueError for an unknown backend name and RuntimeError when
    the caller passed backend="triton" explicitly but the kernel cannot run.
    """
    strict = backend is not None
    name = (backend if backend is not None else os.environ.get(ENV_VAR, "auto")).lower() or "auto"
    if name not in BACKENDS:
        source = "backend" if strict else ENV_VAR
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    if name == "torch":
        return False
    reason = why_not
    if reason is None and not triton_available():
        reason = "triton is not installed"
    if reason is None and not all(t.dtype in KERNEL_DTYPES for t in tensors):
        reason = f"dtypes {[t.dtype for t in tensors]} (kernels take float16/bfloat16/float32)"
    if reason is None and len({t.device for t in tensors}) > 1:
        reason = "tensors on different devices"
    if reason is None and not grad_ok and needs_grad(*tensors):
        # Not an error even when strict: training must keep working, the reference is differentiable.
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if reason is None and not on_cuda:
        if name == "auto":
            return False
        if not interpreter_enabled():
            reason = "CPU tensors need TRITON_INTERPRET=1 (set before importing the kernels)"
    if reason is None:
        return True
    if strict and name == "triton":
        raise RuntimeError(f"backend='triton' requested but the kernel cannot run: {reason}")
    return False


def check_runnable(kernel: object, t: torch.Tensor) -> None:
    """Raise a clear error instead of a crash when a compiled kernel would get CPU tensors."""
    if not t.is_cuda and not is_interpreted(kernel):
        raise RuntimeError("Triton kernel got CPU tensors but was compiled for the GPU: set TRITON_INTERPRET=1 "
                           "before animatediff_lite.kernels is imported")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def split_head_dim(d: int, split: bool = True, min_tile: int = 16) -> tuple[int, int]:
    """Head-dim tiles (D0, D1) for tl.dot, whose dims must be powers of two >= 16.

    split=True:  D0 = largest power of two <= d, D1 = power of two covering the rest (0 if none):
                 40 -> (32, 16), 80 -> (64, 16), 160 -> (128, 32): 48/96/192 columns of work.
    split=False: one padded tile: 40 -> (64, 0), 80 -> (128, 0), 160 -> (256, 0).
    """
    if not split:
        return max(min_tile, next_pow2(d)), 0
    d0 = max(min_tile, 1 << (d.bit_length() - 1))
    rest = d - d0
    return d0, (max(min_tile, next_pow2(rest)) if rest > 0 else 0)
