"""Write kernels/verified.toml from a GPU run: the junit XML of the GPU suite, and optionally kernel benchmark JSON.

    python benchmarks/write_verified.py junit-kernels.xml junit-gpu.xml [--norm-json results/norm-fp16-<device>.json]
        [--attention-json results/attention-fp16-<device>.json] [--temporal-json results/temporal-fp16-<device>.json]

Rows for this device (compute capability, Triton major.minor; from the live GPU unless given) replace older rows for
the same device; rows of other devices are kept. A run with any failed or errored test writes nothing and exits 1:
a kernel is verified only by a green run of the whole suite. Benchmark files that do not exist (a step cut by its
time budget) are skipped with a message. Called by benchmarks/gpu_check.sh after its tests and kernel benchmarks.

- ``[[verified]]`` rows come from :func:`entries_from_junit` (the pytest junit XML of the GPU run),
- ``[[threshold]]`` rows from :func:`thresholds_from_norm_results` (``examples/bench_norm.py`` JSON),
- ``[[slower]]`` rows from :func:`slower_from_attention_results` / :func:`slower_from_temporal_results`
  (``examples/bench_attention.py`` / ``bench_temporal.py`` JSON) of the same device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import astuple, fields
from pathlib import Path

from animatediff_lite.atomic import atomic_write  # neither imports torch
from animatediff_lite.kernels import verified as vt

# Which GPU-suite tests prove which kernel: (test file, test-name regex). Every matching test must have passed.
KERNEL_TESTS: dict[str, tuple[tuple[str, str], ...]] = {
    "attention": (("test_kernel_attention", r".*"), ("test_clip", r".*kernel.*")),
    "temporal_attention": (("test_kernel_temporal", r".*"), ("test_motion", r".*(kernel|triton|fused).*")),
    "group_norm": (("test_kernel_norm", r"test_(gpu_)?group_norm.*|test_joint.*|test_custom_op.*"),),
    "geglu": (("test_kernel_norm", r".*geglu.*|test_custom_op.*"),),
}


def render_table(table: vt.Table, header: str = "") -> str:
    """TOML text of ``table`` (sorted rows, so rewrites give small diffs)."""
    out = ["# Where each Triton kernel passed the GPU suite, and below which sizes PyTorch is faster.",
           "# Written by benchmarks/write_verified.py (from a GPU run's junit XML and kernel benchmarks); not by hand.",
           "# backend='auto' runs a kernel only on a listed (kernel, capability, triton, dtype): kernels/verified.py."]
    out += [f"# {line}" if line else "#" for line in header.splitlines()]
    for (kind, _), rows in zip(vt.ROW_KINDS, (table.verified, table.thresholds, table.slower), strict=True):
        for row in sorted(rows, key=astuple):
            # JSON strings, integers and lists of strings are valid TOML values
            out += ["", f"[[{kind}]]", *(f"{f.name} = {json.dumps(getattr(row, f.name))}" for f in fields(row))]
    return "\n".join(out) + "\n"


def write_table(table: vt.Table, path: str | Path = vt.TABLE_PATH, header: str = "") -> None:
    """Write ``table`` atomically (a temporary file in the same folder, then a rename)."""
    text = render_table(table, header)
    vt.parse_table(text, str(path))  # never write a file the reader would refuse
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def merge(old: vt.Table, new: vt.Table) -> vt.Table:
    """``new`` rows replace ``old`` rows for the same (kernel, capability, triton) / threshold key; new
    measurements of a (kernel, capability, dtype) replace all its old ``[[slower]]`` shapes."""
    vkey = lambda v: (v.kernel, v.capability, v.triton)  # noqa: E731
    tkey = lambda t: (t.kernel, t.variant, t.capability, t.dtype)  # noqa: E731
    skey = lambda w: (w.kernel, w.capability, w.dtype)  # noqa: E731
    nv, nt, ns = {vkey(v) for v in new.verified}, {tkey(t) for t in new.thresholds}, {skey(w) for w in new.slower}
    return vt.Table(tuple(v for v in old.verified if vkey(v) not in nv) + new.verified,
                    tuple(t for t in old.thresholds if tkey(t) not in nt) + new.thresholds,
                    tuple(w for w in old.slower if skey(w) not in ns) + new.slower)


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
        outcome = next((outcome for tag, outcome in (("failure", "failed"), ("error", "error"), ("skipped", "skipped"))
                        if case.find(tag) is not None), "passed")
        cases.append((stem, case.get("name", ""), outcome))
    return cases


def entries_from_junit(junit_xml: str | Iterable[str], capability: tuple[int, int] | str, triton_version: str,
                       date: str, source: str, dtypes: Iterable[str] = vt.DTYPE_NAMES) -> list[vt.Verified]:
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
        # At least one gpu-marked test of the kernel must have run (not skipped): without CUDA the same files run
        # under the CPU interpreter, which proves nothing about the GPU compile.
        if any(name.startswith("test_gpu") and outcome == "passed" for stem, name, outcome in cases
               if any(stem == s and re.fullmatch(pat, name.split("[")[0]) for s, pat in selectors)):
            rows.append(vt.Verified(kernel, vt.capability_str(capability), vt.major_minor(triton_version),
                                    tuple(dtypes), date, source))
    return rows


def thresholds_from_norm_results(results: Mapping, source: str) -> list[vt.Threshold]:
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
        won = {p for p in sizes if times[(stats, p)]["triton"] < times[(stats, p)]["torch"]}
        # The smallest size from which the kernel won at every size; if PyTorch won at the largest, above them all.
        value = next((p for p in sizes if all(q in won for q in sizes if q >= p)), sizes[-1] + 1)
        out.append(vt.Threshold("group_norm", variant, cap, dtype, value, source))
    return out


def _bench_context(results: Mapping) -> tuple[str, str]:
    cap = vt.capability_str(tuple(results["capability"]))
    dtype = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(results["benchmark"].split("-")[-1],
                                                                             "float16")
    return cap, dtype


def _slower(rows: Iterable[Mapping], key, ours: str, theirs, kernel: str, results: Mapping,
            source: str) -> list[vt.Slower]:
    """Shapes where variant ``ours`` was slower than the fastest variant accepted by ``theirs`` (or failed)."""
    cap, dtype = _bench_context(results)
    by_shape: dict[str, dict[str, float]] = {}
    for row in rows:
        times = by_shape.setdefault(key(row), {})
        if "ms" in row:
            times[row["variant"]] = row["ms"]
    out = []
    for shape, times in sorted(by_shape.items()):
        best = min((ms for v, ms in times.items() if theirs(v)), default=None)
        if best is not None and (ours not in times or times[ours] > best):
            out.append(vt.Slower(kernel, cap, dtype, shape, source))
    return out


def slower_from_attention_results(results: Mapping, source: str) -> list[vt.Slower]:
    """Shapes (Lq x Lk x D) where the attention kernel as dispatched ("triton split-D") lost to the best SDPA
    backend in an ``examples/bench_attention.py`` JSON."""
    return _slower(results["results"], lambda r: f"{r['Lq']}x{r['Lk']}x{r['D']}", "triton split-D",
                   lambda v: v.startswith("sdpa"), "attention", results, source)


def slower_from_temporal_results(results: Mapping, source: str) -> list[vt.Slower]:
    """Shapes (F x C) where the fused temporal attention block lost to the PyTorch block in an
    ``examples/bench_temporal.py`` JSON."""
    blocks = [r for r in results["results"] if r.get("part") == "block"]
    return _slower(blocks, lambda r: f"{r['F']}x{r['C']}", "fused block (triton)", lambda v: v == "torch block",
                   "temporal_attention", results, source)


def _device_facts() -> tuple[str, str]:
    import torch  # only when the device must be asked

    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA to read the device (or pass --capability and --triton)")
    from importlib.metadata import version

    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}", version("triton")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("junit", type=Path, nargs="+", help="pytest --junitxml files of the GPU run (all green)")
    p.add_argument("--table", type=Path, default=vt.TABLE_PATH)
    p.add_argument("--capability", help="compute capability, e.g. 9.0 (default: the GPU's)")
    p.add_argument("--triton", help="Triton version (default: the installed one)")
    p.add_argument("--norm-json", type=Path, help="examples/bench_norm.py JSON of this device: GroupNorm thresholds")
    p.add_argument("--attention-json", type=Path, help="examples/bench_attention.py JSON: shapes where SDPA wins")
    p.add_argument("--temporal-json", type=Path, help="examples/bench_temporal.py JSON: shapes where PyTorch wins")
    args = p.parse_args(argv)
    cap, tri = (args.capability, args.triton) if args.capability and args.triton else _device_facts()
    date = datetime.date.today().isoformat()
    thresholds, slower = [], []
    try:
        source = " + ".join(p.name for p in args.junit)
        rows = entries_from_junit([p.read_text() for p in args.junit], cap, tri, date, source)
        for path, derive, out in ((args.norm_json, thresholds_from_norm_results, thresholds),
                                  (args.attention_json, slower_from_attention_results, slower),
                                  (args.temporal_json, slower_from_temporal_results, slower)):
            if path is not None and not path.is_file():
                print(f"write_verified: {path} not found (benchmark not run), skipped")
            elif path is not None:
                out += derive(json.loads(path.read_text()), path.as_posix())
        old = vt.load_table(args.table)
    except (OSError, ValueError, KeyError) as e:
        print(f"write_verified: {e}", file=sys.stderr)
        return 1
    write_table(merge(old, vt.Table(tuple(rows), tuple(thresholds), tuple(slower))), args.table)
    names = ", ".join(r.kernel for r in rows) or "none (no kernel had a passing GPU test)"
    print(f"write_verified: {args.table}: verified on capability {cap}, triton {vt.major_minor(tri)}: {names}; "
          f"{len(thresholds)} thresholds, {len(slower)} shapes where PyTorch wins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
