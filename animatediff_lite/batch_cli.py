"""``generate --batch JOBS -o DIR`` and ``generate --from NAME.json -o OUT``: the CLI side of batch generation.

cli.py adds the two flags (:func:`add_arguments`) and hands over to :func:`run` when either is given.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch and the batch engine are imported in run(), not here: cli.py builds its parser from this module, and
# `--help`, `presets` and argument errors must not pay for importing torch (tests/test_startup.py).

# generate flags that still apply with --batch / --from: where and how to run, not what to make.
RUN_FLAGS = {"command", "func", "batch", "from_settings", "out", "device", "dtype", "backend", "compile",
             "no_progress", "threads"}


def add_arguments(g: argparse.ArgumentParser) -> None:
    """Add --batch and --from to the ``generate`` parser."""
    g.add_argument("--batch", metavar="JOBS", help="generate every job of a .toml ([[jobs]] + [defaults]) or .jsonl "
                   "file into the folder -o: <id>.gif (or the job's format) + <id>.json each; finished jobs are "
                   "skipped; under torchrun the jobs are shared over the ranks (docs/batch.md)")
    g.add_argument("--from", dest="from_settings", metavar="NAME.json",
                   help="remake a result from its JSON sidecar (same thread count) into -o OUT (a file or folder)")


def wanted(args: argparse.Namespace) -> bool:
    """True when --batch or --from was given."""
    return bool(args.batch or args.from_settings)


def run(args: argparse.Namespace, build_parser: Callable[[], argparse.ArgumentParser]) -> int:
    """Run --batch or --from; other generate flags that choose what to make are refused (the file says it)."""
    flag = "--batch" if args.batch else "--from"
    if args.batch and args.from_settings:
        raise ValueError("--batch and --from: give one of them")
    defaults = vars(build_parser().parse_args(["generate"]))
    extra = [("a prompt" if k == "prompt" else f"--{k.replace('_', '-')}") for k, v in vars(args).items()
             if k not in RUN_FLAGS and k in defaults and v != defaults[k]]
    if extra:
        raise ValueError(f"{flag} takes what to generate from its file; drop {', '.join(extra)}")
    if not args.out:
        raise ValueError(f"{flag} needs -o ({'the output folder' if args.batch else 'the output file or folder'})")
    import torch  # lazy: see the note at the top

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.batch:
        return _batch(args, device, dtype)
    return _from(args, device, dtype)


def _batch(args: argparse.Namespace, device: str, dtype: torch.dtype | None) -> int:
    from .batch import gather_outcomes, run_jobs, summary  # lazy: see the note at the top
    from .jobs import read_jobs  # torch, through the Pipeline signature it reads: lazy too

    jobs = read_jobs(args.batch)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    outcomes = run_jobs(jobs, args.out, rank, world, device, dtype, args.backend, progress=not args.no_progress,
                        threads=args.threads, compile=args.compile or False)
    everything = gather_outcomes(outcomes, world)
    if rank == 0:
        print(summary(everything), file=sys.stderr)
    return 1 if any(o.status == "failed" for o in everything) else 0


def _from(args: argparse.Namespace, device: str, dtype: torch.dtype | None) -> int:
    from .batch import load_for, run_job  # lazy: see the note at the top
    from .jobs import OUTPUT_FORMATS, parse_job  # torch: lazy too
    from .sidecar import read_settings  # torch (it writes videos): lazy too

    path = Path(args.from_settings)
    settings = read_settings(path)
    job = parse_job(settings, str(path), path.parent, settings.get("id", path.stem), info_ok=True)
    out = Path(args.out)
    fmt = out.suffix.lower().lstrip(".")
    if fmt:
        if fmt not in OUTPUT_FORMATS:
            raise ValueError(f"-o {out}: expected a .gif, .mp4 or .webp file, or a folder (no suffix)")
        job = parse_job({**job.settings(), "format": fmt}, str(path), path.parent, job.id)
    else:
        out = out / job.filename
    threads = args.threads  # else the sidecar's: same thread count, same float reduction order, same bits on CPU
    if threads is None and isinstance(settings.get("threads"), int) and settings["threads"] > 0:
        threads = settings["threads"]
    pipe = load_for(job, device, dtype, args.backend, threads, args.compile or False)  # sets the count
    print(run_job(pipe, job, out, progress=not args.no_progress)[0])
    return 0
