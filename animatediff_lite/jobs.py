"""Generation jobs: read a TOML / JSON-lines job file (or a result's sidecar) into checked :class:`Job`s.

A job is a flat table of keys: the model keys of ``load_pipeline`` (``base``, ``motion_module``, ``dreambooth``,
``loras``, ..., ``controlnet`` and ``sparsectrl`` as the CLI flags), the sampling arguments of
``Pipeline.__call__`` (``prompt``, ``seed``, ``steps``, ... every keyword it has, so a new sampling option is a job
key at once; the ``control_*`` ones with their model key), and the output's ``id``, ``format`` and ``fps``.
Unknown keys are errors naming the job and the key. Relative paths are relative to the job file's folder.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checks import default_context_overlap
from .free_init import FreeInit
from .pipeline import Pipeline

# load_pipeline arguments a job may set; the model set (loaded once per rank) is these values.
MODEL_PATH_KEYS = ("base", "motion_module", "dreambooth")
MODEL_KEYS = (*MODEL_PATH_KEYS, "motion_module_version", "loras", "motion_loras", "controlnet", "sparsectrl", "dtype")
# Control sampling keys -> the model key they need (ControlNet condition videos, SparseCtrl key frames).
CONTROL_KEYS = {"control_frames": "controlnet", "control_start": "controlnet", "control_end": "controlnet",
                "control_images": "sparsectrl", "control_scale": "sparsectrl"}
DTYPES = ("float32", "float16", "bfloat16")
OUTPUT_FORMATS = ("gif", "mp4", "webp")
# Pipeline.__call__ arguments that are not job keys: objects, or handled by a key of their own.
_NOT_KEYS = {"self", "prompt", "negative_prompt", "num_frames", "generator", "latents", "callback", "progress",
             "free_init", "video", "num_videos_per_prompt"}
# Written by the run into a sidecar for the record; accepted (and ignored, except threads) when read back.
INFO_KEYS = ("threads", "device", "backend", "animatediff_lite")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def sampling_keys() -> dict[str, object]:
    """Plain keyword arguments of ``Pipeline.__call__`` a job passes on as given -> their defaults.

    Only arguments whose default is None or a plain number / string / bool: others take objects a job file cannot
    spell (a new one of those gets its own key here, like ``free_init``).
    """
    params = inspect.signature(Pipeline.__call__).parameters
    plain = (str, int, float, bool)
    return {name: p.default for name, p in params.items()
            if name not in _NOT_KEYS and (p.default is None or isinstance(p.default, plain))}


def job_keys() -> tuple[str, ...]:
    """Every key a job table may hold."""
    return ("id", "prompt", "negative_prompt", "frames", "free_init", "video", "format", "fps", *MODEL_KEYS,
            *sampling_keys())


@dataclass(frozen=True)
class Job:
    """One video to make. ``model``: load_pipeline keyword arguments (JSON-able: paths as str, loras as
    [path, scale] lists, dtype by name); ``sample``: Pipeline keyword arguments in job-key form (``frames``,
    prompt maps with int keys, ``free_init`` as a dict); ``format``: gif | mp4 | webp; ``fps`` > 0."""

    id: str
    model: dict = field(default_factory=dict)
    sample: dict = field(default_factory=dict)
    format: str = "gif"
    fps: float = 8.0

    @property
    def filename(self) -> str:
        """The video's file name, ``<id>.<format>``."""
        return f"{self.id}.{self.format}"

    @property
    def model_key(self) -> str:
        """Jobs with equal keys share one loaded pipeline."""
        return json.dumps(self.model, sort_keys=True)

    def settings(self) -> dict:
        """The job as a flat JSON-able table of job keys (prompt-map keys as strings), as sidecars hold it."""
        sample = {k: ({str(f): p for f, p in v.items()} if isinstance(v, dict) and k != "free_init" else v)
                  for k, v in self.sample.items()}
        return {"id": self.id, **sample, **self.model, "format": self.format, "fps": self.fps}

    def call_kwargs(self) -> dict:
        """``Pipeline.__call__`` keyword arguments (None values left out: the pipeline's defaults)."""
        kwargs = {("num_frames" if k == "frames" else k): v for k, v in self.sample.items() if v is not None}
        if "free_init" in kwargs:
            kwargs["free_init"] = FreeInit(**kwargs["free_init"])
        return kwargs

    def load_kwargs(self) -> dict:
        """``load_pipeline`` keyword arguments (tuples for LoRAs and ControlNets, torch dtype), without
        device/backend."""
        kwargs = {k: v for k, v in self.model.items() if k not in ("dtype", "controlnet")}
        for key in ("loras", "motion_loras"):
            if key in kwargs:
                kwargs[key] = [(p, s) for p, s in kwargs[key]]
        if "controlnet" in self.model:
            kwargs["controlnets"] = [(p, s) for p, s in self.model["controlnet"]]
        if "dtype" in self.model:
            kwargs["dtype"] = getattr(torch, self.model["dtype"])
        return kwargs


def parse_job(raw: dict, where: str, base_dir: Path, default_id: str, info_ok: bool = False,
              name_id: bool = True, complete: bool = True) -> Job:
    """Check one job table (defaults already merged) -> Job; ValueError starting with ``where`` on any problem.

    info_ok: accept the informational keys a sidecar holds (:data:`INFO_KEYS`). name_id: add the job's id to
    ``where`` in messages. complete: check that keys needing others have them (control_* keys and their model
    key); off for a ``[defaults]`` table, which jobs complete.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a table of job keys, got {type(raw).__name__}")
    job_id = str(raw.get("id", default_id))
    if isinstance(raw.get("id"), bool) or not _ID.fullmatch(job_id):
        raise ValueError(f"{where}: id must be letters, digits, '.', '_' or '-' (not starting with '.', '_' or "
                         f"'-'; it names the output file), got {raw.get('id')!r}")
    where = f"{where} (id {job_id})" if name_id else where
    known = set(job_keys()) | (set(INFO_KEYS) if info_ok else set())
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                         f"(job keys: {', '.join(job_keys())})")
    if "prompt" not in raw:
        raise ValueError(f"{where}: 'prompt' is missing (a string, or a table of frame = \"prompt\")")
    sample: dict = {"prompt": _prompt(raw["prompt"], "prompt", where)}
    if raw.get("negative_prompt") is not None:
        sample["negative_prompt"] = _prompt(raw["negative_prompt"], "negative_prompt", where)
    for key in sampling_keys():
        if key in raw and key not in CONTROL_KEYS:
            sample[key] = _scalar(raw[key], key, where)
    if raw.get("frames") is not None:
        sample["frames"] = _scalar(raw["frames"], "frames", where)
    frames = sample.get("context_frames")
    if isinstance(frames, int) and not isinstance(frames, bool) and frames > 0 and \
            sample.get("context_overlap") is None:  # the CLI's default: short windows must still advance
        sample["context_overlap"] = default_context_overlap(frames)
    if raw.get("free_init") is not None:
        sample["free_init"] = _free_init(raw["free_init"], where)
    if raw.get("video") is not None:
        sample["video"] = _path(raw["video"], "video", where, base_dir)
    model = _model(raw, where, base_dir)
    sample.update(_control(raw, model, where, base_dir, complete))
    fmt = raw.get("format", "gif")
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"{where}: format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    fps = raw.get("fps", 8.0)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ValueError(f"{where}: fps must be a number > 0, got {fps!r}")
    return Job(job_id, model, sample, fmt, float(fps))


def read_jobs(path: str | os.PathLike) -> list[Job]:
    """Read a job file: TOML (``[[jobs]]`` tables, an optional ``[defaults]`` table filling what a job leaves
    out) or JSON lines (``.jsonl``, one job object per line). Ids default to the job's position (0, 1, ...) and
    must be unique. ValueError naming the file, the job and the key on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--batch {path}: cannot read the job file ({e})") from e
    if path.suffix.lower() == ".jsonl":
        defaults, raws = {}, _jsonl(text, path)
    elif path.suffix.lower() == ".toml":
        defaults, raws = _toml(text, path)
    else:
        raise ValueError(f"--batch {path}: expected a .toml or .jsonl job file")
    if not raws:
        raise ValueError(f"--batch {path}: no jobs in the file")
    jobs, seen = [], {}
    for i, raw in enumerate(raws):
        where = f"{path} job {i + 1}"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a table of job keys, got {type(raw).__name__}")
        job = parse_job({**defaults, **raw}, where, path.parent, default_id=str(i))
        if job.id in seen:
            raise ValueError(f"{where}: id {job.id!r} is also job {seen[job.id]}'s; ids name the output files")
        seen[job.id] = i + 1
        jobs.append(job)
    return jobs


def _toml(text: str, path: Path) -> tuple[dict, list]:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # Python 3.10: the tomli backport (a dependency there), same API
        import tomli as tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--batch {path}: not valid TOML ({e})") from e
    extra = sorted(set(data) - {"jobs", "defaults"})
    if extra:
        raise ValueError(f"--batch {path}: unknown top-level key(s) {', '.join(map(repr, extra))}; expected "
                         "[[jobs]] tables and an optional [defaults] table")
    defaults, raws = data.get("defaults", {}), data.get("jobs", [])
    if not isinstance(defaults, dict) or "id" in defaults:
        raise ValueError(f"--batch {path}: [defaults] must be a table of job keys without 'id'")
    if not isinstance(raws, list):
        raise ValueError(f"--batch {path}: 'jobs' must be an array of tables ([[jobs]])")
    if defaults:
        parse_job({"prompt": "", **defaults}, f"{path} [defaults]", path.parent, "defaults",
                  name_id=False, complete=False)  # keys checked once
    return defaults, raws


def _jsonl(text: str, path: Path) -> list:
    raws = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                raws.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"--batch {path} line {n}: not valid JSON ({e})") from e
    return raws


def _prompt(value, key: str, where: str) -> str | dict[int, str]:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value and all(isinstance(p, str) for p in value.values()):
        out = {}
        for frame, text in value.items():
            try:
                out[int(frame)] = text
            except ValueError:
                raise ValueError(f"{where}: {key} table keys must be frame numbers, got {frame!r}") from None
        return dict(sorted(out.items()))
    raise ValueError(f"{where}: {key} must be a string or a table of frame = \"prompt\", got {value!r}")


def _scalar(value, key: str, where: str):
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ValueError(f"{where}: {key} must be a number, string or boolean, got {type(value).__name__}")


def _free_init(value, where: str) -> dict:
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"iterations": value}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: free_init must be an iteration count or a table of FreeInit settings, "
                         f"got {value!r}")
    names = [f.name for f in dataclasses.fields(FreeInit)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"{where}: free_init: unknown key(s) {', '.join(map(repr, unknown))} (keys: {names})")
    try:
        return dataclasses.asdict(FreeInit(**value))  # every field, defaults filled: the sidecar is explicit
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: free_init: {e}") from e


def _path(value, key: str, where: str, base_dir: Path) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: {key} must be a file path (a string), got {value!r}")
    return str((base_dir / Path(value).expanduser()).resolve())


def _loras(value, key: str, where: str, base_dir: Path) -> list[list]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: {key} must be a list of \"path\", [\"path\", scale] or "
                         f"{{path = \"...\", scale = 0.8}} entries, got {value!r}")
    out = []
    for entry in value:
        if isinstance(entry, str):
            entry = [entry, 1.0]
        elif isinstance(entry, dict) and set(entry) <= {"path", "scale"}:
            entry = [entry.get("path"), entry.get("scale", 1.0)]
        scale = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError(f"{where}: {key} entry {entry!r}: expected \"path\", [\"path\", scale] or "
                             "{path = \"...\", scale = 0.8}")
        out.append([_path(entry[0], key, where, base_dir), float(scale)])
    return out


def _model(raw: dict, where: str, base_dir: Path) -> dict:
    model: dict = {}
    for key in MODEL_PATH_KEYS:
        if raw.get(key) is not None:
            model[key] = _path(raw[key], key, where, base_dir)
    for key in ("loras", "motion_loras"):
        if raw.get(key):
            model[key] = _loras(raw[key], key, where, base_dir)
    if raw.get("controlnet"):  # one entry or a list, as repeated --controlnet FILE[:SCALE] flags
        value = raw["controlnet"]
        model["controlnet"] = _loras(value if isinstance(value, list) else [value], "controlnet", where, base_dir)
    if raw.get("sparsectrl") is not None:
        model["sparsectrl"] = _path(raw["sparsectrl"], "sparsectrl", where, base_dir)
    version = raw.get("motion_module_version")
    if version is not None:
        if version not in ("v1", "v2", "v3"):
            raise ValueError(f"{where}: motion_module_version must be v1, v2 or v3, got {version!r}")
        model["motion_module_version"] = version
    if raw.get("dtype") is not None:
        if raw["dtype"] not in DTYPES:
            raise ValueError(f"{where}: dtype must be one of {', '.join(DTYPES)}, got {raw['dtype']!r}")
        model["dtype"] = raw["dtype"]
    return model


def _control(raw: dict, model: dict, where: str, base_dir: Path, complete: bool) -> dict:
    """The control_* sampling keys, checked against the model keys they need (a ControlNet job fails before
    anything runs, not when its pipeline turns out to have no ControlNet)."""
    given = {k: raw[k] for k in CONTROL_KEYS if raw.get(k) is not None}
    if complete:
        for key, needs in CONTROL_KEYS.items():
            if key in given and needs not in model:
                raise ValueError(f"{where}: {key} needs the model key '{needs}' (the "
                                 f"{'ControlNet file(s)' if needs == 'controlnet' else 'SparseCtrl file'}); "
                                 "it is missing")
        if "controlnet" in model and "control_frames" not in given:
            raise ValueError(f"{where}: controlnet needs control_frames (one condition video per ControlNet)")
        if "sparsectrl" in model and "control_images" not in given:
            raise ValueError(f"{where}: sparsectrl needs control_images (a table of frame = \"key frame image\")")
    out: dict = {}
    if "control_frames" in given:
        value = given["control_frames"]
        paths = [_path(v, "control_frames", where, base_dir) for v in (value if isinstance(value, list) else [value])]
        n = len(model.get("controlnet", ()))
        if complete and len(paths) != n:
            raise ValueError(f"{where}: control_frames has {len(paths)} video(s) for {n} controlnet; give one "
                             "condition video per ControlNet, in the same order")
        out["control_frames"] = paths
    for key in ("control_start", "control_end"):
        if key in given:
            value = given[key]
            values = value if isinstance(value, list) else [value]
            if not values or not all(_is_number(v) for v in values):
                raise ValueError(f"{where}: {key} must be a number or a list of numbers (one per ControlNet), "
                                 f"got {value!r}")
            out[key] = value
    if "control_images" in given:
        value = given["control_images"]
        if not isinstance(value, dict) or not value:
            raise ValueError(f"{where}: control_images must be a table of frame = \"key frame image\", got {value!r}")
        images = {}
        for frame, image in value.items():
            try:
                index = int(frame)
            except ValueError:
                raise ValueError(f"{where}: control_images keys must be frame numbers, got {frame!r}") from None
            images[index] = _path(image, f"control_images[{frame}]", where, base_dir)
        out["control_images"] = dict(sorted(images.items()))
    if "control_scale" in given:
        if not _is_number(given["control_scale"]):
            raise ValueError(f"{where}: control_scale must be a number, got {given['control_scale']!r}")
        out["control_scale"] = given["control_scale"]
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
