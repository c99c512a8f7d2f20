"""Smoke test of examples/bench_pipeline.py at the micro size, so the benchmark cannot rot.

Runs the benchmark's main() with one timed run: our pipeline and diffusers' AnimateDiffPipeline on the same random
weights and latents; checks the JSON result's fields and that the two videos agree (diffusers with the per-frame
motion GroupNorm of the original AnimateDiff, see tests/test_pipeline.py).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
from conftest import require_oracle

require_oracle("diffusers")
require_oracle("transformers")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ATOL = 1e-4  # fp32 on the CPU: the same arithmetic in a different order


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module("bench_pipeline")
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_cache")


def _run(bench, cache: Path, out: Path, *extra: str) -> dict:
    result = bench.main(["--size", "micro", "--device", "cpu", "--runs", "1", "--threads", "1", "--cache-dir",
                         str(cache), "--out-dir", str(out), *extra])
    path = out / "bench_pipeline-cpu-micro.json"
    assert path.is_file()
    assert json.loads(path.read_text()) == json.loads(json.dumps(result, default=str))
    return result


def test_micro_benchmark_in_process_matches_diffusers(bench, cache: Path, tmp_path: Path) -> None:
    result = _run(bench, cache, tmp_path, "--in-process")
    for key in ("device", "torch", "diffusers", "transformers", "triton", "dtype", "threads", "load_average_before",
                "shapes", "results", "ratios", "max_abs_diff", "video_stats"):
        assert key in result, key
    assert result["shapes"] == {"frames": 4, "height": 16, "width": 16, "steps": 2, "guidance_scale": 7.5,
                                "cfg_batch": 2, "latents": [1, 4, 4, 8, 8]}
    rows = {r["variant"]: r for r in result["results"]}
    assert sorted(rows) == ["diffusers", "ours"]
    for row in rows.values():
        assert len(row["runs_s"]) == 1 and row["total_s"] > 0 and row["it_per_s"] > 0
        assert row["peak_bytes"] > 0 and row["weights_bytes"] > 0 and row["load_s"] > 0
    ratio = result["ratios"]["ours vs diffusers"]
    assert ratio["speedup"] > 0 and ratio["memory_ratio"] > 0
    # Same weights and latents: the videos agree once diffusers normalises the motion module per frame...
    err = result["max_abs_diff"]["ours vs diffusers (per-frame motion norm)"]
    print(f"ours vs diffusers (per-frame motion norm): max abs diff {err:.2e}")
    assert err <= ATOL
    # ... and not without that patch, so the check sees the motion modules (they are not identity maps).
    assert result["max_abs_diff"]["ours vs diffusers (unpatched, joint motion norm)"] > 10 * ATOL
    stats = result["video_stats"]
    assert stats["std"] > 0.01 and stats["saturated_fraction"] < 0.5  # not a constant or clipped video


def test_micro_benchmark_in_subprocesses(bench, cache: Path, tmp_path: Path) -> None:
    # The default (command-line) path: every variant in a fresh process; only ours, to keep the test short.
    result = _run(bench, cache, tmp_path, "--variants", "ours")
    (row,) = result["results"]
    assert row["variant"] == "ours" and result["isolated_processes"]
    assert row["peak_bytes"] >= row["after_load_bytes"] > 0
    assert "ours vs diffusers" not in result["ratios"]


def test_profile_table_and_result_label(bench, cache: Path, tmp_path: Path) -> None:
    bench.main(["--size", "micro", "--device", "cpu", "--runs", "1", "--threads", "1", "--cache-dir", str(cache),
                "--out-dir", str(tmp_path), "--in-process", "--variants", "ours", "--profile", "--label", "try"])
    assert (tmp_path / "bench_pipeline-cpu-micro-try.json").is_file()
    table = (tmp_path / "profile-ours-cpu-micro.txt").read_text()
    assert table.startswith("ours, micro, sorted by cpu_time_total") and "aten::conv2d" in table


def test_levers_switch_on_and_off_with_decode_share(bench, cache: Path, tmp_path: Path) -> None:
    """Each lever is a variant suffix: the variants run, report the VAE decode's share, and give our video."""
    # (ours+triton is not run here: the whole pipeline through the Triton interpreter takes minutes on a CPU.)
    result = _run(bench, cache, tmp_path, "--in-process", "--variants", "ours", "ours+torch+nofuse+cl", "ours+nofuse")
    rows = {r["variant"]: r for r in result["results"]}
    assert rows["ours+torch+nofuse+cl"]["levers"] == ["cl", "nofuse", "torch"]
    for row in rows.values():
        assert 0 < row["decode_s"] < row["total_s"] and 0 < row["decode_share"] < 1
    for name in ("ours+torch+nofuse+cl", "ours+nofuse"):
        assert result["max_abs_diff"][f"{name} vs ours"] <= ATOL, name


@pytest.mark.parametrize("name", ["ours+fast", "diffusers+triton", "ours+torch+triton", "theirs", "ours+cl+cl"])
def test_unknown_variants_are_refused(bench, name: str) -> None:
    with pytest.raises(ValueError, match="--variants"):
        bench.parse_variant(name)
    assert bench.parse_variant("ours+cudagraphs+cl") == ("ours", frozenset({"cudagraphs", "cl"}))
