"""Shared test setup: Triton's CPU interpreter when there is no GPU, and skipping of `gpu` tests without CUDA."""

from __future__ import annotations

import os

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
