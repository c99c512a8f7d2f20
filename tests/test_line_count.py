"""benchmarks/line_count.py: code lines leave out blanks, comments and docstrings, and the revisions are real."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("line_count", ROOT / "benchmarks" / "line_count.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_code_lines_leave_out_blanks_comments_and_docstrings() -> None:
    source = '''"""Module docstring,
over two lines."""

# a comment
x = (1 +
     2)  # a trailing comment keeps its line


def f():
    """Docstring."""
    return """not a docstring"""


class C:
    """Class docstring."""

    y = 1
'''
    assert _module().code_lines(source) == 6  # x = (two lines), def, return, class, y


def test_redesign_scope_leaves_out_new_formats(capsys) -> None:
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        raise AssertionError("tests/test_line_count.py needs the git checkout")
    _module().main(["--redesign", "HEAD"])
    rows = capsys.readouterr().out.splitlines()
    names = [r.split()[0] for r in rows[2:-1]]
    assert "animatediff_lite/loading/unet_map.py" in names and "examples/train_tiny_default.py" in names
    assert not any(n.endswith(("controlnet_map.py", "sparsectrl_map.py", "animatelcm.py")) for n in names)
    total = rows[-1].split()
    assert total[0] == "total" and int(total[1]) > int(total[2]) > 0  # lines > code lines
