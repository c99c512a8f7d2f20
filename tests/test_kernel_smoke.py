"""benchmarks/kernel_smoke.py (the GPU fault localiser) runs its cases in child processes and reports each one;
here two of them under the Triton interpreter, so the script cannot rot between GPU sessions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_smoke.py"


def test_cases_run_and_report_ok() -> None:
    env = dict(os.environ)
    if not __import__("torch").cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, str(SCRIPT), "--jobs", "2", "--only", "attn d40 split", "temporal d40 pe"],
                       env=env, capture_output=True, text=True, timeout=300)
    print(r.stdout, r.stderr[-2000:])
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == 2
    assert all("  ok rel_err=" in line for line in lines)
