"""benchmarks/gpu_check.sh, the one-call GPU verification, dry-run on a CPU machine: it must list every step with
"needs CUDA" and exit 0, and every script and benchmark variant it names must exist, so it cannot rot between GPU
sessions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ("kernel_smoke.py", "--junitxml", "-m gpu tests", "bench_norm.py", "write_verified.py", "--label levers",
         "bench_temporal.py", "bench_attention.py", "--label compile")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script measures for real")
def test_dry_run_lists_every_step_and_exits_0(tmp_path: Path) -> None:
    before = sorted(p.name for p in (ROOT / "benchmarks/results/logs").iterdir())
    r = subprocess.run(["bash", str(SCRIPT), "all", "60"], cwd=ROOT, env={**os.environ, "OUT": str(tmp_path)},
                       capture_output=True, text=True, timeout=120)
    print(r.stdout, r.stderr)
    assert r.returncode == 0
    skipped = [line for line in r.stdout.splitlines() if line.startswith("needs CUDA, skipped:")]
    for step in STEPS:
        assert any(step in line for line in skipped), step
    assert (tmp_path / "results.tar.gz").is_file() and (tmp_path / "gpu.log").is_file()
    assert sorted(p.name for p in (ROOT / "benchmarks/results/logs").iterdir()) == before  # a dry run writes no log
    bad = subprocess.run(["bash", str(SCRIPT), "nonsense", "60"], cwd=ROOT, env={**os.environ, "OUT": str(tmp_path)},
                         capture_output=True, text=True, timeout=60)
    assert "unknown part nonsense" in bad.stdout


def test_named_scripts_and_variants_exist() -> None:
    text = SCRIPT.read_text()
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    for path in re.findall(r"python3 ((?:benchmarks|examples)/\S+\.py)", text) + re.findall(r"(tests/\S+\.py)", text):
        assert (ROOT / path).is_file(), path
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import bench_pipeline
    finally:
        sys.path.remove(str(ROOT / "examples"))
    variants = [v for line in re.findall(r"--variants ([^\n\\]+)", text) for v in line.split()]
    assert "ours+cudagraphs" in variants and "ours+triton" in variants
    for v in variants:
        bench_pipeline.parse_variant(v)
