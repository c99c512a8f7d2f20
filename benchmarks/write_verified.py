"""Write kernels/verified.toml from a GPU run: the junit XML of the GPU suite, and optionally kernel benchmark JSON.

    python benchmarks/write_verified.py junit-kernels.xml junit-gpu.xml [--norm-json results/norm-fp16-<device>.json]
        [--attention-json results/attention-fp16-<device>.json] [--temporal-json results/temporal-fp16-<device>.json]

Rows for this device (compute capability, Triton major.minor; from the live GPU unless given) replace older rows for
the same device; rows of other devices are kept. A run with any failed or errored test writes nothing and exits 1:
a kernel is verified only by a green run of the whole suite. Benchmark files that do not exist (a step cut by its
time budget) are skipped with a message. Called by benchmarks/gpu_check.sh after its tests and kernel benchmarks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))  # the table module alone: no torch needed
import verified as vt  # noqa: E402


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
    try:
        source = " + ".join(p.name for p in args.junit)
        rows = vt.entries_from_junit([p.read_text() for p in args.junit], cap, tri, date, source)
        measured = {}
        for path, derive in ((args.norm_json, vt.thresholds_from_norm_results),
                             (args.attention_json, vt.slower_from_attention_results),
                             (args.temporal_json, vt.slower_from_temporal_results)):
            if path is None:
                continue
            if not path.is_file():
                print(f"write_verified: {path} not found (benchmark not run), skipped")
                continue
            measured[derive] = derive(json.loads(path.read_text()), path.as_posix())
        thresholds = measured.get(vt.thresholds_from_norm_results, [])
        slower = measured.get(vt.slower_from_attention_results, []) + measured.get(vt.slower_from_temporal_results, [])
        old = vt.load_table(args.table)
    except (OSError, ValueError, KeyError) as e:
        print(f"write_verified: {e}", file=sys.stderr)
        return 1
    new = vt.merge(old, vt.Table(tuple(rows), tuple(thresholds), tuple(slower)))
    vt.write_table(new, args.table)
    names = ", ".join(r.kernel for r in rows) or "none (no kernel had a passing GPU test)"
    print(f"write_verified: {args.table}: verified on capability {cap}, triton {vt.major_minor(tri)}: {names}; "
          f"{len(thresholds)} thresholds, {len(slower)} shapes where PyTorch wins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
