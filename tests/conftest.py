"""Shared test setup: Triton's CPU interpreter when there is no GPU, skipping of `gpu` tests without CUDA, and
:func:`require_oracle` for the test-only reference libraries (diffusers, transformers)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

# animatediff_lite.kernels reads TRITON_INTERPRET when its modules are imported (lazily, by the kernel tests),
# so it is set here, before any test module is collected. Only without CUDA: on a GPU machine the same tests run
# the compiled kernels on CUDA tensors. Model code is unaffected: on CPU tensors the "auto" backend is PyTorch.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test models are tiny: one intra-op thread avoids oversubscription (seen 10-15x slower with 2 threads on a
# busy 2-core machine) and keeps CPU results independent of the core count.
torch.set_num_threads(1)


def under_ci() -> bool:
    """True when the CI environment variable says so (CI=true, as GitHub Actions and most CI systems set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_oracle(name: str) -> ModuleType:
    """Import a test-only oracle module (``"diffusers"``, ``"transformers"``, or one of their submodules).

    Without it the calling test module is skipped, except under CI (``CI=true``): there a missing oracle fails
    the run, so an install without the test extra cannot pass by silently skipping every comparison.
    """
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if under_ci():
            pytest.fail(f"{name} is required under CI=true (install the test extra: pip install -e '.[test]'): {e}",
                        pytrace=False)
        pytest.skip(f"{name} is not installed (test extra); under CI=true this fails", allow_module_level=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_device() -> str:
    """Where the kernel tests run: the GPU when there is one, else the CPU under TRITON_INTERPRET=1."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _compare(name: str, out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> None:
    """assert_close with a printed mismatch count and the first mismatching indices."""
    out, ref = out.float().cpu(), ref.float().cpu()
    bad = ~torch.isclose(out, ref, atol=atol, rtol=rtol)
    n_bad = int(bad.sum())
    err = (out - ref).abs().max().item() if out.numel() else 0.0
    print(f"{name}: {n_bad}/{out.numel()} mismatches (atol={atol}, rtol={rtol}), max abs err {err:.3g}"
          + (f", first at {bad.nonzero()[:5].tolist()}" if n_bad else ""))
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


@pytest.fixture
def compare():
    """compare(name, out, ref, atol, rtol): assert_close that prints mismatch counts."""
    return _compare
