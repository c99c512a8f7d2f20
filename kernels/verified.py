"""The verified-kernel table (kernels/verified.toml): where each Triton kernel passed the GPU suite.

``backend="auto"`` runs a kernel only on a (kernel, compute capability, Triton major.minor, dtype) listed here,
only at shapes at or above the measured thresholds (``[[threshold]]``: below them PyTorch was faster on that
device) and not at the shapes where the kernel lost to PyTorch's best (``[[slower]]``). The table is data written
by tools, never by hand:

- ``[[verified]]`` rows come from :func:`entries_from_junit`: the pytest junit XML of a GPU run
  (``benchmarks/write_verified.py``, called by ``benchmarks/gpu_check.sh``). A run with any failure or error
  writes nothing: a kernel is verified only by a green run of the whole suite.
- ``[[threshold]]`` rows come from :func:`thresholds_from_norm_results` (``examples/bench_norm.py`` JSON) and
  ``[[slower]]`` rows from :func:`slower_from_attention_results` / :func:`slower_from_temporal_results`
  (``examples/bench_attention.py`` / ``bench_temporal.py`` JSON) of the same device.

Pure data functions (no torch, no triton) so the CPU tests cover them and the writer runs anywhere.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TABLE_PATH = Path(__file__).with_name("verified.toml")
KERNELS = ("attention", "temporal_attention", "group_norm", "geglu")
DTYPE_NAMES = ("float16", "bfloat16", "float32")

# Which GPU-suite tests prove which kernel: (test file, test-name regex). Every matching test must have passed.
KERNEL_TESTS: dict[str, tuple[tuple[str, str], ...]] = {
    "attention": (("test_kernel_attention", r".*"), ("test_clip", r".*kernel.*")),
    "temporal_attention": (("test_kernel_temporal", r".*"), ("test_motion", r".*(kernel|triton|fused).*")),
    "group_norm": (("test_kernel_norm", r"test_(gpu_)?group_norm.*|test_joint.*|test_custom_op.*"),),
    "geglu": (("test_kernel_norm", r".*geglu.*|test_custom_op.*"),),
}


@dataclass(frozen=True)
class Verified:
    """One row: ``kernel`` passed the GPU suite on ``capability`` ("9.0") with Triton ``triton`` ("3.6")."""

    kernel: str
    capability: str
    triton: str
    dtypes: tuple[str, ...]
    date: str
    source: str


@dataclass(frozen=True)
class Threshold:
    """Below ``min_pixels`` (H*W of the input) PyTorch was faster for ``kernel``/``variant`` on that device."""

    kernel: str
    variant: str
    capability: str
    dtype: str
    min_pixels: int
    source: str


@dataclass(frozen=True)
class Slower:
    """At ``shape`` ("Lq x Lk x D" for attention, "F x C" for temporal attention) ``kernel`` was slower than the
    best PyTorch path on that device: "auto" takes PyTorch there."""

    kernel: str
    capability: str
    dtype: str
    shape: str
    source: str


@dataclass(frozen=True)
class Table:
    verified: tuple[Verified, ...] = ()
    thresholds: tuple[Threshold, ...] = ()
    slower: tuple[Slower, ...] = ()


def major_minor(version: str) -> str:
    """'3.6.0+git1234' -> '3.6' (a table row holds for every patch release of one Triton minor)."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise ValueError(f"triton version {version!r} is not 'major.minor[...]'")
    return f"{m.group(1)}.{m.group(2)}"


def capability_str(capability: tuple[int, int] | str) -> str:
    """(9, 0) or '9.0' -> '9.0'."""
    if isinstance(capability, str):
        if not re.fullmatch(r"\d+\.\d+", capability):
            raise ValueError(f"capability {capability!r} is not 'major.minor' (e.g. '9.0')")
        return capability
    return f"{capability[0]}.{capability[1]}"


def parse_table(text: str, source: str = "verified.toml") -> Table:
    """Parse the TOML text of a table; ValueError naming ``source`` and the bad row otherwise."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{source}: not valid TOML: {e}") from e
    verified, thresholds = [], []
    for i, row in enumerate(data.get("verified", [])):
        try:
            v = Verified(row["kernel"], capability_str(row["capability"]), major_minor(row["triton"]),
                         tuple(row["dtypes"]), str(row["date"]), row["source"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: [[verified]] row {i} lacks or mistypes {e}; expected kernel, capability, "
                             "triton, dtypes, date, source") from e
        _check_names(source, f"[[verified]] row {i}", v.kernel, v.dtypes)
        verified.append(v)
    for i, row in enumerate(data.get("threshold", [])):
        try:
            t = Threshold(row["kernel"], row["variant"], capability_str(row["capability"]), row["dtype"],
                          int(row["min_pixels"]), row["source"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: [[threshold]] row {i} lacks or mistypes {e}; expected kernel, variant, "
                             "capability, dtype, min_pixels, source") from e
        _check_names(source, f"[[threshold]] row {i}", t.kernel, (t.dtype,))
        thresholds.append(t)
    slower = []
    for i, row in enumerate(data.get("slower", [])):
        try:
            w = Slower(row["kernel"], capability_str(row["capability"]), row["dtype"], str(row["shape"]),
                       row["source"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: [[slower]] row {i} lacks or mistypes {e}; expected kernel, capability, "
                             "dtype, shape, source") from e
        _check_names(source, f"[[slower]] row {i}", w.kernel, (w.dtype,))
        slower.append(w)
    return Table(tuple(verified), tuple(thresholds), tuple(slower))


def _check_names(source: str, where: str, kernel: str, dtypes: Iterable[str]) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"{source}: {where}: unknown kernel {kernel!r}, expected one of {KERNELS}")
    bad = [d for d in dtypes if d not in DTYPE_NAMES]
    if bad:
        raise ValueError(f"{source}: {where}: unknown dtypes {bad}, expected names from {DTYPE_NAMES}")


def load_table(path: str | os.PathLike = TABLE_PATH) -> Table:
    """Read a table file (the committed one by default); a missing file is an empty table."""
    path = Path(path)
    if not path.exists():
        return Table()
    return parse_table(path.read_text(), str(path))


def render_table(table: Table, header: str = "") -> str:
    """TOML text of ``table`` (sorted rows, so rewrites give small diffs)."""
    out = ["# Where each Triton kernel passed the GPU suite, and below which sizes PyTorch is faster.",
           "# Written by benchmarks/write_verified.py (from a GPU run's junit XML and kernel benchmarks); not by hand.",
           "# backend='auto' runs a kernel only on a listed (kernel, capability, triton, dtype): kernels/verified.py."]
    out += [f"# {line}" if line else "#" for line in header.splitlines()]
    for v in sorted(table.verified, key=lambda v: (v.kernel, v.capability, v.triton)):
        out += ["", "[[verified]]", f'kernel = "{v.kernel}"', f'capability = "{v.capability}"',
                f'triton = "{v.triton}"', "dtypes = [" + ", ".join(f'"{d}"' for d in v.dtypes) + "]",
                f'date = "{v.date}"', f'source = "{v.source}"']
    for t in sorted(table.thresholds, key=lambda t: (t.kernel, t.variant, t.capability, t.dtype)):
        out += ["", "[[threshold]]", f'kernel = "{t.kernel}"', f'variant = "{t.variant}"',
                f'capability = "{t.capability}"', f'dtype = "{t.dtype}"', f"min_pixels = {t.min_pixels}",
                f'source = "{t.source}"']
    for w in sorted(table.slower, key=lambda w: (w.kernel, w.capability, w.dtype, w.shape)):
        out += ["", "[[slower]]", f'kernel = "{w.kernel}"', f'capability = "{w.capability}"', f'dtype = "{w.dtype}"',
                f'shape = "{w.shape}"', f'source = "{w.source}"']
    return "\n".join(out) + "\n"


def write_table(table: Table, path: str | os.PathLike = TABLE_PATH, header: str = "") -> None:
    """Write ``table`` atomically (a temporary file in the same folder, then a rename)."""
    path = Path(path)
    text = render_table(table, header)
    parse_table(text, str(path))  # never write a file the reader would refuse
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def merge(old: Table, new: Table) -> Table:
    """``new`` rows replace ``old`` rows for the same (kernel, capability, triton) / threshold key; new
    measurements of a (kernel, capability, dtype) replace all its old ``[[slower]]`` shapes."""
    vkey = lambda v: (v.kernel, v.capability, v.triton)  # noqa: E731
    tkey = lambda t: (t.kernel, t.variant, t.capability, t.dtype)  # noqa: E731
    skey = lambda w: (w.kernel, w.capability, w.dtype)  # noqa: E731
    nv, nt, ns = {vkey(v) for v in new.verified}, {tkey(t) for t in new.thresholds}, {skey(w) for w in new.slower}
    return Table(tuple(v for v in old.verified if vkey(v) not in nv) + new.verified,
                 tuple(t for t in old.thresholds if tkey(t) not in nt) + new.thresholds,
                 tuple(w for w in old.slower if skey(w) not in ns) + new.slower)


# ---------------------------------------------------------------------------------------------- lookups


def verified_dtypes(table: Table, kernel: str, capability: tuple[int, int] | str, triton_version: str) -> frozenset:
    """dtype names for which ``kernel`` is verified on this device capability and Triton major.minor."""
    cap, tri = capability_str(capability), major_minor(triton_version)
    return frozenset(d for v in table.verified if (v.kernel, v.capability, v.triton) == (kernel, cap, tri)
                     for d in v.dtypes)


def min_pixels(table: Table, kernel: str, variant: str, capability: tuple[int, int] | str, dtype: str) -> int:
    """The measured threshold for this kernel/variant on this device and dtype (0: no threshold)."""
    cap = capability_str(capability)
    return max((t.min_pixels for t in table.thresholds
                if (t.kernel, t.variant, t.capability, t.dtype) == (kernel, variant, cap, dtype)), default=0)


# ---------------------------------------------------------------------------------------------- writers


def _cases(junit_xml: str | Iterable[str]) -> list[tuple[str, str, str]]:
    """(file stem, test name, outcome) per testcase of one or several junit files; outcome passed | failed | error |
    skipped."""
    if not isinstance(junit_xml, str):
        return [case for text in junit_xml for case in _cases(text)]
    try:
        root = ET.fromstring(junit_xml)
    except ET.ParseError as e:
        raise ValueError(f"not junit XML ({e}); a run cut short writes none") from e
    cases = []
    for case in root.iter("testcase"):
        classname = case.get("classname", "")  # "tests.test_kernel_norm" (pytest's junit family)
        stem = classname.split(".")[-1] if classname else Path(case.get("file", "")).stem
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                break
        cases.append((stem, case.get("name", ""), outcome))
    return cases


def entries_from_junit(junit_xml: str | Iterable[str], capability: tuple[int, int] | str, triton_version: str,
                       date: str, source: str, dtypes: Iterable[str] = DTYPE_NAMES) -> list[Verified]:
    """Rows for every kernel whose GPU tests passed in a green run (``junit_xml``: the text of one or several files).

    Refuses (ValueError listing them) a run with any failed or errored test, or with no test at all: the table
    claims a kernel is right on a device, which only a whole green suite shows. A kernel whose tests were all
    skipped, or that had none in the run, gets no row. ``dtypes``: the dtypes the suite exercises on the GPU.
    """
    cases = _cases(junit_xml)
    if not cases:
        raise ValueError(f"{source}: no test cases in the junit XML")
    bad = [f"{stem}::{name} {outcome}" for stem, name, outcome in cases if outcome in ("failed", "error")]
    if bad:
        raise ValueError(f"{source}: not a green run ({len(bad)} failed/errored), nothing verified: "
                         + "; ".join(bad[:10]))
    rows = []
    for kernel, selectors in KERNEL_TESTS.items():
        mine = [(name, outcome) for stem, name, outcome in cases
                if any(stem == s and re.fullmatch(pat, name.split("[")[0]) for s, pat in selectors)]
        # At least one gpu-marked test of the kernel must have run (not skipped): without CUDA the same files run
        # under the CPU interpreter, which proves nothing about the GPU compile.
        if any(name.startswith("test_gpu") and outcome == "passed" for name, outcome in mine):
            rows.append(Verified(kernel, capability_str(capability), major_minor(triton_version), tuple(dtypes),
                                 date, source))
    return rows


def thresholds_from_norm_results(results: Mapping, source: str) -> list[Threshold]:
    """Per-shape thresholds of the GroupNorm kernel from an ``examples/bench_norm.py`` JSON.

    For each statistics mode (per frame / joint) the threshold is the smallest spatial size from which the
    kernel beat PyTorch at that size and at every larger one measured; a mode where PyTorch won at the largest
    size gets a threshold above every measured size (the kernel is never chosen there).
    """
    cap, dtype = _bench_context(results)
    times: dict[tuple[str, int], dict[str, float]] = {}
    for row in results["results"]:
        if row.get("op") != "group_norm+silu" or "ms" not in row:
            continue
        h, w = (int(s) for s in row["shape"].split("x")[-2:])
        times.setdefault((row["stats"], h * w), {})[row["variant"]] = row["ms"]
    out = []
    for stats, variant in (("per frame", "per_frame"), ("joint", "joint")):
        sizes = sorted(p for (s, p), v in times.items() if s == stats and {"triton", "torch"} <= v.keys())
        if not sizes:
            continue
        threshold = math.inf
        for p in reversed(sizes):
            if times[(stats, p)]["triton"] < times[(stats, p)]["torch"]:
                threshold = p
            else:
                break
        # PyTorch won at the largest size: only sizes above every measured one may take the kernel.
        value = sizes[-1] + 1 if threshold == math.inf else int(threshold)
        out.append(Threshold("group_norm", variant, cap, dtype, value, source))
    return out


def _bench_context(results: Mapping) -> tuple[str, str]:
    cap = capability_str(tuple(results["capability"]))
    dtype = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(results["benchmark"].split("-")[-1],
                                                                             "float16")
    return cap, dtype


def _slower(rows: Iterable[Mapping], key, ours: str, theirs, kernel: str, cap: str, dtype: str,
            source: str) -> list[Slower]:
    """Shapes where variant ``ours`` was slower than the fastest variant accepted by ``theirs`` (or failed)."""
    by_shape: dict[str, dict[str, float]] = {}
    for row in rows:
        times = by_shape.setdefault(key(row), {})
        if "ms" in row:
            times[row["variant"]] = row["ms"]
    out = []
    for shape, times in sorted(by_shape.items()):
        best = min((ms for v, ms in times.items() if theirs(v)), default=None)
        if best is not None and (ours not in times or times[ours] > best):
            out.append(Slower(kernel, cap, dtype, shape, source))
    return out


def slower_from_attention_results(results: Mapping, source: str) -> list[Slower]:
    """Shapes (Lq x Lk x D) where the attention kernel as dispatched ("triton split-D") lost to the best SDPA
    backend in an ``examples/bench_attention.py`` JSON."""
    cap, dtype = _bench_context(results)
    return _slower(results["results"], lambda r: f"{r['Lq']}x{r['Lk']}x{r['D']}", "triton split-D",
                   lambda v: v.startswith("sdpa"), "attention", cap, dtype, source)


def slower_from_temporal_results(results: Mapping, source: str) -> list[Slower]:
    """Shapes (F x C) where the fused temporal attention block lost to the PyTorch block in an
    ``examples/bench_temporal.py`` JSON."""
    cap, dtype = _bench_context(results)
    blocks = [r for r in results["results"] if r.get("part") == "block"]
    return _slower(blocks, lambda r: f"{r['F']}x{r['C']}", "fused block (triton)", lambda v: v == "torch block",
                   "temporal_attention", cap, dtype, source)
