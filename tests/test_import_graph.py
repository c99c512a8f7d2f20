"""The package's imports flow one way (docs/ARCHITECTURE.md): a walk of every module's AST.

Every import counts, at module level or inside a function (a lazy import that hides a cycle is still a
cycle); imports under ``if TYPE_CHECKING:`` are skipped since they never run. Importing
``animatediff_lite.a.b`` also runs ``animatediff_lite/a/__init__.py``, so sub-package ``__init__`` files are
edges too (the root ``__init__`` runs first for everything and is left out).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "animatediff_lite"
# Model parts: build and run networks, know nothing of files, sampling loops, the CLI or training.
MODEL_PARTS = ("config", "tokenizer", "clip", "vae", "unet", "unet_blocks", "motion", "scheduler", "samplers",
               "attention", "ops", "context", "errors", "atomic", "kernels", "controlnet", "sparsectrl")
# What each layer may not import (prefixes of module names below the package).
FORBIDDEN = {
    **{part: ("loading", "pipeline", "cli", "train", "api", "lora", "video", "toy", "presets") for part in MODEL_PARTS},
    "pipeline": ("loading", "cli", "train", "api", "toy", "lora"),
    "control": ("loading", "cli", "train", "api", "toy", "lora"),
    "loading": ("cli", "train", "api", "toy", "video", "presets"),
    "toy": ("loading", "pipeline", "cli", "train", "api"),
}


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (kernels/ is installed as animatediff_lite.kernels)."""
    out = {}
    for base, prefix in ((ROOT / PACKAGE, PACKAGE), (ROOT / "kernels", f"{PACKAGE}.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute)
                                                                    and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(first-party module imported, line, at module level) for every import statement that runs."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, int, bool]] = []

    def resolve(module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                target = resolve(child.module, child.level)
                # "from . import x" imports the submodule x when there is one
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in child.names]
            else:
                inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                visit(child, inner)
                continue
            for target in targets:
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    found.append((target, child.lineno, top))

    visit(tree, True)
    return found


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, int, bool]]]]:
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    raw = {}
    for name, path in modules.items():
        raw[name] = _imports(name, path, modules)
        for target, _, _ in raw[name]:
            while target not in modules and "." in target:  # "pkg.mod.attr" -> "pkg.mod"
                target = target.rsplit(".", 1)[0]
            parts = target.split(".")
            for n in range(2, len(parts) + 1):  # the sub-packages' __init__ run first
                step = ".".join(parts[:n])
                # a module's own packages have run before it: no edge back to them
                if step in modules and step != name and not name.startswith(step + "."):
                    edges[name].add(step)
    return edges, raw


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def _layer(name: str) -> str:
    return name.split(".")[1] if name.count(".") else ""


def test_the_walker_sees_function_level_imports_and_cycles(tmp_path):
    """The checks below can fail: a planted cycle through a function-level import is found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    path = tmp_path / "m.py"
    path.write_text("import os\n\ndef f():\n    from .loading import io  # why\n    return io\n")
    modules = {"animatediff_lite.m": path, "animatediff_lite.loading.io": path}
    assert _imports("animatediff_lite.m", path, modules) == [("animatediff_lite.loading.io", 4, False)]


def test_no_import_cycles():
    cycles = _cycles(_graph()[0])
    assert not cycles, "import cycles (each a set of modules importing each other): " + "; ".join(
        " <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_one_way(layer):
    edges, _ = _graph()
    bad = sorted(f"{src} -> {dst}" for src, dsts in edges.items() if _layer(src) == layer for dst in dsts
                 if _layer(dst) in FORBIDDEN[layer])
    assert not bad, f"{layer} must not import {FORBIDDEN[layer]}: " + ", ".join(bad)


def test_lazy_imports_say_why():
    modules = _modules()
    _, raw = _graph()
    bad = []
    for name, found in raw.items():  # every module of the package, kernels included
        lines = modules[name].read_text(encoding="utf-8").splitlines()
        for target, line, top in found:
            said = "#" in lines[line - 1] or lines[line - 2].lstrip().startswith("#")
            if not top and not said:
                bad.append(f"{modules[name].relative_to(ROOT)}:{line} imports {target} inside a function "
                           "without a comment saying why")
    assert not bad, "\n".join(bad)
