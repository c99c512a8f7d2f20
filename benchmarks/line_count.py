"""Lines of the package (animatediff_lite/ and kernels/, installed as animatediff_lite.kernels) at git revisions:
all lines and code lines (no blanks, comments, docstrings).

    python benchmarks/line_count.py 7040cf7 HEAD           # the issue-13 baseline against now
    python benchmarks/line_count.py --files 7040cf7 HEAD   # every file of the subpackages too
    python benchmarks/line_count.py --redesign 7040cf7 HEAD  # only what issue 13 redesigned (see REDESIGN)

Code lines are what a refactor can honestly claim: trimming comments or docstrings does not change them.
"""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
from collections import defaultdict

# Issue 13's scope: the loaders, the default model's format, the toy data and the training code (+ the recipe
# script), the same features at both revisions: the loaders issues 15-16 added for new formats are left out.
REDESIGN = ("animatediff_lite/loading/", "animatediff_lite/default_model.py", "animatediff_lite/synthetic.py",
            "animatediff_lite/toy/", "animatediff_lite/train/", "examples/train_tiny_default.py")
NEW_FORMATS = ("animatediff_lite/loading/controlnet_map.py", "animatediff_lite/loading/sparsectrl_map.py",
               "animatediff_lite/loading/animatelcm.py")


def code_lines(source: str) -> int:
    """Lines holding a token other than a comment, a docstring or a line break."""
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docstrings)
    return len(lines)


def area(path: str, depth: int) -> str:
    parts = path.split("/")
    return "/".join(parts[:depth]) if len(parts) > depth else path


def count(rev: str, depth: int, roots: tuple[str, ...] = ("animatediff_lite", "kernels"),
          keep=lambda path: True) -> dict[str, tuple[int, int]]:
    files = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, *roots], capture_output=True, text=True,
                           check=True).stdout.split()
    files = [f for f in files if keep(f)]
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for path in (f for f in files if f.endswith(".py")):
        source = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True).stdout
        row = out[area(path, depth)]
        row[0] += source.count("\n")
        row[1] += code_lines(source)
    return {k: (v[0], v[1]) for k, v in sorted(out.items())}


def main(revs: list[str]) -> None:
    depth, roots, keep = 2, ("animatediff_lite", "kernels"), (lambda path: True)
    if revs and revs[0] == "--files":  # every file, not subpackages as one row
        depth, revs = 99, revs[1:]
    elif revs and revs[0] == "--redesign":
        depth, revs, roots = 99, revs[1:], ("animatediff_lite", "examples")
        keep = lambda path: path.startswith(REDESIGN) and path not in NEW_FORMATS  # noqa: E731
    tables = [count(r, depth, roots, keep) for r in revs or ["HEAD"]]
    revs = revs or ["HEAD"]
    names = sorted(set().union(*tables))
    print(f"{'file or folder':42}" + "".join(f"{r[:10]:>20}" for r in revs))
    print(f"{'':42}" + "".join(f"{'lines':>10}{'code':>10}" for _ in revs))
    for name in names:
        print(f"{name:42}" + "".join(f"{t.get(name, (0, 0))[0]:>10}{t.get(name, (0, 0))[1]:>10}" for t in tables))
    print(f"{'total':42}" + "".join(f"{sum(v[0] for v in t.values()):>10}{sum(v[1] for v in t.values()):>10}"
                                    for t in tables))


if __name__ == "__main__":
    main(sys.argv[1:])
