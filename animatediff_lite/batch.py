"""Batch generation: run :class:`~animatediff_lite.jobs.Job`s, each to ``<id>.<format>`` + ``<id>.json``.

Resumable (a job whose video exists is skipped: the video is written last, atomically), sharded over torchrun
ranks (rank r takes jobs r, r + world, ...), each rank loading every distinct model set once. A job that fails
is logged with its reason and the run goes on; :func:`gather_outcomes` collects every rank's outcomes for the
one summary line.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .jobs import Job, parse_job, sampling_keys
from .loading.pipeline_load import load_pipeline
from .pipeline import SAMPLE_DEFAULTS, Pipeline, StepCallback
from .sidecar import write_result


@dataclass(frozen=True)
class Outcome:
    """What became of one job: ``status`` "done" | "skipped" | "failed" (``reason`` says why)."""

    index: int
    id: str
    status: str
    reason: str = ""


def resolved_settings(job: Job, pipe: Pipeline) -> dict:
    """The job's settings with everything the run decides made explicit: a drawn seed when it has none, the
    model's sizes / steps / guidance for those left out, every other sampling argument's default, the dtype,
    and for the record the thread count, device, kernel backend and library version. A sidecar of these
    remakes the video (``generate --from``)."""
    settings = job.settings()
    for name, default in sampling_keys().items():
        settings.setdefault(name, default)
    if settings["seed"] is None:
        settings["seed"] = random.SystemRandom().randrange(2**63)
    model_defaults = {**SAMPLE_DEFAULTS, **pipe.sample_defaults}
    sizes = ("steps", "guidance_scale") if "video" in settings else ("steps", "guidance_scale", "height", "width")
    for key in sizes:
        if settings.get(key) is None:
            settings[key] = model_defaults[key]
    if "video" not in settings and settings.get("frames") is None:
        settings["frames"] = model_defaults["num_frames"]
    settings["dtype"] = str(pipe.dtype).removeprefix("torch.")
    backend = getattr(pipe, "backend", None)
    settings.update(threads=torch.get_num_threads(), device=str(pipe.device),
                    backend=getattr(backend, "name", str(backend)), animatediff_lite=__version__)
    return settings


def run_job(pipe: Pipeline, job: Job, path: str | Path, progress: bool = False,
            callback: StepCallback | None = None) -> tuple[Path, dict]:
    """Generate one job with a loaded pipeline; writes ``path`` and its JSON sidecar.

    callback: the pipeline's per-step callback (the app's progress bar). Returns (path, resolved settings).
    """
    settings = resolved_settings(job, pipe)
    call = parse_job(settings, f"job {job.id}", Path("/"), job.id, info_ok=True, name_id=False).call_kwargs()
    video = pipe(**call, progress=progress, callback=callback)
    return write_result(video, path, settings), settings


def load_for(job: Job, device: str, dtype: torch.dtype | None, backend: str | None,
             threads: int | None = None, compile: bool | str = False) -> Pipeline:
    """The pipeline of a job's model set on ``device`` (the job's dtype, else ``dtype``, else float32).

    threads, compile: as in :func:`~animatediff_lite.load_pipeline` (None / False: its defaults)."""
    kwargs = job.load_kwargs()
    kwargs.setdefault("dtype", dtype or torch.float32)
    return load_pipeline(**kwargs, device=device, backend=backend, threads=threads, compile=compile)


def run_jobs(jobs: list[Job], out_dir: str | Path, rank: int = 0, world: int = 1, device: str = "cpu",
             dtype: torch.dtype | None = None, backend: str | None = None, progress: bool = True,
             threads: int | None = None, compile: bool | str = False) -> list[Outcome]:
    """Run this rank's share of ``jobs`` (indices i with i % world == rank) into ``out_dir``.

    Jobs whose video already exists are skipped; the rest are grouped by model set (each loaded once, in
    order of first use). A job or model set that fails is reported on stderr and recorded; the others go on.
    Returns this rank's outcomes. threads, compile: load_pipeline's, for every model set.
    """
    out_dir = Path(out_dir)
    outcomes: list[Outcome] = []
    groups: dict[str, list[tuple[int, Job]]] = {}
    for i in range(rank, len(jobs), world):
        if (out_dir / jobs[i].filename).exists():
            outcomes.append(Outcome(i, jobs[i].id, "skipped"))
        else:
            groups.setdefault(jobs[i].model_key, []).append((i, jobs[i]))
    desc = "jobs" if world == 1 else f"jobs (rank 0 of {world})"
    bar = tqdm(total=sum(map(len, groups.values())), desc=desc, disable=not progress or rank != 0)
    for group in groups.values():
        try:
            pipe = load_for(group[0][1], device, dtype, backend, threads, compile)
        except Exception as e:  # a bad model set fails its jobs, not the run
            reason = f"loading the models: {_reason(e)}"
            outcomes += [_failed(i, job, reason, rank, world) for i, job in group]
            bar.update(len(group))
            continue
        for i, job in group:
            try:
                run_job(pipe, job, out_dir / job.filename)
                outcomes.append(Outcome(i, job.id, "done"))
            except Exception as e:  # logged and counted; the other jobs still run
                outcomes.append(_failed(i, job, _reason(e), rank, world))
            bar.update()
        del pipe
    bar.close()
    return sorted(outcomes, key=lambda o: o.index)


def gather_outcomes(outcomes: list[Outcome], world: int) -> list[Outcome]:
    """Every rank's outcomes, in job order (a gloo all-gather of small objects under torchrun)."""
    if world == 1:
        return outcomes
    import torch.distributed as dist  # only under torchrun

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo")  # CPU objects only, whatever device the jobs ran on
    parts: list = [None] * world
    dist.all_gather_object(parts, outcomes)
    if own_group:
        dist.destroy_process_group()
    return sorted((o for part in parts for o in part), key=lambda o: o.index)


def summary(outcomes: list[Outcome]) -> str:
    """"N done, M skipped, K failed", then one line per failed job: its id and reason."""
    count = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
    lines = [f"{count['done']} done, {count['skipped']} skipped, {count['failed']} failed"]
    lines += [f"  {o.id}: {o.reason}" for o in outcomes if o.status == "failed"]
    return "\n".join(lines)


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(e, ValueError) else f"{type(e).__name__}: {first}"


def _failed(i: int, job: Job, reason: str, rank: int, world: int) -> Outcome:
    where = f"rank {rank}: " if world > 1 else ""
    print(f"{where}job {job.id} failed: {reason}", file=sys.stderr, flush=True)
    return Outcome(i, job.id, "failed", reason)
