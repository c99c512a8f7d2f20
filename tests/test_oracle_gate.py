"""require_oracle: a missing test-only oracle skips a test module locally and fails the run under CI=true."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import require_oracle

MISSING = "no_such_oracle_module_xyz"


def test_require_oracle_skips_locally_and_fails_under_ci(monkeypatch):
    assert require_oracle("json") is json
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_oracle(MISSING)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required under CI=true"):
        require_oracle(MISSING)


@pytest.mark.parametrize("ci", ["", "true"])
def test_a_module_gated_on_a_missing_oracle(tmp_path, ci):
    """The whole run, as CI sees it: locally the module is skipped (pytest exits 5, "no tests ran", when it is
    the only one), under CI=true the run fails with a collection error (exit 2) naming the oracle."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    (tmp_path / "test_gated.py").write_text(
        f"import sys\nsys.path.insert(0, {tests_dir!r})\nfrom conftest import require_oracle\n"
        f"oracle = require_oracle({MISSING!r})\n\ndef test_x():\n    pass\n", encoding="utf-8")
    env = {**os.environ, "CI": ci}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_gated.py")]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    print(r.stdout[-2000:])
    if ci:
        assert r.returncode == 2 and "required under CI=true" in r.stdout and "1 error" in r.stdout
    else:
        assert r.returncode in (0, 5) and "1 skipped" in r.stdout
