"""Backend choice shared by the fused kernels: a verified Triton kernel where it is known to be right and faster,
PyTorch everywhere else.

Names: "auto" | "triton" | "torch".

- "auto":   a Triton kernel only where ``kernels/verified.toml`` lists it as having passed the GPU suite on this
            device's compute capability, this Triton major.minor and this dtype, and only at sizes at or above the
            table's measured thresholds (below them PyTorch was faster on that device). Everywhere else, CPU
            included, PyTorch (SDPA, F.group_norm, ...). An empty table means PyTorch everywhere.
- "triton": Triton wherever it can run: CUDA tensors, or CPU tensors when the kernels were imported with
            ``TRITON_INTERPRET=1`` (the CPU tests). Passed explicitly it is strict (raises if the kernel cannot
            run); set through the environment it falls back to PyTorch where Triton cannot run.
- "torch":  always the PyTorch reference.

Chosen once: :func:`resolve_backend` turns a name (or, for None, the environment variable
``ANIMATEDIFF_LITE_BACKEND``, else "auto") into a :class:`Backend` for one device, reading the table and the
device's capability once; pipelines hold it and their modules pass it to every op (``set_backend`` in
animatediff_lite/ops.py). Ops called with a plain name resolve "auto" through a per-device cache; only an op
called with ``backend=None`` outside a configured model reads the environment variable (tests, quick scripts).

Autograd: kernels without a backward are used only when no input requires grad (see ``needs_grad``).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass, field

import torch

from . import verified as vt

ENV_VAR = "ANIMATEDIFF_LITE_BACKEND"
BACKENDS = ("auto", "triton", "torch")
# The dtypes the kernels take, with their names in the verified table.
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


# Looked up once at import (cheap: no import of triton); a module constant keeps torch.compile from tracing
# through a cached function on every call.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``; it must be set before the kernel modules are imported."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def is_interpreted(kernel: object) -> bool:
    """True when a ``@triton.jit`` object was built by the interpreter (runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """True when autograd will record an op on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@dataclass(frozen=True)
class Backend:
    """One pipeline's kernel choice, resolved once for one device by :func:`resolve_backend`.

    ``name``: "auto" | "triton" | "torch". ``strict``: "triton" was asked for explicitly (raise where a kernel
    cannot run) rather than through the environment. ``device``: the device "auto" was resolved for (tensors
    elsewhere take PyTorch). ``enabled``: (kernel, dtype name) pairs "auto" may run (verified on ``device``).
    ``min_pixels``: (kernel, variant, dtype name) -> H*W below which "auto" takes PyTorch. ``slower``: (kernel,
    dtype name, shape key) where the kernel lost to PyTorch on this device.
    """

    name: str = "auto"
    strict: bool = False
    device: torch.device | None = None
    enabled: frozenset[tuple[str, str]] = frozenset()
    min_pixels: dict[tuple[str, str, str], int] = field(default_factory=dict, compare=False, hash=False)
    slower: frozenset[tuple[str, str, str]] = frozenset()

    def allows(self, kernel: str, dtype: torch.dtype, variant: str = "", pixels: int | None = None,
               shape: str | None = None) -> bool:
        """For "auto": the table lets ``kernel`` run on this dtype at this size / shape key."""
        name = DTYPE_NAMES.get(dtype)
        if name is None or (kernel, name) not in self.enabled:
            return False
        if shape is not None and (kernel, name, shape) in self.slower:
            return False
        return pixels is None or pixels >= self.min_pixels.get((kernel, variant, name), 0)


def _requested(name: str | None) -> tuple[str, bool]:
    """A backend name, or None for the environment variable -> (lower-cased name, asked for by name).

    ValueError naming the argument or the variable for an unknown name."""
    source, value = ("backend", name) if name is not None else (ENV_VAR, os.environ.get(ENV_VAR) or "auto")
    if not isinstance(value, str) or value.lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {value!r}")
    return value.lower(), name is not None


def resolve_backend(name: str | Backend | None = None, device: str | torch.device = "cpu",
                    table: vt.Table | None = None, capability: tuple[int, int] | None = None,
                    triton: str | None = None) -> Backend:
    """The :class:`Backend` for ``device``, decided once.

    ``name``: "auto" | "triton" | "torch", a Backend (returned as is), or None for the environment variable
    ANIMATEDIFF_LITE_BACKEND (default "auto"). For "auto" on CUDA the verified table (``table``, default the
    committed kernels/verified.toml) is matched against the device's compute capability and the installed
    Triton's major.minor (``capability``/``triton`` override both, for tests).
    """
    if isinstance(name, Backend):
        return name
    value, strict = _requested(name)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and capability is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if value == "triton" and strict:  # asked for by name: say now, not at the first op, if it cannot run
        if not _TRITON_AVAILABLE:
            raise ValueError("backend='triton': triton is not installed (pip install triton, or backend='auto')")
        if device.type != "cuda" and not interpreter_enabled():
            raise ValueError(f"backend='triton' on {device}: the kernels need a CUDA device (or TRITON_INTERPRET=1 "
                             "set before import, for tests); use backend='auto' or 'torch'")
    if value != "auto" or device.type != "cuda":  # "auto" off CUDA: PyTorch everywhere
        return Backend(value, strict=strict and value == "triton", device=device)
    try:  # the installed triton's version, from its metadata (without importing it)
        triton = triton or importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return Backend("auto", device=device)
    capability = capability or torch.cuda.get_device_capability(device)
    table = vt.load_table() if table is None else table
    cap, tri = vt.capability_str(capability), vt.major_minor(triton)
    enabled = frozenset((v.kernel, d) for v in table.verified if (v.capability, v.triton) == (cap, tri)
                        for d in v.dtypes)
    min_px = {(t.kernel, t.variant, t.dtype): t.min_pixels for t in table.thresholds if t.capability == cap}
    slower = frozenset((w.kernel, w.dtype, w.shape) for w in table.slower if w.capability == cap)
    return Backend("auto", device=device, enabled=enabled, min_pixels=min_px, slower=slower)


@functools.lru_cache(maxsize=16)
def _auto_for(device: torch.device) -> Backend:
    return resolve_backend("auto", device)


def use_triton(backend: str | Backend | None, *tensors: torch.Tensor, kernel: str = "", variant: str = "",
               pixels: int | None = None, shape: str | None = None, grad_ok: bool = False,
               why_not: str | None = None) -> bool:
    """Decide whether ``kernel`` should run on ``tensors``.

    ``backend``: a resolved :class:`Backend` (pipelines), a name, or None (the environment variable).
    ``kernel``/``variant``/``pixels``/``shape``: what "auto" looks up in the verified table (kernel name from
    ``verified.KERNELS``; variant and spatial size for the thresholds; a shape key for the ``[[slower]]`` rows).
    ``grad_ok``: the kernel has a backward, so inputs that require grad are fine.
    ``why_not``: a caller-side reason the kernel cannot take these inputs (unsupported shape, ...); None if it can.
    Returns False for the PyTorch path; raises ValueError for an unknown backend name and RuntimeError when
    "triton" was asked for explicitly but the kernel cannot run.
    """
    if isinstance(backend, Backend):
        name, strict, resolved = backend.name, backend.strict, backend
    else:
        (name, strict), resolved = _requested(backend), None
    if name == "torch":
        return False
    reason = why_not
    if reason is None and not _TRITON_AVAILABLE:
        reason = "triton is not installed"
    if reason is None and not all(t.dtype in DTYPE_NAMES for t in tensors):
        reason = f"dtypes {[t.dtype for t in tensors]} (kernels take float16/bfloat16/float32)"
    if reason is None and len({t.device for t in tensors}) > 1:
        reason = "tensors on different devices"
    if reason is None and not grad_ok and needs_grad(*tensors):
        # Not an error even when strict: training must keep working, the reference is differentiable.
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if name == "auto":
        if reason is not None or not on_cuda or not tensors:
            return False
        if resolved is not None and resolved.device != tensors[0].device:
            return False  # verified for another device
        return (resolved or _auto_for(tensors[0].device)).allows(kernel, tensors[0].dtype, variant, pixels, shape)
    if reason is None and not on_cuda and not interpreter_enabled():
        reason = "CPU tensors need TRITON_INTERPRET=1 (set before importing the kernels)"
    if reason is not None and strict:
        raise RuntimeError(f"backend='triton' requested but the kernel cannot run: {reason}")
    return reason is None


def check_runnable(kernel: object, t: torch.Tensor) -> None:
    """Raise a clear error instead of a crash when a compiled kernel would get CPU tensors."""
    if not t.is_cuda and not is_interpreted(kernel):
        raise RuntimeError("Triton kernel got CPU tensors but was compiled for the GPU: set TRITON_INTERPRET=1 "
                           "before animatediff_lite.kernels is imported")


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
