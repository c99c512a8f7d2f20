"""The kernel benchmarks' variant runner on CPU: a variant that refuses a shape is an error row, a device fault
(illegal address) stops the benchmark naming the variant that caused it instead of being recorded and blamed on
whatever runs next (what hid the source of the H200's illegal address in bench_temporal)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import bench_common  # noqa: E402


@pytest.fixture(autouse=True)
def fast_bench(monkeypatch):
    monkeypatch.setattr(bench_common, "bench", lambda fn: {"ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1})


def test_measure_fills_the_row() -> None:
    row = bench_common.measure({"variant": "ok"}, lambda: torch.ones(2), lambda out: {"rel_err": 0.0})
    assert row == {"variant": "ok", "ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1, "rel_err": 0.0}


def test_refusal_is_an_error_row() -> None:
    def refuse():
        raise RuntimeError("No available kernel. Aborting execution.\nmore")

    row = bench_common.measure({"variant": "sdpa cudnn"}, refuse)
    assert row == {"variant": "sdpa cudnn", "error": "No available kernel. Aborting execution."}


@pytest.mark.parametrize("make", [
    lambda: torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    lambda: RuntimeError("CUDA error: an illegal memory access was encountered"),
])
def test_device_fault_is_raised_with_the_variant(make) -> None:
    def crash():
        raise make()

    with pytest.raises(bench_common.DeviceFault, match="variant 'triton core block_r=16'"):
        bench_common.measure({"variant": "triton core block_r=16", "level": "64x64"}, crash)
